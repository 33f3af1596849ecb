"""Packed trials: throughput by pack size, gradient forms, EA/DPA inside a pack, and the quick-start study.

Parts (``--parts``, default all):

* ``throughput``: trials/hour of the quick-start trial shape at pack sizes 1, 8, 32 and 64
  (``workers.packed.run_pack``), against solo ``run_trial``. Members train the quick-start's
  top rung (N31_T6), which none solves in the timed steps, so every member runs every step; a
  full trial is ``max_steps`` steps with an evaluation every ``eval_interval``, and trials/hour
  is extrapolated from the time per member-step (evaluation included at its share). ``--solo-procs P``
  adds P processes training one solo trial each at once (one trial per process, sharing the device);
  "vs solo" is against the better of the solo cases. ``--device cuda`` puts this part, ``forms`` and
  ``kinds`` on a GPU (``benchmarks/gpu_packing.sh``: the prepared GPU run, which needs only torch).
* ``forms``: the two gradient forms of ``GRADIENT_FORMS`` side by side (pack training time).
* ``kinds``: EA/DPA training time ratio inside the packed trainer, same members, same steps.
* ``twins``: a searcher's probe, n seeds of DPA and EA: one pack of 2n members mixing the kinds
  against a pack of n per kind, one after the other (``--twin-sizes``), same members, same steps.
* ``overhead``: what a Tune trial costs beyond its training, component by component (medians of
  repeats): a bare ``run_pack`` of one quick-start pack, Ray actor start (a fresh worker process
  that imports the trainer), MLflow (child run creation, one evaluation's metrics, the final
  record; synchronous and asynchronous), checkpoint I/O (the pack state saved and copied to
  storage, as Tune persists it), a status write, and the trials-file read the callback used to
  do on every result. Their sum per pack over the bare pack time is the modelled overhead ratio.
* ``study``: the quick-start study end to end through the real driver (Ray, MLflow, records),
  ``execution.pack: auto`` vs ``off``, and the same packs as bare ``run_pack`` calls on as many
  plain processes as the study has workers (no Ray, no MLflow, no checkpoints, no records or
  status), the three in a shuffled order in every repetition; the overhead ratio is the packed
  study's wall time over the bare packs'. With ``--fresh-workers``, packed and unpacked also run with
  a new worker process per Tune trial (``LADDER_REUSE_WORKERS=false``), to show what reused
  workers bring to each.
* ``trial``: the per-trial overhead with a core to spare: every (kind, size) of the quick-start as a
  study of one pack through the real driver (``max_concurrent: 1``), paired with the same pack bare
  in a plain process right before or after it; each pair's ratio is the pack's wall inside its
  trainable over its bare wall. On a two-core box the study part's per-pack figure also holds the
  driver's and Ray's CPU, which two packs at once leave no core for, and the drift between runs.
* ``context``: one fixed pack in a plain process, a Ray task and a Tune function trainable (with
  a longer thread switch interval too, and a plain process with a thread waking every
  millisecond), each timed where it ran: what Ray and Tune cost a pack alone on the box.

Every timed case is repeated ``--reps`` times in an interleaved, shuffled order; the report
gives medians and the spread (min-max). Run ``python -m benchmarks.bench_packing --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from workers.packed import GRADIENT_FORMS, run_pack
from workers.trial import TrialConfig, run_trial

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "studies" / "quickstart.yaml"
TARGET_SPEEDUP = 2.0  # quick-start study, packed vs unpacked, end to end
TARGET_OVERHEAD = 1.10  # packed study time / bare packed loop
TARGET_KIND_RATIO = 1.05  # EA/DPA step time inside the packed trainer


SHAPES = ROOT / "benchmarks" / "quickstart_shapes.json"  # quickstart_shape's source: see resolve_quickstart_shape


def resolve_quickstart_shape(size: int = 1) -> TrialConfig:
    """A quick-start trial (size 0: d16 l1, size 1: d32 l2) on its top rung, as the driver resolves it.

    Needs the spec's packages (pydantic and the rest); ``quickstart_shape`` reads the same configs
    from ``SHAPES`` so that the throughput and kinds parts run where only torch is installed (the
    device machine). ``--write-shapes`` rewrites that file; a unit test keeps the two equal.
    """
    from studies.spec import StudySpec
    from workers.driver import fixed_config
    from workers.search import make_cell
    from workers.trial import trial_config

    spec = StudySpec.from_file(QUICKSTART)
    cell = make_cell(spec, "dpa", size, len(spec.task.points()) - 1, spec.hparams.lr.grid_values()[0], 0)
    fixed = fixed_config(spec)
    return replace(trial_config({"cell": cell, "fixed": fixed}), device="cpu")


def quickstart_shape(size: int = 1, device: str = "cpu") -> TrialConfig:
    """``resolve_quickstart_shape(size)`` as recorded in ``SHAPES``, on ``device``."""
    return replace(TrialConfig(**json.loads(SHAPES.read_text())[str(size)]), device=device)


def write_shapes() -> None:
    from dataclasses import asdict

    shapes = {str(size): asdict(resolve_quickstart_shape(size)) for size in (0, 1)}
    SHAPES.write_text(json.dumps(shapes, indent=2) + "\n")


def _members(base: TrialConfig, m: int, steps: int) -> list[TrialConfig]:
    return [replace(base, seed=s, max_steps=steps, eval_interval=steps) for s in range(m)]


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()  # on a GPU: the work queued, done
    return time.perf_counter() - t


def interleaved(cases: dict[str, Callable[[], Any]], reps: int, seed: int) -> dict[str, list[float]]:
    """Wall seconds of every case, ``reps`` times, the case order shuffled in every repetition."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up, untimed: each case's first-call costs (allocator, kernels, eval sets)
        fn()
    for _ in range(reps):
        order = list(cases)
        rng.shuffle(order)
        for name in order:
            out[name].append(_timed(cases[name]))
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _solo_in_process(base: TrialConfig, steps: int, barrier: Any) -> tuple[float, float]:
    """One solo trial in this (spawned) process, after a warm-up, started with the others: (start, end) epoch s."""
    torch.set_num_threads(1)
    run_trial(_members(base, 1, 2)[0])  # warm-up: CUDA context, kernels, allocator
    _sync()
    barrier.wait()
    start = time.time()
    run_trial(_members(base, 1, steps)[0])
    _sync()
    return start, time.time()


