"""Training-step time of the attention kinds, side by side (DPA vs EA vs EA-norm).

For each model size, one ``workers.model.Transformer`` per attention kind is built from the
same init seed, with its own AdamW optimizer, and fed the same NT batches. One training step
is the step of ``workers.trial.run_trial``: forward, masked cross-entropy, ``float(loss)``,
zero_grad, backward, gradient clipping, optimizer step.

After warm-up steps, every repetition times one block of steps per kind, the kinds in a
freshly shuffled order, so machine noise (other processes, frequency changes) hits all kinds
alike. Per kind and size the report gives the median step time over the repetitions with its
interquartile range (IQR), and the ratio of each kind to the baseline (DPA): the ratio of the
medians, with the IQR of the per-repetition ratios (each kind against the baseline block of the
same repetition) as its spread.

Run ``python -m benchmarks.bench_attention --help``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workers.attention import ATTENTION_KINDS
from workers.model import ModelConfig, Transformer
from workers.tasks import NTStream, nt_family

TARGET_RATIO = 1.05  # EA may cost at most 5% more training-step time than DPA


@dataclass(frozen=True)
class Size:
    """A model size and the shape of its training batches."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int
    batch: int

    @property
    def name(self) -> str:
        return f"d{self.d_model}"


SIZES: dict[str, Size] = {
    s.name: s
    for s in (
        Size(d_model=32, n_layers=2, n_heads=2, context=32, batch=64),
        Size(d_model=64, n_layers=2, n_heads=4, context=64, batch=64),
        Size(d_model=128, n_layers=4, n_heads=4, context=128, batch=32),
        Size(d_model=256, n_layers=4, n_heads=8, context=128, batch=32),
    )
}
QUICK_SIZES = ("d32", "d64", "d128")


@dataclass(frozen=True)
class Settings:
    kinds: tuple[str, ...]
    baseline: str
    reps: int
    warmup: int
    block_s: float
    seed: int
    lr: float
    grad_clip: float
    task_n: int
    task_t: int
    n_batches: int
    target: float


@dataclass
class _Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor


class _Trainer:
    """One model and optimizer of one attention kind, stepping through a shared batch pool."""

    def __init__(self, size: Size, kind: str, st: Settings, device: torch.device, batches: Sequence[_Batch]) -> None:
        cfg = ModelConfig(
            vocab_size=st.task_n,
            context_length=size.context,
            d_model=size.d_model,
            n_layers=size.n_layers,
            n_heads=size.n_heads,
            attention=kind,
        )
        torch.manual_seed(st.seed)  # same init for every kind: the kind has no parameters of its own
        self.model = Transformer(cfg).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=st.lr, weight_decay=0.0)
        self.grad_clip = st.grad_clip
        self.batches = batches
        self.i = 0
        self.last_loss = float("nan")

    def step(self) -> None:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        logits = self.model(b.inputs)
        loss = F.cross_entropy(logits[b.scored], b.targets[b.scored])
        self.last_loss = float(loss.detach())  # run_trial reads the loss every step (a device sync)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()


