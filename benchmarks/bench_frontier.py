"""Boundary search vs full grid: the same determined frontier for a fraction of the CPU-seconds?

Three ladders from simulated truths (P(solved) per kind, size and rung; one ladder has a hole),
each run twice on the same simulated trials: the grid runs every (kind, size, rung, seed), the
``frontier`` search (``workers.search.FrontierSearch``) decides what to run, driven as Ray
Tune drives it (``--concurrency`` trials in flight). A trial's outcome and cost depend only on
its (kind, size, rung, seed, salt), so both searches see the same data. A solved trial costs
its steps-to-solve, an unsolved one the whole budget (stop-when-solved), times a per-size
step cost. That is the ``solo`` cost (every trial as if alone on a worker). The ``packed`` cost
(``--cost``) sees what packing does: the grid is packed as the driver packs it (``plan_packs``,
at most 32 members), the search is driven through ``PackSearch`` (one pack per worker, members
reported as they finish) without and with ``fill_packs``, and a member-step costs more the
smaller its pack (``PACK_COSTS_MS``, calibrated on the measured table in docs/benchmarks.md;
``pack_costs``). Both trial sets go through ``build_report``; we compare the determined frontiers,
count cells decided with confidence in opposite ways (must be 0) and take the CPU-s ratio.
``--repeats`` salts give medians. ``--real SPEC`` also runs a real study both ways on local
Ray, each in its own driver process (``--grid-study DIR`` reuses a finished grid study of the same
spec instead of running it); ``--replay STUDY_DIR`` runs the search on a finished
real grid study's recorded trials (each trial the search asks for is the recorded one).

    .venv/bin/python -m benchmarks.bench_frontier --repeats 20
    .venv/bin/python -m benchmarks.bench_frontier --repeats 60 --cost packed --sim-seeds 4
    .venv/bin/python -m benchmarks.bench_frontier --repeats 0 --real studies/quickstart.yaml --seeds 4 --keep DIR
    .venv/bin/python -m benchmarks.bench_frontier --repeats 0 --replay ladder-data/studies/quickstart-1a2b3c4d
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import heapq
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from studies.records import TrialRecord, read_records
from studies.report import Report, build_report
from studies.spec import StudySpec
from workers.callbacks import fixed_config
from workers.pack_search import PackSearch
from workers.packing import max_members, plan_packs
from workers.search import FrontierSearch, grid_cells

RUNGS = [[[5, 1]], [[7, 1]], [[7, 2]], [[11, 2]], [[13, 2]], [[13, 3]], [[17, 3]], [[19, 4]], [[23, 4]], [[29, 4]]]
SIZES = [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2}]
SIZES3 = [*SIZES, {"d_model": 64, "n_layers": 2, "n_heads": 4}]
MAX_STEPS = 2000


@dataclass(frozen=True)
class Ladder:
    """A simulated truth: P(solved) per (kind, size index, rung)."""

    name: str
    spec: StudySpec
    p: Callable[[str, int, int], float]


def _spec(name: str, sizes: list[dict[str, int]], kinds: list[str], rungs: list[Any] = RUNGS) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": name,
            "attention": kinds,
            "task": {"ladder": rungs},
            "model": {"sizes": sizes},
            "seeds": list(range(8)),
            "training": {"max_steps": MAX_STEPS, "eval_interval": 100, "context_length": 16},
            "search": {"method": "frontier"},
            "caps": {"max_trials": 10_000},
        }
    )


def _step(boundary: int, rung: int, sharp: float = 0.97) -> float:
    return sharp if rung <= boundary else 1 - sharp


# The real quick-start's five rungs (studies/quickstart.yaml) and, per (kind, size index), how many of
# eight seeds solved each at 800 steps in a real grid study on the ten-rung ladder that contains them
# (benchmarks/frontier10.yaml, docs/benchmarks.md "A real ten-rung ladder"): one frontier determined,
# three lanes left open by a rung near 0.5 (dpa d16 at N23_T4, ea d16 at N7_T2, ea d32 at N13_T4).
QUICKSTART_RUNGS = [[[7, 2]], [[13, 2]], [[13, 4]], [[23, 4]], [[31, 6]]]
QUICKSTART_SOLVED_OF_8 = {
    ("dpa", 0): (8, 7, 8, 5, 0),
    ("dpa", 1): (8, 7, 8, 0, 0),
    ("ea", 0): (5, 6, 6, 2, 0),
    ("ea", 1): (8, 8, 3, 0, 0),
}
LADDERS = [
    Ladder(  # clear boundaries; ea one rung ahead at the small size
        "monotone",
        _spec("monotone", SIZES, ["dpa", "ea"]),
        lambda k, s, r: _step({("dpa", 0): 2, ("ea", 0): 3, ("dpa", 1): 6, ("ea", 1): 6}[(k, s)], r),
    ),
    Ladder(  # three kinds, three sizes, a rung at P = 0.5 right at each boundary
        "noisy",
        _spec("noisy", SIZES3, ["dpa", "ea", "ea_norm"]),
        lambda k, s, r: 0.5 if r == 1 + 2 * s + (k == "ea_norm") else _step(2 * s + (k == "ea_norm"), r, 0.95),
    ),
    Ladder(  # like N16_T4 unsolved but N16_T8 solved: a hole at rung 3 for every kind and size
        "non-monotone",
        _spec("nonmono", SIZES, ["dpa", "ea"]),
        lambda k, s, r: (
            0.03 if r == 3 else _step({("dpa", 0): 5, ("ea", 0): 6, ("dpa", 1): 7, ("ea", 1): 8}[(k, s)], r)
        ),
    ),
    Ladder(  # the real quick-start's five rungs, P(solved) as its seeds solved them for real
        "quickstart-like",
        _spec("quickstart", SIZES, ["dpa", "ea"], QUICKSTART_RUNGS),
        lambda k, s, r: QUICKSTART_SOLVED_OF_8[(k, s)][r] / 8,
    ),
]


def _u(*key: Any) -> float:
    """A uniform number fixed by the key: the same trial gives the same outcome in both searches."""
    return int(hashlib.sha256(repr(key).encode()).hexdigest()[:12], 16) / 16**12


def step_cost(size_idx: int) -> float:
    """CPU-s per training step of a trial trained alone (a pack of one): bigger models cost more."""
    return 2e-3 * (1 + size_idx)


# Per-member-step cost by pack size, measured (docs/benchmarks.md, "Throughput by pack size": the
# quick-start's d32 shape on the 2-core box, ms per member-step), two calibrations (``--pack-cost``):
# "loaded", at load average 12-36 (Intel Xeon): a pack of 1 448.3, of 8 186.4, of 32 145.3, of 64 163.0;
# "quiet", at load average below 1.4 (AMD EPYC, 2026-12-01): 13.40, 7.86, 8.07, 8.67. Between the
# measured sizes the cost is interpolated linearly in log(pack size). The same relative curve is
# applied to every simulated model size (only d32 was measured).
Curve = tuple[tuple[int, float], ...]  # (pack size, ms per member-step), by rising pack size
PACK_COSTS_MS: dict[str, Curve] = {
    "loaded": ((1, 448.3), (8, 186.4), (32, 145.3), (64, 163.0)),
    "quiet": ((1, 13.40), (8, 7.86), (32, 8.07), (64, 8.67)),
}
LOADED = PACK_COSTS_MS["loaded"]  # the default calibration


def member_step_factor(n: int, curve: Curve = LOADED) -> float:
    """A member-step's cost in a pack of ``n`` members training, relative to a pack of one."""
    if n <= 1:
        return 1.0
    for (n0, c0), (n1, c1) in itertools.pairwise(curve):
        if n <= n1:
            t = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return (c0 + t * (c1 - c0)) / curve[0][1]
    return curve[-1][1] / curve[0][1]