def _solo_processes(base: TrialConfig, steps: int, procs: int) -> float:
    """Wall seconds of ``procs`` processes training one solo trial each, at once, on ``base.device``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        barrier = manager.Barrier(procs)
        spans = list(pool.map(_solo_in_process, [base] * procs, [steps] * procs, [barrier] * procs))
    return max(end for _, end in spans) - min(start for start, _ in spans)


def part_throughput(args: argparse.Namespace) -> dict[str, Any]:
    base = quickstart_shape(args.size, args.device)
    steps = args.steps
    cases: dict[str, Callable[[], Any]] = {"solo run_trial": lambda: run_trial(_members(base, 1, steps)[0])}
    for m in args.pack_sizes:
        cases[f"pack {m}"] = lambda m=m: run_pack(_members(base, m, steps))
    times = interleaved(cases, args.reps, args.seed)
    if args.solo_procs > 1:  # one trial per process, several processes sharing the device at once
        name = f"solo run_trial x {args.solo_procs} processes"
        times[name] = [_solo_processes(base, steps, args.solo_procs) for _ in range(args.reps)]
    rows = {}
    for name, xs in times.items():
        m = args.solo_procs if " processes" in name else 1 if name.startswith("solo") else int(name.split()[1])
        per_member_step = statistics.median(xs) / (m * steps)
        rows[name] = _stats(xs) | {
            "members": m,
            "s_per_member_step": per_member_step,
            "trials_per_hour": 3600 / (per_member_step * base.max_steps),
        }
    # against the best of one trial per process: alone, or several processes sharing the device
    solo = max(r["trials_per_hour"] for k, r in rows.items() if k.startswith("solo"))
    for r in rows.values():
        r["vs_solo"] = r["trials_per_hour"] / solo
    return {"shape": _shape(base), "steps_timed": steps, "rows": rows}


def part_forms(args: argparse.Namespace) -> dict[str, Any]:
    base = quickstart_shape(args.size, args.device)
    cases = {
        f"{form} M={m}": lambda form=form, m=m: run_pack(_members(base, m, args.steps), form=form)
        for m in args.form_sizes
        for form in GRADIENT_FORMS
    }
    times = interleaved(cases, args.reps, args.seed)
    return {"shape": _shape(base), "rows": {k: _stats(v) for k, v in times.items()}}


def part_kinds(args: argparse.Namespace) -> dict[str, Any]:
    base = quickstart_shape(args.size, args.device)
    cases = {
        f"{kind} M={m}": lambda kind=kind, m=m: run_pack(_members(replace(base, attention=kind), m, args.steps))
        for m in args.form_sizes
        for kind in ("dpa", "ea")
    }
    times = interleaved(cases, args.reps, args.seed)
    rows: dict[str, Any] = {k: _stats(v) for k, v in times.items()}
    for m in args.form_sizes:
        pairs = [e / d for e, d in zip(times[f"ea M={m}"], times[f"dpa M={m}"], strict=True)]
        rows[f"ea/dpa M={m}"] = {
            "ratio_of_medians": rows[f"ea M={m}"]["median"] / rows[f"dpa M={m}"]["median"],
            "paired": _stats(pairs),
        }
    return {"shape": _shape(base), "rows": rows}


class _Probe:
    """A Ray actor that loads what a trial's worker loads (Ray, torch, the packed trainer)."""

    def __init__(self) -> None:
        import workers.packing  # noqa: F401  (the trainable's module and its imports)

    def ping(self) -> int:
        return os.getpid()


def _repeat(fn: Callable[[], Any], n: int) -> list[float]:
    return [_timed(fn) for _ in range(n)]