def pick_device(requested: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: software, device, CPU, threads, load."""
    affinity = getattr(os, "sched_getaffinity", None)
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.version.cuda,
        "git": _git_sha(),
    }
    if hasattr(os, "getloadavg"):
        env["load_avg_1_5_15_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return env


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _make_batches(size: Size, st: Settings, device: torch.device) -> list[_Batch]:
    stream = NTStream(nt_family([(st.task_n, st.task_t)]), size.context, st.seed, "train")
    out = []
    for _ in range(st.n_batches):
        b = stream.batch(size.batch)
        out.append(_Batch(b.inputs.to(device), b.targets.to(device), b.scored.to(device)))
    return out


CLOCKS = ("wall", "cpu")  # elapsed time, and this process's CPU time (all its threads)


def _time_block(trainer: _Trainer, steps: int, sync: Callable[[], None]) -> dict[str, float]:
    """Seconds per training step over ``steps`` consecutive steps, on each clock."""
    sync()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.step()
    sync()
    return {"wall": (time.perf_counter() - wall0) / steps, "cpu": (time.process_time() - cpu0) / steps}


def _summarise(samples: dict[str, list[float]], baseline: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per kind: median and quartiles (ms); per other kind: ratio of medians and quartiles of paired ratios."""
    stats: dict[str, Any] = {}
    for kind, xs in samples.items():
        q1, med, q3 = _quartiles(xs)
        stats[kind] = {
            "median_ms": med * 1e3,
            "q1_ms": q1 * 1e3,
            "q3_ms": q3 * 1e3,
            "samples_ms": [x * 1e3 for x in xs],
        }
    ratios: dict[str, Any] = {}
    for kind, xs in samples.items():
        if kind == baseline:
            continue
        p1, pmed, p3 = _quartiles([x / b for x, b in zip(xs, samples[baseline], strict=True)])
        ratios[kind] = {
            "ratio_of_medians": stats[kind]["median_ms"] / stats[baseline]["median_ms"],
            "paired_median": pmed,
            "paired_q1": p1,
            "paired_q3": p3,
        }
    return stats, ratios


def bench_size(size: Size, st: Settings, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Time every kind at one size, interleaved; return medians, IQRs, ratios and raw samples per clock."""
    sync = _synchronizer(device)
    batches = _make_batches(size, st, device)
    trainers = {kind: _Trainer(size, kind, st, device, batches) for kind in st.kinds}
    first = trainers[st.kinds[0]].model.state_dict()
    same_init = all(
        all(torch.equal(first[name], p) for name, p in t.model.state_dict().items()) for t in trainers.values()
    )
    if not same_init:
        raise RuntimeError(f"{size.name}: the kinds' models do not start from the same parameters")
    rng = random.Random(f"{st.seed}-{size.name}")

    warm: list[float] = []
    for _ in range(st.warmup):
        kinds = list(st.kinds)
        rng.shuffle(kinds)
        for kind in kinds:
            warm.append(_time_block(trainers[kind], 1, sync)["wall"])
    # Steps per block from the fastest warm-up step after the first round (which pays one-off costs):
    # the least disturbed estimate on a busy machine. The same count for every kind.
    settled = warm[len(st.kinds) :] or warm
    steps = max(1, round(st.block_s / min(settled)))

    samples: dict[str, dict[str, list[float]]] = {clock: {kind: [] for kind in st.kinds} for clock in CLOCKS}
    orders: list[list[str]] = []
    gc_was_enabled = gc.isenabled()
    try:
        for _ in range(st.reps):
            kinds = list(st.kinds)
            rng.shuffle(kinds)
            orders.append(kinds)
            for kind in kinds:
                gc.collect()
                gc.disable()  # no collector pauses inside a timed block
                block = _time_block(trainers[kind], steps, sync)
                if gc_was_enabled:
                    gc.enable()
                for clock in CLOCKS:
                    samples[clock][kind].append(block[clock])
    finally:
        if gc_was_enabled:
            gc.enable()

    out: dict[str, Any] = {
        "size": {"name": size.name, **asdict(size)},
        "n_params": trainers[st.baseline].model.num_parameters(),
        "steps_per_block": steps,
        "warmup_wall_ms": [x * 1e3 for x in warm],
        "orders": orders,
        "final_loss": {kind: t.last_loss if math.isfinite(t.last_loss) else None for kind, t in trainers.items()},
    }
    for clock in CLOCKS:
        out[clock], out[f"{clock}_ratios"] = _summarise(samples[clock], st.baseline)
    log(
        f"{size.name}: {out['n_params']} params, {steps} steps/block x {st.reps} reps; median wall "
        + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in out["wall"].items())
    )
    return out


def _fmt_ms(k: dict[str, Any]) -> str:
    return f"{k['median_ms']:.2f} [{k['q1_ms']:.2f}-{k['q3_ms']:.2f}]"


def _fmt_ratio(r: dict[str, Any]) -> str:
    return f"**{r['ratio_of_medians']:.3f}** [{r['paired_q1']:.3f}-{r['paired_q3']:.3f}]"


def _table(report: dict[str, Any], clock: str) -> list[str]:
    st = report["settings"]
    kinds, base = st["kinds"], st["baseline"]
    others = [k for k in kinds if k != base]
    head = ["size", "params", "d_model/layers/heads", "context", "batch", "steps/block"]
    head += [f"{k} ms" for k in kinds] + [f"{k}/{base}" for k in others]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in report["results"]:
        s = r["size"]
        row = [s["name"], f"{r['n_params']:,}", f"{s['d_model']}/{s['n_layers']}/{s['n_heads']}"]
        row += [str(s["context"]), str(s["batch"]), str(r["steps_per_block"])]
        row += [_fmt_ms(r[clock][k]) for k in kinds] + [_fmt_ratio(r[f"{clock}_ratios"][k]) for k in others]
        lines.append("| " + " | ".join(row) + " |")
    if "ea" in others:
        ratio = {r["size"]["name"]: r[f"{clock}_ratios"]["ea"]["ratio_of_medians"] for r in report["results"]}
        ok = [name for name, x in ratio.items() if x <= st["target"]]
        bad = [name for name, x in ratio.items() if x > st["target"]]
        lines += [
            "",
            f"Target ea/{base} <= {st['target']} ({clock}): met at {ok or 'no size'}; not met at {bad or 'no size'}.",
        ]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: environment, settings, a table per clock (one row per size), the verdicts."""
    env, st = report["environment"], report["settings"]
    lines = [
        "## Attention kinds: training-step time",
        "",
        f"- device: `{env['device']}` ({env['device_name']}); CPU: {env['cpu_model']}, "
        f"{env['usable_cpus']} usable of {env['logical_cpus']} logical CPUs; torch threads: {env['torch_threads']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, {env['platform']}, git {env['git']}",
        f"- load average (1/5/15 min) at start: {env.get('load_avg_1_5_15_at_start')}, "
        f"at end: {report.get('load_avg_1_5_15_at_end')}",
        f"- {st['reps']} repetitions x one block of ~{st['block_s']} s per kind, kinds shuffled in each repetition, "
        f"after {st['warmup']} warm-up steps per kind; task NT N={st['task_n']} T={st['task_t']}, "
        f"AdamW lr={st['lr']}, clip={st['grad_clip']}, seed={st['seed']}; wall time {report['wall_s']:.0f} s, "
        f"process CPU time {report['process_cpu_s']:.0f} s",
        f"- cells: median ms per training step [interquartile range over repetitions]; ratios: "
        f"median(kind) / median({st['baseline']}) [interquartile range of the per-repetition paired ratios]",
        "",
        "### Wall-clock time per step",
        "",
        *_table(report, "wall"),
    ]
    if env["device"] == "cpu":
        lines += [
            "",
            "### Process CPU time per step",
            "",
            "CPU time (all threads of this process) is not inflated by time spent descheduled, so it is the steadier "
            "measure on a shared machine; it still includes cache and memory-bandwidth contention.",
            "",
            *_table(report, "cpu"),
        ]
    busy = _busy_note(env, report.get("load_avg_1_5_15_at_end"))
    if busy:
        lines += ["", busy]
    return "\n".join(lines) + "\n"


def _busy_note(env: dict[str, Any], load_end: list[float] | None) -> str | None:
    """A warning when other work shared the machine (the 1-min load average counts it)."""
    loads = []  # load from other work: at the start, and at the end less this run's own threads
    if env.get("load_avg_1_5_15_at_start"):
        loads.append(env["load_avg_1_5_15_at_start"][0])
    if load_end:
        loads.append(load_end[0] - env["torch_threads"])
    if env["device"] != "cpu" or not loads or max(loads) < 0.5:
        return None
    note = (
        f"Note: other work shared the machine (1-min load average from other processes up to about "
        f"{max(loads):.1f} on {env['usable_cpus']} CPUs); interleaving and medians spread that noise "
        "evenly across kinds, but absolute times are inflated."
    )
    if env["torch_threads"] > 1:
        note += " With other work running, multi-threaded steps can stall at thread barriers: try --threads 1."
    return note


def parse_task(text: str) -> tuple[int, int]:
    try:
        n, t = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,T, got {text!r}") from None
    return n, t


def parse_size(text: str) -> Size:
    try:
        d, layers, heads, context, batch = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected D_MODEL,LAYERS,HEADS,CONTEXT,BATCH, got {text!r}") from None
    return Size(d, layers, heads, context, batch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_attention",
        description="Time a full training step (forward, backward, AdamW step) of the same Transformer with "
        "each attention kind, interleaved, and report median step times and the ratios to DPA.",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated preset sizes from {', '.join(SIZES)} (default: all; --quick: {','.join(QUICK_SIZES)})",
    )
    p.add_argument(
        "--size",
        type=parse_size,
        action="append",
        default=[],
        metavar="D,L,H,T,B",
        help="an extra size: d_model,layers,heads,context,batch (repeatable)",
    )
    p.add_argument("--kinds", default=",".join(ATTENTION_KINDS), help="comma-separated attention kinds")
    p.add_argument("--baseline", default="dpa", help="the kind the ratios divide by")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per size (default 15; --quick: 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per kind (default 3; --quick: 2)")
    p.add_argument(
        "--block-s", type=float, default=None, help="target seconds per timed block (default 0.3; --quick: 0.1)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a ~20 s smoke run (fewer sizes, repetitions and steps; too short for firm ratios)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: a Ladder trial gets resources.cpu=1 and Ray then sets "
        "OMP_NUM_THREADS=1; 0 keeps torch's own default)",
    )
    p.add_argument("--seed", type=int, default=0, help="init, data and kind-order seed")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--task", type=parse_task, default=(64, 4), metavar="N,T", help="NT task of the batches (N is the vocabulary)"
    )
    p.add_argument("--target", type=float, default=TARGET_RATIO, help="the ea/dpa ratio to report against")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the full report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ATTENTION_KINDS]
    if unknown or args.baseline not in kinds:
        print(f"kinds must be registered ({', '.join(ATTENTION_KINDS)}) and include the baseline", file=sys.stderr)
        return 2
    names = args.sizes.split(",") if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    if any(n not in SIZES for n in names):
        print(f"unknown size in {names}; presets: {', '.join(SIZES)}", file=sys.stderr)
        return 2
    sizes = [SIZES[n] for n in names] + list(args.size)
    task_n, task_t = args.task
    st = Settings(
        kinds=kinds,
        baseline=args.baseline,
        reps=args.reps if args.reps is not None else (5 if args.quick else 15),
        warmup=args.warmup if args.warmup is not None else (2 if args.quick else 3),
        block_s=args.block_s if args.block_s is not None else (0.1 if args.quick else 0.3),
        seed=args.seed,
        lr=args.lr,
        grad_clip=1.0,
        task_n=task_n,
        task_t=task_t,
        n_batches=4,
        target=args.target,
    )
    if st.reps < 1 or st.warmup < 1 or st.block_s <= 0:
        print("--reps and --warmup must be >= 1, --block-s > 0", file=sys.stderr)
        return 2
    if args.threads < 0:
        print("--threads must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    t0, cpu0 = time.perf_counter(), time.process_time()
    report: dict[str, Any] = {
        "command": [
            Path(sys.executable).name,
            "-m",
            "benchmarks.bench_attention",
            *(argv if argv is not None else sys.argv[1:]),
        ],
        "environment": environment(device),
        "settings": asdict(st),
        "results": [],
    }
    log(f"device {device} ({report['environment']['device_name']}), {torch.get_num_threads()} threads")
    for size in sizes:
        report["results"].append(bench_size(size, st, device, log))
    report["wall_s"] = time.perf_counter() - t0
    report["process_cpu_s"] = time.process_time() - cpu0
    if hasattr(os, "getloadavg"):
        report["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(markdown(report), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