def pack_costs(steps: list[int], cost: float, curve: Curve = LOADED) -> tuple[list[float], list[float]]:
    """Each member's CPU-s and finish time (CPU-s since the pack started) in a pack of members stopping at ``steps``.

    As ``workers.packed.run_pack`` trains a pack: every step trains the members still active (a solved
    member leaves), each member-step costs ``cost`` times ``member_step_factor(active, curve)``, and each step's
    cost is split evenly among the members it trained. One pack runs on one worker, so its wall time
    is its CPU-s.
    """
    share, finish = [0.0] * len(steps), [0.0] * len(steps)
    done = 0
    member = wall = 0.0
    active = len(steps)
    for i in sorted(range(len(steps)), key=steps.__getitem__):
        seg = (steps[i] - done) * cost * member_step_factor(active, curve)
        member, wall, done = member + seg, wall + seg * active, steps[i]
        share[i], finish[i] = member, wall
        active -= 1
    return share, finish


def simulate(ladder: Ladder, cell: dict[str, Any], salt: int) -> TrialRecord:
    rung, size_idx = cell["coords"][0], cell["size_idx"]
    key = (cell["kind"], size_idx, rung, cell["seed"], cell["lr"], salt)
    solved = _u("solved", *key) < ladder.p(cell["kind"], size_idx, rung)
    steps = int(MAX_STEPS * (0.2 + 0.6 * _u("steps", *key))) // 100 * 100 if solved else MAX_STEPS
    return TrialRecord(
        study_id=ladder.name,
        trial_id=f"{cell['kind']}/{size_idx}/{rung}/{cell['seed']}/{cell['lr']}/{_u('id', *key):.12f}",
        kind=cell["kind"],
        **cell["size"],
        point=cell["point"],
        coords=cell["coords"],
        seed=cell["seed"],
        lr=cell["lr"],
        status="solved" if solved else "unsolved",
        eval_acc=1.0 if solved else 0.5,
        steps=steps,
        steps_to_solve=steps if solved else None,
        cpu_s=steps * step_cost(size_idx),
    )