def _quickstart_pack(kind: str = "dpa", size: int = 1) -> tuple[Any, list[TrialConfig]]:
    """One pack of the quick-start study (one kind and size, every rung), as the driver plans it."""
    from studies.spec import StudySpec
    from workers.callbacks import fixed_config
    from workers.search import grid_cells
    from workers.trial import trial_config

    spec = StudySpec.from_file(QUICKSTART)
    fixed = fixed_config(spec)
    cells = [c for c in grid_cells(spec) if c["kind"] == kind and c["size_idx"] == size]
    return spec, [replace(trial_config({"cell": c, "fixed": fixed}), device="cpu") for c in cells]


def part_overhead(args: argparse.Namespace) -> dict[str, Any]:
    import shutil

    import ray

    from studies.records import TrialRecord, append_record, read_records
    from studies.studydir import update_status
    from workers import tracking
    from workers.search import grid_cells

    spec, cfgs = _quickstart_pack()
    steps, every = args.overhead_steps, cfgs[0].eval_interval
    short = [replace(c, max_steps=steps, task=[[31, 6]]) for c in cfgs]  # none solves: every member every step
    n = args.overhead_reps
    out: dict[str, Any] = {"pack": len(cfgs), "steps_timed": steps, "eval_interval": every}
    captured: dict[str, Any] = {}

    def keep(evaluated: Any, finished: Any, state: Any) -> None:
        captured["state"], captured["metrics"] = state(), evaluated[0][1]

    run_pack(short[:1], keep)  # warm-up
    bare = _repeat(lambda: run_pack(short, keep), n)
    out["bare_pack_per_eval_s"] = _stats([b / (steps / every) for b in bare])
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        root = Path(tmp)

        # checkpoint I/O: torch.save of the pack state, then Tune's copy of it into the experiment storage
        def checkpoint() -> None:
            d, dest = root / "ckpt", root / "storage"
            d.mkdir()
            torch.save(captured["state"], d / "pack.pt")
            shutil.copytree(d, dest)
            shutil.rmtree(d)
            shutil.rmtree(dest)

        out["checkpoint_s"] = _stats(_repeat(checkpoint, n * 4))
        (root / "study").mkdir()
        out["status_write_s"] = _stats(_repeat(lambda: update_status(root / "study", counts={"solved": 1}), n * 4))
        cells = grid_cells(spec)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        from studies.settings import Settings
        from studies.stores import init_stores

        init_stores(Settings(data_dir=root, mlflow_tracking_uri=uri))
        info = tracking.ensure_study_run(uri, "bench", spec, (root / "artifacts").as_uri())
        tracker = tracking.StudyTracker("bench", info)
        records = []
        for i, cell in enumerate(cells):  # a full quick-start trials file (20 records)
            fields = {k: cell[k] for k in ("kind", "point", "coords", "seed", "lr")} | cell["size"]
            rec = TrialRecord.model_validate(fields | {"study_id": "b", "trial_id": f"t{i}", "status": "unsolved"})
            append_record(root / "trials.jsonl", rec)
            records.append(rec)
        out["records_read_s"] = _stats(_repeat(lambda: read_records(root / "trials.jsonl"), n * 4))
        seeds = iter(range(1, 10_000))

        def create() -> None:  # a new seed: a trial key with no run yet (searched for, then created)
            seed = next(seeds)
            tracker.trial_run(f"x{seed}", cells[0] | {"seed": seed}, {})

        out["mlflow_create_run_s"] = _stats(_repeat(create, n * 2))
        run_id = tracker.trial_run("probe", cells[0], {})
        metrics = captured["metrics"]
        out["mlflow_progress_s"] = _stats(
            _repeat(lambda: tracker.log_progress(run_id, metrics, synchronous=True), n * 4)
        )

        def queued(k: int = 8) -> None:  # k asynchronous batches and the wait for them, per batch below
            for _ in range(k):
                tracker.log_progress(run_id, metrics)
            tracking.flush()

        out["mlflow_progress_async_s"] = _stats([x / 8 for x in _repeat(queued, n)])
        out["mlflow_finish_s"] = _stats(
            _repeat(lambda: tracker.finish(records[0].model_copy(update={"mlflow_run_id": run_id})), n * 2)
        )
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        probe = ray.remote(num_cpus=1)(_Probe)

        def actor() -> None:
            a = probe.remote()  # type: ignore[attr-defined]
            ray.get(a.ping.remote())
            ray.kill(a)

        actor()  # warm-up: the cluster's first worker
        out["actor_start_s"] = _stats(_repeat(actor, n))
    finally:
        ray.shutdown()
    # the modelled per-pack cost of one quick-start pack (800 steps, an evaluation every 100)
    m, evals = len(cfgs), cfgs[0].max_steps // every
    med = {k: v["median"] for k, v in out.items() if isinstance(v, dict)}
    bare_pack = med["bare_pack_per_eval_s"] * evals
    parts = {
        "actor start": med["actor_start_s"],
        "MLflow runs (create + finish, per member)": m * (med["mlflow_create_run_s"] + med["mlflow_finish_s"]),
        "MLflow progress (per member per evaluation, synchronous)": m * evals * med["mlflow_progress_s"],
        "checkpoints (every evaluation)": evals * med["checkpoint_s"],
        "status writes (every result)": evals * med["status_write_s"],
        "trials-file reads (2 per result, before this change)": 2 * evals * med["records_read_s"],
    }
    out["model"] = {"members": m, "evaluations": evals, "bare_pack_s": bare_pack, "parts_s": parts}
    out["model"]["ratio_before"] = (bare_pack + sum(parts.values())) / bare_pack
    now = dict(parts)
    now["trials-file reads (2 per result, before this change)"] = 0.0
    now["status writes (every result)"] = med["status_write_s"] * m  # only when a member's record lands
    now["MLflow progress (per member per evaluation, synchronous)"] = m * evals * med["mlflow_progress_async_s"]
    out["model"]["ratio_now"] = (bare_pack + sum(now.values())) / bare_pack
    return out


def _run_study(pack: str, data: Path, reuse: bool = True, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The quick-start study through the real driver in a fresh process; wall time and its records.

    ``reuse``: Tune trials run one after another in the same worker processes (``LADDER_REUSE_WORKERS=true``,
    the default); off, every Tune trial starts its own worker process. ``overrides``: top-level spec
    fields replaced (``_quickstart_spec``).
    """
    spec = _quickstart_spec(overrides)
    spec["execution"] = {"pack": pack}
    env = os.environ | {
        "LADDER_DATA_DIR": str(data),
        "PYTHONPATH": str(ROOT),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "LADDER_REUSE_WORKERS": str(reuse).lower(),
    }
    code = (
        "import json,sys; from studies.spec import StudySpec; from studies.studydir import prepare_study;"
        "print(prepare_study(StudySpec.model_validate(json.loads(sys.argv[1]))))"
    )
    study_id = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        driver = subprocess.Popen(
            [sys.executable, "-m", "workers.driver", study_id], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        cpu = _cpu_by_process(driver)
        wall = time.perf_counter() - t
        if driver.returncode:
            err.seek(0)
            raise RuntimeError(
                f"the {pack} quick-start driver failed (exit {driver.returncode}):\n{err.read()[-3000:]}"
            )
    lines = (data / "studies" / study_id / "trials.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    timings = json.loads((data / "studies" / study_id / "status.json").read_text())["timings"]
    return {"wall_s": wall, "records": records, "timings": timings, "cpu_s": cpu}


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's per-node helpers, titled like workers


def _process_class(cmdline: list[str]) -> str:
    """Of a process under the driver: ``workers`` (Ray workers: the trainables) or ``ray`` (raylet, GCS, helpers)."""
    text = " ".join(cmdline[:3])
    if text.startswith(RAY_AGENTS):
        return "ray"
    return "workers" if text.startswith("ray::") or "default_worker.py" in text else "ray"


def _cpu_by_process(driver: subprocess.Popen[str], every_s: float = 0.25) -> dict[str, float]:
    """CPU-seconds of the driver and every process under it (Ray's and its workers) until the driver exits.

    Sampled every ``every_s``: each process counts with the last CPU time seen, so one that ends
    between samples loses at most that interval's CPU.
    """
    import psutil

    root = psutil.Process(driver.pid)
    last: dict[int, tuple[str, float]] = {}
    while driver.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    kind = "driver" if proc.pid == driver.pid else _process_class(proc.cmdline())
                last[proc.pid] = (kind, times.user + times.system)
            except psutil.Error:
                continue
        time.sleep(every_s)
    out = {"driver": 0.0, "ray": 0.0, "workers": 0.0}
    for kind, seconds in last.values():
        out[kind] += seconds
    return out


def _pack_wall(cfgs: list[TrialConfig], switch_s: float | None = None, waker: bool = False) -> float:
    """One pack's wall, its state taken at every evaluation as the trainable takes it (one torch thread).

    ``switch_s``: the interpreter's thread switch interval; ``waker``: a Python thread waking every
    millisecond meanwhile (a stand-in for the actor's other threads contending for the GIL).
    """
    import threading

    torch.set_num_threads(1)
    if switch_s:
        sys.setswitchinterval(switch_s)
    stop = threading.Event()

    def wake() -> None:
        while not stop.wait(0.001):
            pass

    if waker:
        threading.Thread(target=wake, daemon=True).start()
    try:
        return _timed(lambda: run_pack(cfgs, lambda evaluated, finished, state: state()))
    finally:
        stop.set()


def part_context(args: argparse.Namespace) -> dict[str, Any]:
    """The same pack in a plain process, a Ray task and a Tune function trainable: what the context costs.

    The quick-start's d32 dpa pack on its top rung (no member stops early), ``--context-steps`` steps,
    one case at a time (the box otherwise idle), cases shuffled in every repetition; each figure is
    the pack's wall measured where it ran, not the scheduling around it.
    """
    import ray
    from ray import tune

    _, cfgs = _quickstart_pack("dpa", 1)
    cfgs = [replace(c, max_steps=args.context_steps, task=[[31, 6]]) for c in cfgs]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    in_task = ray.remote(num_cpus=1)(_pack_wall)

    def in_tune(storage: str, switch_s: float | None) -> float:
        def trainable(config: dict[str, Any]) -> None:
            tune.report({"wall": _pack_wall(cfgs, switch_s)})

        grid = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()
        return float(grid[0].metrics["wall"])

    with tempfile.TemporaryDirectory(prefix="bench-context-") as storage:
        cases: dict[str, Callable[[], float]] = {
            "plain process": lambda: _pack_wall(cfgs),
            "plain process + a thread waking every 1 ms": lambda: _pack_wall(cfgs, waker=True),
            "Ray task": lambda: float(ray.get(in_task.remote(cfgs))),
            "Tune function trainable": lambda: in_tune(storage, None),
            "Tune function trainable, switch interval 50 ms": lambda: in_tune(storage, 0.05),
        }
        _pack_wall(cfgs[:1])  # warm-up
        rng = random.Random(args.seed)
        walls: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.reps):
            order = list(cases)
            rng.shuffle(order)
            for name in order:
                walls[name].append(cases[name]())
    ray.shutdown()
    plain = statistics.median(walls["plain process"])
    rows = {k: _stats(v) | {"runs": v, "vs_plain": statistics.median(v) / plain} for k, v in walls.items()}
    return {"shape": _shape(cfgs[0]), "members": len(cfgs), "rows": rows}


def _pack_name(kind: str, d_model: int, points: list[str]) -> str:
    return f"{kind} d{d_model} " + ",".join(sorted(points))


def _trained_walls(records: list[dict[str, Any]]) -> dict[str, float]:
    """Each pack's wall time inside its trainable (its slowest member's ``wall_s``), by ``_pack_name``."""
    packs: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        packs.setdefault(r["trial_id"].rsplit(".m", 1)[0], []).append(r)
    return {
        _pack_name(rs[0]["kind"], rs[0]["d_model"], [r["point"] for r in rs]): max(r["wall_s"] for r in rs)
        for rs in packs.values()
    }


def _bare_pack(cfgs: list[TrialConfig]) -> float:
    torch.set_num_threads(1)
    return _timed(lambda: run_pack(cfgs))


def _bare_study(packs: list[list[TrialConfig]], workers: int) -> dict[str, Any]:
    """The study's packs on ``workers`` plain processes (started before the clock), each pack a bare ``run_pack``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_bare_pack, [[replace(packs[0][0], max_steps=1, eval_interval=1)]] * workers))  # warm
        t = time.perf_counter()
        each = list(pool.map(_bare_pack, packs))
        return {"wall_s": time.perf_counter() - t, "pack_s": each}


# study part's runs through the driver: name -> (execution.pack, reused workers)
STUDY_CASES = {"auto": ("auto", True), "off": ("off", True), "auto_fresh": ("auto", False), "off_fresh": ("off", False)}


def _quickstart_spec(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The quick-start spec as JSON, with some top-level fields replaced."""
    from studies.spec import StudySpec

    return StudySpec.from_file(QUICKSTART).model_dump(mode="json") | (overrides or {})


def _quickstart_packs(overrides: dict[str, Any] | None = None) -> tuple[int, list[list[TrialConfig]], list[str]]:
    """The (overridden) quick-start grid's packs as its driver plans them: (trials at once, configs, pack names)."""
    from studies.spec import StudySpec
    from workers.driver import fixed_config
    from workers.packing import max_members, plan_packs
    from workers.search import grid_cells
    from workers.trial import trial_config

    spec = StudySpec.model_validate(_quickstart_spec(overrides))
    fixed = fixed_config(spec)
    packs = plan_packs(grid_cells(spec), max_members(spec), fixed, spec.max_concurrent)
    cfgs = [[replace(trial_config({"cell": c, "fixed": fixed}), device="cpu") for c in p] for p in packs]
    names = [_pack_name(p[0].attention, p[0].d_model, [f"N{c.task[0][0]}_T{c.task[0][1]}" for c in p]) for p in cfgs]
    return spec.max_concurrent, cfgs, names


def _median_interval(xs: list[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median of ``xs``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def part_trial(args: argparse.Namespace) -> dict[str, Any]:
    """Per-trial overhead with a core to spare: each quick-start pack as a study of its own vs the same pack bare.

    The study part's per-pack overhead runs two packs at once on a two-core box, where the driver's
    and Ray's own CPU (scheduling, MLflow, records, the live report) comes out of the packs' walls.
    Here every (kind, size) of the quick-start is a study of one pack through the real driver (Ray,
    Tune, MLflow, checkpoints, records, status), and right before or after it (the order drawn
    each time) the same pack runs bare in a plain process: a pair. A pack's wall inside its
    trainable over its bare wall is what Ladder adds to the trial itself; pairs close in time
    cancel most of the box's drift. ``--study-reps`` rounds over the four packs, shuffled.
    """
    base = _quickstart_spec()
    groups = [(kind, size) for kind in base["attention"] for size in base["model"]["sizes"]]
    rng = random.Random(args.seed)
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.study_reps):
            rng.shuffle(groups)
            for kind, size in groups:
                overrides = {"attention": [kind], "model": base["model"] | {"sizes": [size]}, "max_concurrent": 1}
                _, cfgs, names = _quickstart_packs(overrides)
                pair: dict[str, Any] = {"pack": names[0], "bare_first": rng.random() < 0.5}
                print(f"[trial rep {rep}: {names[0]}]", file=sys.stderr, flush=True)
                for what in ("bare", "trained") if pair["bare_first"] else ("trained", "bare"):
                    if what == "bare":
                        pair["bare_s"] = _bare_study(cfgs, 1)["pack_s"][0]
                    else:
                        res = _run_study("auto", Path(tmp) / f"trial{len(pairs)}", overrides=overrides)
                        pair["trained_s"] = _trained_walls(res["records"])[names[0]]
                pair["ratio"] = pair["trained_s"] / pair["bare_s"]
                pairs.append(pair)
    ratios = [p["ratio"] for p in pairs]
    lo, hi = _median_interval(ratios, args.seed)
    return {"pairs": pairs, "overhead_per_pack": _stats(ratios) | {"ci95_median": [lo, hi]}}


def part_study(args: argparse.Namespace) -> dict[str, Any]:
    """Packed study, unpacked study and the bare packs, in a shuffled order in every repetition."""
    workers, cfgs, names = _quickstart_packs()
    # auto / off: packed / unpacked with reused workers (the default); *_fresh: a worker process per Tune trial
    studies = ["auto", "off"] + (["auto_fresh", "off_fresh"] if args.fresh_workers else [])
    walls: dict[str, list[float]] = {k: [] for k in [*studies, "bare"]}
    loads: dict[str, list[float]] = {k: [] for k in walls}
    outcomes: dict[str, list[tuple[str, str, str]]] = {}
    bare: list[list[float]] = []
    timings: dict[str, list[dict[str, float]]] = {k: [] for k in studies}  # the driver's phases (status.json)
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in studies}  # CPU-s of the driver, Ray, the workers
    trained: list[dict[str, float]] = []  # per packed run: each pack's wall inside its trainable
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.study_reps):
            order = list(walls)
            rng.shuffle(order)
            for what in order:
                print(f"[study rep {rep}: {what}]", file=sys.stderr, flush=True)
                if what == "bare":  # no Ray, MLflow, checkpoints, records or status: training alone
                    res = _bare_study(cfgs, workers)
                    bare.append(res["pack_s"])
                else:
                    pack, reuse = STUDY_CASES[what]
                    res = _run_study(pack, Path(tmp) / f"{what}{rep}", reuse=reuse)
                    timings[what].append(res["timings"])
                    cpu[what].append(res["cpu_s"])
                    if what == "auto":
                        trained.append(_trained_walls(res["records"]))
                    outcomes[what] = sorted(
                        (r["kind"], f"d{r['d_model']}", r["point"], r["status"]) for r in res["records"]
                    )
                walls[what].append(res["wall_s"])
                loads[what].append(round(os.getloadavg()[1], 1))  # 5-minute load at the end of the run
    med = {k: statistics.median(v) for k, v in walls.items()}
    auto, off, bare_wall = med["auto"], med["off"], med["bare"]
    # Per-trial overhead, two ways, each against the bare packs of the same repetition: the Tune run
    # (every pack with its worker start, checkpoints, reports and the driver's callbacks; not the
    # driver's imports, start-up or report) over the bare packs on as many workers; and each pack's
    # wall inside its trainable over the same pack bare.
    fit = [t["fit_s"] / b for t, b in zip(timings["auto"], walls["bare"], strict=True)]
    per_pack = [w[n] / b for w, row in zip(trained, bare, strict=True) for n, b in zip(names, row, strict=True)]
    return {
        "walls": {k: _stats(v) | {"runs": v, "load5_at_end": loads[k]} for k, v in walls.items()},
        "speedup": off / auto,
        # against one worker process per Tune trial (how unpacked studies ran before reused workers)
        "speedup_vs_fresh_unpacked": med["off_fresh"] / auto if "off_fresh" in med else None,
        "reuse_gain": {k: med[f"{k}_fresh"] / med[k] for k in ("auto", "off") if f"{k}_fresh" in med},
        "same_outcomes": all(outcomes.get(k) == outcomes.get("auto") for k in studies),
        "outcomes": outcomes,
        "packs": [len(p) for p in cfgs],
        "bare_pack_s": bare,
        "bare_wall_s": bare_wall,
        "overhead": auto / bare_wall,
        "timings": timings,
        "cpu_by_process": {k: {c: statistics.median(r[c] for r in v) for c in v[0]} for k, v in cpu.items()},
        "overhead_fit": _stats(fit) | {"runs": fit},
        "overhead_per_pack": _stats(per_pack) | {"runs": per_pack, "packs": names},
    }


def _shape(cfg: TrialConfig) -> str:
    return (
        f"d{cfg.d_model} l{cfg.n_layers} h{cfg.n_heads}, context {cfg.context_length}, batch {cfg.batch_size}, "
        f"{cfg.max_steps} steps, eval every {cfg.eval_interval}, task {cfg.task}"
    )


def machine(device: str = "cpu") -> dict[str, Any]:
    """The machine and its load now (bench_attention's environment record)."""
    from benchmarks.bench_attention import environment

    return environment(torch.device(device)) | {"loadavg": [round(x, 2) for x in os.getloadavg()]}


def part_twins(args: argparse.Namespace) -> dict[str, Any]:
    base = quickstart_shape(args.size, args.device)

    def twins(n: int, kinds: tuple[str, ...]) -> list[TrialConfig]:
        return [replace(c, attention=k) for c in _members(base, n, args.steps) for k in kinds]

    cases: dict[str, Callable[[], Any]] = {}
    for n in args.twin_sizes:
        cases[f"mixed 2x{n}"] = lambda n=n: run_pack(twins(n, ("dpa", "ea")))
        cases[f"apart 2x{n}"] = lambda n=n: [run_pack(twins(n, (k,))) for k in ("dpa", "ea")]
    times = interleaved(cases, args.reps, args.seed)
    rows: dict[str, Any] = {k: _stats(v) for k, v in times.items()}
    for n in args.twin_sizes:
        mixed, apart = times[f"mixed 2x{n}"], times[f"apart 2x{n}"]
        rows[f"mixed/apart 2x{n}"] = {
            "ratio_of_medians": statistics.median(mixed) / statistics.median(apart),
            "paired": _stats([m / a for m, a in zip(mixed, apart, strict=True)]),
        }
    return {"shape": _shape(base), "rows": rows}


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "throughput": part_throughput,
    "forms": part_forms,
    "kinds": part_kinds,
    "twins": part_twins,
    "overhead": part_overhead,
    "study": part_study,
    "context": part_context,
    "trial": part_trial,
}


def report(results: dict[str, Any]) -> str:
    out = [f"machine: {json.dumps(results['machine_start'])}", f"load at end: {results['machine_end']['loadavg']}"]
    if "throughput" in results:
        t = results["throughput"]
        out += [
            f"\n## Throughput ({t['shape']}; {t['steps_timed']} steps timed)",
            "",
            "| case | median s | min-max s | s/member-step | trials/hour | vs solo |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in t["rows"].items():
            out.append(
                f"| {name} | {r['median']:.2f} | {r['min']:.2f}-{r['max']:.2f} | {r['s_per_member_step'] * 1e3:.2f} ms "
                f"| {r['trials_per_hour']:.0f} | {r['vs_solo']:.2f}x |"
            )
    for part in ("forms", "kinds", "twins"):
        if part in results:
            out += [f"\n## {part} ({results[part]['shape']})", "", "| case | median | spread |", "|---|---|---|"]
            for name, r in results[part]["rows"].items():
                if "median" in r:
                    out.append(f"| {name} | {r['median']:.2f} s | {r['min']:.2f}-{r['max']:.2f} s |")
                else:
                    p = r["paired"]
                    target = f" (target <= {TARGET_KIND_RATIO})" if part == "kinds" else ""
                    ratio = f"{r['ratio_of_medians']:.3f}{target}"
                    out.append(f"| {name} | {ratio} | paired {p['min']:.3f}-{p['max']:.3f} |")
    if "overhead" in results:
        o = results["overhead"]
        md = o["model"]
        out += [
            f"\n## Per-trial overhead (quick-start d32 pack of {o['pack']}; medians of repeats)",
            "",
            "| component | median | min-max |",
            "|---|---|---|",
        ]
        for k, v in o.items():
            if isinstance(v, dict) and "median" in v:
                out.append(f"| {k} | {v['median'] * 1e3:.1f} ms | {v['min'] * 1e3:.1f}-{v['max'] * 1e3:.1f} ms |")
        out += [
            f"\nmodel of one pack ({md['members']} members, {md['evaluations']} evaluations, "
            f"bare {md['bare_pack_s']:.1f} s):",
            *[f"- {k}: {v:.2f} s" for k, v in md["parts_s"].items()],
            f"modelled overhead ratio before {md['ratio_before']:.3f}, now {md['ratio_now']:.3f}",
        ]
    if "context" in results:
        c = results["context"]
        out += [
            f"\n## A pack of {c['members']} in a plain process, a Ray task, a Tune trainable ({c['shape']})",
            "",
            "| where | median s | min-max s | vs plain |",
            "|---|---|---|---|",
            *[
                f"| {k} | {r['median']:.2f} | {r['min']:.2f}-{r['max']:.2f} | {r['vs_plain']:.3f}x |"
                for k, r in c["rows"].items()
            ],
        ]
    if "trial" in results:
        t = results["trial"]
        o = t["overhead_per_pack"]
        out += [
            "\n## Per-trial overhead with a core to spare (each quick-start pack a study of its own, paired bare)",
            "",
            "| pack | bare s | in its trainable s | ratio |",
            "|---|---|---|---|",
            *[f"| {p['pack']} | {p['bare_s']:.2f} | {p['trained_s']:.2f} | {p['ratio']:.3f} |" for p in t["pairs"]],
            f"\nper-pack overhead: median {o['median']:.3f} (95% interval {o['ci95_median'][0]:.3f}-"
            f"{o['ci95_median'][1]:.3f}), range {o['min']:.3f}-{o['max']:.3f} (target <= {TARGET_OVERHEAD})",
        ]
    if "study" in results:
        s = results["study"]
        out += [
            "\n## Quick-start study end to end",
            f"packed (auto) wall: {s['walls']['auto']['runs']} s, median {s['walls']['auto']['median']:.1f} s",
            f"unpacked (off) wall: {s['walls']['off']['runs']} s, median {s['walls']['off']['median']:.1f} s",
            f"speed-up {s['speedup']:.2f}x (target >= {TARGET_SPEEDUP}); same outcomes per trial: {s['same_outcomes']}",
            *(
                [
                    f"a worker process per Tune trial: packed {s['walls']['auto_fresh']['runs']} s, unpacked "
                    f"{s['walls']['off_fresh']['runs']} s; reused workers make packed {s['reuse_gain']['auto']:.2f}x "
                    f"and unpacked {s['reuse_gain']['off']:.2f}x faster; packed (reused) vs unpacked (fresh) "
                    f"{s['speedup_vs_fresh_unpacked']:.2f}x"
                ]
                if s.get("speedup_vs_fresh_unpacked")
                else []
            ),
            f"bare packs on the study's workers: wall {s['walls']['bare']['runs']} s, median {s['bare_wall_s']:.1f} s",
            f"packs {s['packs']}, each bare {[[round(x, 1) for x in r] for r in s['bare_pack_s']]} s",
            f"5-min load at the end of each run: {json.dumps({k: v['load5_at_end'] for k, v in s['walls'].items()})}",
            f"overhead (packed study wall / bare) {s['overhead']:.2f} (target <= {TARGET_OVERHEAD})",
            f"driver phases, packed: {s['timings']['auto']}",
            "CPU-s by process (medians): "
            + "; ".join(
                f"{k}: " + ", ".join(f"{c} {v:.1f}" for c, v in row.items()) for k, row in s["cpu_by_process"].items()
            ),
            f"driver phases, unpacked: {s['timings']['off']}",
            f"per-trial overhead (Tune run of the packed study / bare packs on its workers): median "
            f"{s['overhead_fit']['median']:.3f}, runs {[round(x, 3) for x in s['overhead_fit']['runs']]}",
            f"per-pack overhead (wall inside the trainable / the same pack bare): median "
            f"{s['overhead_per_pack']['median']:.3f}, range {s['overhead_per_pack']['min']:.3f}-"
            f"{s['overhead_per_pack']['max']:.3f}",
        ]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_packing", description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts of {list(PARTS)}")
    p.add_argument("--size", type=int, default=1, help="quick-start model size index (0: d16 l1, 1: d32 l2)")
    p.add_argument("--steps", type=int, default=50, help="training steps timed per case (one evaluation at the end)")
    p.add_argument("--pack-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--form-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8])
    p.add_argument(
        "--twin-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4, 8, 16],
        help="twins part: seeds per probe (each kind's members in a pack apart)",
    )
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions per case")
    p.add_argument("--overhead-steps", type=int, default=200, help="steps of the bare pack in the overhead part")
    p.add_argument("--overhead-reps", type=int, default=3, help="repetitions of the slow overhead components")
    p.add_argument("--context-steps", type=int, default=400, help="steps of the pack in the context part")
    p.add_argument("--study-reps", type=int, default=2, help="quick-start runs per setting (alternating)")
    p.add_argument(
        "--fresh-workers",
        action="store_true",
        help="study part: also run packed and unpacked with a new worker process per Tune trial",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trial gets one)")
    p.add_argument(
        "--device", default="cpu", help="throughput, forms, kinds and twins parts: where the trials train (cpu, cuda)"
    )
    p.add_argument(
        "--solo-procs",
        type=int,
        default=1,
        help="throughput part: also time this many processes training one solo trial each at once",
    )
    p.add_argument("--write-shapes", action="store_true", help=f"rewrite {SHAPES.name} from the spec and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; known: {list(PARTS)}")
    if args.write_shapes:
        write_shapes()
        print(f"wrote {SHAPES}")
        return 0
    results: dict[str, Any] = {
        "machine_start": machine(args.device),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for part in parts:
        results[part] = PARTS[part](args)
        print(f"[{part} done]", file=sys.stderr, flush=True)
        if args.json:  # a later part that fails leaves the earlier ones on disk
            args.json.write_text(json.dumps(results, indent=2, default=str))
    results["machine_end"] = machine(args.device)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