def grid_records(ladder: Ladder, salt: int) -> list[TrialRecord]:
    spec = ladder.spec
    return [simulate(ladder, cell, salt) for cell in grid_cells(spec)]


def search_records(
    spec: StudySpec, oracle: Callable[[dict[str, Any]], TrialRecord], concurrency: int
) -> list[TrialRecord]:
    """Drive the searcher as Tune does: ``concurrency`` trials in flight, the oldest finishes first."""
    search = FrontierSearch(spec)
    running: deque[tuple[str, dict[str, Any]]] = deque()
    out: list[TrialRecord] = []
    n = 0
    while True:
        while len(running) < concurrency:
            got = search.suggest(f"t{n}")
            if got is None or got == Searcher.FINISHED:
                break
            running.append((f"t{n}", got["cell"]))
            n += 1
        if not running:
            return out
        trial_id, cell = running.popleft()
        rec = oracle(cell)
        out.append(rec)
        search.on_trial_complete(trial_id, {"final": True, "status": rec.status})


def _member(rec: TrialRecord, cpu_s: float) -> TrialRecord:
    return rec.model_copy(update={"cpu_s": cpu_s})


def packed_grid_records(ladder: Ladder, salt: int, concurrency: int, curve: Curve = LOADED) -> list[TrialRecord]:
    """The grid as the driver packs it (``plan_packs``, at most ``max_members`` per pack), costed per pack size."""
    spec = ladder.spec
    out: list[TrialRecord] = []
    for pack in plan_packs(grid_cells(spec), max_members(spec), fixed_config(spec), concurrency):
        recs = [simulate(ladder, c, salt) for c in pack]
        share, _ = pack_costs([r.steps for r in recs], step_cost(pack[0]["size_idx"]), curve)
        out += [_member(r, c) for r, c in zip(recs, share, strict=True)]
    return out


def packed_search_records(
    spec: StudySpec,
    oracle: Callable[[dict[str, Any]], TrialRecord],
    concurrency: int,
    search: Any,
    curve: Curve = LOADED,
    mix_kinds: bool = True,
) -> list[TrialRecord]:
    """Drive ``search`` through ``PackSearch`` as Tune does on ``concurrency`` workers, one pack per worker.

    Time is CPU-s (a pack's wall time is its CPU-s, ``pack_costs``). A member's record reaches the
    searcher when it finishes (solved members leave their pack early); a worker asks for the next pack
    when its pack's last member has finished.
    """
    limit = max_members(spec)
    packer = PackSearch(search, fixed_config(spec), limit, limit * len(spec.attention), mix_kinds)
    events: list[tuple[float, int, str, int]] = []  # (time, tie-break, pack trial id, member index)
    members: dict[str, list[TrialRecord]] = {}
    left: dict[str, int] = {}
    out: list[TrialRecord] = []
    now, n, seq = 0.0, 0, 0
    while True:
        while len(left) < concurrency:
            got = packer.suggest(f"p{n}")
            if got is None or got == Searcher.FINISHED:
                break
            tid, pack = f"p{n}", got["pack"]
            n += 1
            recs = [oracle(c) for c in pack]
            share, finish = pack_costs([r.steps for r in recs], step_cost(pack[0]["size_idx"]), curve)
            members[tid], left[tid] = [_member(r, c) for r, c in zip(recs, share, strict=True)], len(pack)
            for i, t in enumerate(finish):
                heapq.heappush(events, (now + t, seq, tid, i))
                seq += 1
        if not events:
            if not packer.inner.done():
                raise RuntimeError("the search stalled: nothing running, nothing handed out, not done")
            return out
        now, _, tid, i = heapq.heappop(events)
        rec = members[tid][i]
        out.append(rec)
        final = {"status": rec.status, "solved": rec.status == "solved", "eval_acc": rec.eval_acc}
        packer.on_trial_result(tid, {"finals": {str(i): final}})
        left[tid] -= 1
        if not left[tid]:
            del left[tid], members[tid]
            packer.on_trial_complete(tid, {})


def compare(grid: Report, search: Report) -> dict[str, Any]:
    """Determined frontiers that agree, and cells decided with confidence in opposite ways."""
    agree = total = 0
    for g in grid.frontier:
        s = search.frontier_of(g.kind, g.size)
        if g.determined:
            total += 1
            agree += s.determined and s.highest_rung == g.highest_rung
    decided = {"solved", "unsolved"}
    contradictions = sum({c.state, search.cell(c.kind, c.size, c.point).state} == decided for c in grid.cells)
    # the share of the grid's CPU-s in the two cells each determined frontier rests on (h and h + 1, every
    # seed the grid ran there): a search that must decide those cells on all seeds cannot spend less
    rests = {
        (f.kind, f.size, rung)
        for f in grid.frontier
        if f.determined
        for rung in ((f.highest_rung if f.highest_rung is not None else -1) + d for d in (0, 1))
    }
    floor = sum(c.cpu_s for c in grid.cells if (c.kind, c.size, c.coords[0]) in rests)
    return {
        "frontier_cells_share": floor / max(1e-9, grid.compute.cpu_s),
        "determined_in_grid": total,
        "same_in_search": agree,
        "cells_decided_grid": sum(c.state in decided for c in grid.cells),
        "cells_decided_search": sum(c.state in decided for c in search.cells),
        "contradictions": contradictions,
    }


def versus(spec: StudySpec, grid: list[TrialRecord], search: list[TrialRecord]) -> dict[str, Any]:
    """The search's trials against the grid's: trial counts, CPU-s ratio and ``compare`` of their reports."""
    ratio = sum(r.cpu_s for r in search) / max(1e-9, sum(r.cpu_s for r in grid))
    cmp = compare(build_report(spec, grid), build_report(spec, search))
    return {"trials_grid": len(grid), "trials_search": len(search), "cpu_ratio": ratio, **cmp}


def run_simulated(ladder: Ladder, salt: int, concurrency: int) -> dict[str, Any]:
    """Unpacked: every trial costs what it would alone (the grid and the search one trial per worker)."""
    g = grid_records(ladder, salt)
    s = search_records(ladder.spec, lambda cell: simulate(ladder, cell, salt), concurrency)
    return versus(ladder.spec, g, s)


MODES = {
    "solo": "solo cost (every trial as if alone on a worker)",
    "packed": "packed cost (grid packed as the driver packs it; search through PackSearch)",
    "packed+fill": "packed cost, search with fill_packs",
}


def run_packed(
    ladder: Ladder, salt: int, concurrency: int, fill_packs: bool, curve: Curve = LOADED, mix_kinds: bool = True
) -> dict[str, Any]:
    """Packed: the grid packed as the driver packs it, the search through ``PackSearch``; costs by pack size."""
    g = packed_grid_records(ladder, salt, concurrency, curve)
    search = FrontierSearch(ladder.spec, fill_packs=fill_packs)
    s = packed_search_records(
        ladder.spec, lambda cell: simulate(ladder, cell, salt), concurrency, search, curve, mix_kinds
    )
    return versus(ladder.spec, g, s)


# --- a real study on local Ray --------------------------------------------------------------


def run_real(spec: StudySpec, method: str, data_dir: Path) -> list[TrialRecord]:
    s = StudySpec.model_validate(spec.model_dump() | {"search": spec.search.model_dump() | {"method": method}})
    env = dict(os.environ, LADDER_DATA_DIR=str(data_dir), MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    code = (
        "import sys; from studies.spec import StudySpec; from studies.studydir import prepare_study; "
        "from workers.driver import run_study; "
        "spec = StudySpec.model_validate_json(sys.stdin.read()); sid = prepare_study(spec); "
        "print('STUDY', sid, run_study(sid))"
    )
    load, t0 = os.getloadavg()[0], time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], input=s.to_json(), env=env, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("STUDY ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    print(
        f"  {method}: study {line.split()[1]} in {data_dir}, {time.monotonic() - t0:.0f} s wall, "
        f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        flush=True,
    )
    return read_records(data_dir / "studies" / line.split()[1] / "trials.jsonl")


def _study_records(study_dir: str) -> list[TrialRecord]:
    return read_records(Path(study_dir) / "trials.jsonl")


def replay(study_dir: Path, concurrency: int) -> dict[str, Any]:
    """The search on a real grid study's own trials: each trial it asks for is the recorded one
    (same seed, same outcome, same CPU-s), so no trial has to run again."""
    spec = StudySpec.model_validate_json((study_dir / "spec.json").read_text())
    grid = read_records(study_dir / "trials.jsonl")
    by_key = {(r.kind, r.size_name, r.point, r.seed, r.lr): r for r in grid}

    def oracle(cell: dict[str, Any]) -> TrialRecord:
        s = cell["size"]
        return by_key[
            (cell["kind"], f"d{s['d_model']}_l{s['n_layers']}_h{s['n_heads']}", cell["point"], cell["seed"], cell["lr"])
        ]

    found = search_records(spec, oracle, concurrency)
    return versus(spec, grid, found)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeats", type=int, default=20, help="salts per simulated ladder (medians over them)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument(
        "--cost",
        choices=["solo", "packed", "both"],
        default="both",
        help="simulated cost: every trial alone (solo); packed as the driver packs, per-member-step cost by pack "
        "size, the search without and with fill_packs (packed); both",
    )
    p.add_argument("--sim-seeds", type=int, help="simulated ladders: seeds 0..N-1 instead of 8")
    p.add_argument(
        "--pack-cost",
        choices=sorted(PACK_COSTS_MS),
        default="loaded",
        help="--cost packed: the per-member-step cost calibration by pack size (measured loaded or quiet)",
    )
    p.add_argument(
        "--kinds-apart",
        action="store_true",
        help="--cost packed: the search packs DPA and EA apart, as before they could share a pack",
    )
    p.add_argument("--real", help="also run this spec for real (grid, then frontier) on local Ray")
    p.add_argument("--seeds", type=int, help="--real: run the spec with seeds 0..N-1 instead of its own")
    p.add_argument("--keep", help="--real: keep both studies' data directories under this directory")
    p.add_argument(
        "--grid-study", help="--real: a finished grid study directory of the same spec, instead of running it"
    )
    p.add_argument("--replay", help="a finished grid study directory: run the search on its recorded trials")
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args()
    curve = PACK_COSTS_MS[args.pack_cost]
    raw: dict[str, Any] = {}
    modes = {"solo": ["solo"], "packed": ["packed", "packed+fill"], "both": ["solo", "packed", "packed+fill"]}
    for mode in modes[args.cost] if args.repeats else []:
        print(f"\nsimulated ladders, {MODES[mode]}, {args.repeats} salts each, concurrency {args.concurrency}")
        print(
            "| ladder | kinds x sizes x rungs x seeds | grid trials | search trials (median) | CPU-s search/grid "
            "(median, max) | determined frontiers found | contradictions |"
        )
        print("|---|---|---|---|---|---|---|")
        for ladder in LADDERS:
            if args.sim_seeds:
                seeds = list(range(args.sim_seeds))
                ladder = dataclasses.replace(ladder, spec=ladder.spec.model_copy(update={"seeds": seeds}))
            if mode == "solo":
                runs = [run_simulated(ladder, salt, args.concurrency) for salt in range(args.repeats)]
            else:
                fill = mode == "packed+fill"
                mix = not args.kinds_apart
                runs = [run_packed(ladder, salt, args.concurrency, fill, curve, mix) for salt in range(args.repeats)]
            raw.setdefault(mode, {})[ladder.name] = runs
            spec = ladder.spec
            shape = (
                f"{len(spec.attention)} x {len(spec.model.all_sizes())} x {len(spec.task.points())} x {len(spec.seeds)}"
            )
            ratios = [r["cpu_ratio"] for r in runs]
            found = sum(r["same_in_search"] for r in runs)
            total = sum(r["determined_in_grid"] for r in runs)
            print(
                f"| {ladder.name} | {shape} | {runs[0]['trials_grid']} | "
                f"{statistics.median(r['trials_search'] for r in runs):.0f} | "
                f"{statistics.median(ratios):.3f}, {max(ratios):.2f} | {found}/{total} | "
                f"{sum(r['contradictions'] for r in runs)} |",
                flush=True,
            )
    if args.real:
        spec = StudySpec.from_file(args.real)
        if args.seeds:
            spec = StudySpec.model_validate(spec.model_dump() | {"seeds": list(range(args.seeds))})
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(args.keep or tmp)
            g = _study_records(args.grid_study) if args.grid_study else run_real(spec, "grid", d / "grid")
            s = run_real(spec, "frontier", d / "frontier")
        raw["real"] = versus(spec, g, s)
        print(f"\nreal {args.real}: {json.dumps(raw['real'])}")
    if args.replay:
        raw["replay"] = replay(Path(args.replay), args.concurrency)
        print(f"\nreplay of {args.replay}: {json.dumps(raw['replay'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
