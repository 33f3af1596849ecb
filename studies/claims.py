"""The paper's four claims, judged from a study's trial records: one verdict per claim and EA reading.

Input is a compact trial CSV (``export_csv`` writes it from a study's ``trials.jsonl``) and the
attention benchmark in ``docs/benchmarks.md`` (claim 1). ``python -m studies.claims`` writes the
CSV (``--export``) and rewrites the generated blocks of ``docs/findings.md``; a test regenerates
the blocks from the committed CSVs and compares, so the document cannot drift from its data.

Rules (stated once, used everywhere):

* The learning rate is tuned per kind and size on the *selection* seeds (most points solved, then
  mean accuracy, then the smaller lr); only *scoring* seeds at that lr count in any verdict.
* A cell (kind, size, point) is solved when the Wilson 95% lower bound of its success rate over the
  scoring seeds is above 0.5, unsolved when the upper bound is below 0.5, else undetermined.
* Paired comparisons (EA reading vs DPA) use the scoring seeds both kinds share, with exact sign
  tests (claims 2 and 3); margins are shown with percentile bootstrap intervals over seeds, which
  are too narrow with few seeds, so no verdict rests on them.
* The budget rule: if DPA's per-seed frontier moves between step b/2 and b at any size, every
  verdict of claims 2-4 reads "at this budget".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from studies.records import OUTCOMES, TrialRecord
from studies.spec import StudySpec
from studies.stats import ALPHA, bootstrap_mean_interval, decide, exact_mcnemar, sign_test, wilson_interval

REFERENCE = "dpa"
READINGS = {"ea": "softmax(s²)", "ea_norm": "s²/Σs²"}
COST_TARGET = 1.05  # claim 1: "no extra compute" read as a step-time ratio within 5%
READER = 0.5  # geometry: a head "reads" key t-T when its mean weight there is at least this
NON_INFERIORITY = 0.1  # claim 2: DPA may win at most this share of pairs (95% upper bound)
TAG = re.compile(r"<!-- claims:([\w-]+):(\w+) -->\n.*?<!-- /claims:\1:\2 -->", re.S)  # dataset, block

# --- the compact trial CSV --------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One trial, as much as the claims need; a row of the compact CSV."""

    study: str
    kind: str
    size: str
    n_params: int
    point: str
    rung: int
    multi: bool
    seed: int
    role: str  # "selection" (tunes the lr) or "scoring" (counts in verdicts)
    lr: float
    setting: str  # the fairness setting (init scale / temperature) as a label; "default" if none
    status: str
    eval_acc: float | None  # on the held-out confirmation set
    eval_acc_lo: float | None  # its Wilson 95% interval (records before nt-3 have none)
    eval_acc_hi: float | None
    steps: int
    steps_to_solve: int | None
    max_steps: int
    cpu_s: float
    gpu_s: float

    @property
    def solved(self) -> bool:
        return self.status == "solved"

    def solved_by(self, budget: int) -> bool:
        """Solved within the first ``budget`` steps (of its ``max_steps`` schedule)."""
        return self.solved and self.steps_to_solve is not None and self.steps_to_solve <= budget


_COLUMNS = [f.name for f in fields(Trial)]


def _setting(rec: TrialRecord) -> str:
    """The trial's fairness setting as a short label: q/k/v init std, and the temperature if not 1."""
    cfg = rec.config if isinstance(getattr(rec, "config", None), dict) else {}
    parts = [f"init {cfg['qkv_init_std']:g}"] if isinstance(cfg.get("qkv_init_std"), int | float) else []
    if isinstance(cfg.get("temperature"), int | float) and cfg["temperature"] != 1:
        parts.append(f"temperature {cfg['temperature']:g}")
    if cfg.get("learn_temperature"):
        parts.append("learned temperature")
    return ", ".join(parts) or "default"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


def trials_from_records(spec: StudySpec, records: Iterable[TrialRecord], selection_seeds: Sequence[int]) -> list[Trial]:
    """Compact trials of a study; ``selection_seeds`` tune the lr, the other seeds score."""
    points = {p.name: p for p in spec.task.points()}
    out = []
    for r in records:
        p = points[r.point]
        out.append(
            Trial(
                study=spec.name,
                kind=r.kind,
                size=r.size_name,
                n_params=r.n_params or 0,
                point=r.point,
                rung=p.coords[0],
                multi=len(p.members) > 1,
                seed=r.seed,
                role="selection" if r.seed in selection_seeds else "scoring",
                lr=r.lr,
                setting=_setting(r),
                status=r.status,
                eval_acc=_round(r.eval_acc),
                eval_acc_lo=_round(getattr(r, "eval_acc_lo", None)),
                eval_acc_hi=_round(getattr(r, "eval_acc_hi", None)),
                steps=r.steps,
                steps_to_solve=r.steps_to_solve,
                max_steps=spec.training.max_steps,
                cpu_s=round(r.cpu_s, 2),
                gpu_s=round(r.gpu_s, 2),
            )
        )
    return sorted(out, key=_order)


def _order(t: Trial) -> tuple[Any, ...]:
    return (t.kind, t.n_params, t.rung, t.seed, t.lr, t.setting, t.study)


def write_csv(trials: Sequence[Trial], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(_COLUMNS)
        for t in trials:
            row = [getattr(t, c) for c in _COLUMNS]
            w.writerow(["" if v is None else int(v) if isinstance(v, bool) else v for v in row])


def read_csv(path: str | Path) -> list[Trial]:
    """Trials of a compact CSV.

    Raises:
        ValueError: if a column is missing or a value does not parse, naming the row.
    """
    conv: dict[str, Callable[[str], Any]] = {
        "n_params": int,
        "rung": int,
        "seed": int,
        "steps": int,
        "max_steps": int,
        "multi": lambda s: s == "1",
        "lr": float,
        "cpu_s": float,
        "gpu_s": float,
        "eval_acc": lambda s: float(s) if s else None,
        "eval_acc_lo": lambda s: float(s) if s else None,
        "eval_acc_hi": lambda s: float(s) if s else None,
        "steps_to_solve": lambda s: int(s) if s else None,
    }
    out = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for i, row in enumerate(reader, start=2):
            try:
                out.append(Trial(**{c: conv.get(c, str)(row[c]) for c in _COLUMNS}))
            except ValueError as e:
                raise ValueError(f"{path}, line {i}: {e}") from None
    return out


# --- statistics -------------------------------------------------------------------------


def mean_ci(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean and its 95% bootstrap interval over units (no interval below two units)."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    ci = bootstrap_mean_interval(values)
    return statistics.fmean(values), ci[0] if ci else None, ci[1] if ci else None


def cell_state(successes: int, n: int) -> str:
    """The report's three-state call (``studies.stats.decide``); undetermined without outcomes."""
    return decide(successes, n) if n else "undetermined"


# --- the analysis -----------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The lr and setting chosen for one (kind, size) on the selection seeds."""

    kind: str
    size: str
    lr: float
    setting: str
    selection_solved: int
    selection_trials: int


def choose(trials: Sequence[Trial]) -> dict[tuple[str, str], Choice]:
    """Per (kind, size): the (lr, setting) that solves most points on the selection seeds.

    Ties go to the higher mean accuracy, then the smaller lr. Without selection seeds every
    (kind, size) must have a single (lr, setting): the study then tuned nothing.

    Raises:
        ValueError: if a (kind, size) has several settings and no selection trials.
    """
    out = {}
    for key in sorted({(t.kind, t.size) for t in trials}):
        mine = [t for t in trials if (t.kind, t.size) == key]
        options = sorted({(t.lr, t.setting) for t in mine})
        sel = [t for t in mine if t.role == "selection" and t.status in OUTCOMES]
        if not sel and len(options) > 1:
            raise ValueError(f"{key}: {len(options)} lr/settings and no selection seeds to choose among them")

        def rank(opt: tuple[float, str], sel: list[Trial] = sel) -> tuple[int, float, float]:
            ts = [t for t in sel if (t.lr, t.setting) == opt]
            accs = [t.eval_acc for t in ts if t.eval_acc is not None]
            return (-sum(t.solved for t in ts), -(statistics.fmean(accs) if accs else 0.0), opt[0])

        best = min(options, key=rank)
        ts = [t for t in sel if (t.lr, t.setting) == best]
        out[key] = Choice(key[0], key[1], best[0], best[1], sum(t.solved for t in ts), len(ts))
    return out


@dataclass
class Study:
    """The scoring trials at the chosen settings, indexed for the analyses."""

    trials: list[Trial]
    choices: dict[tuple[str, str], Choice]
    kinds: list[str]
    sizes: list[str]  # ascending parameter count
    points: list[tuple[int, str, bool]]  # (rung, name, multi) in ladder order
    seeds: list[int]  # scoring seeds
    budget: int

    @classmethod
    def of(cls, trials: Sequence[Trial]) -> Study:
        if not trials:
            raise ValueError("no trials")
        choices = choose(trials)
        scoring = [
            t
            for t in trials
            if t.role == "scoring"
            and (t.lr, t.setting) == (choices[(t.kind, t.size)].lr, choices[(t.kind, t.size)].setting)
        ]
        kinds = sorted({t.kind for t in trials}, key=lambda k: (k != REFERENCE, k))
        sizes = sorted({t.size for t in trials}, key=lambda s: max(t.n_params for t in trials if t.size == s))
        points = sorted({(t.rung, t.point, t.multi) for t in trials})
        return cls(
            scoring, choices, kinds, sizes, points, sorted({t.seed for t in scoring}), max(t.max_steps for t in trials)
        )

    def outcome(self, kind: str, size: str, point: str, seed: int, budget: int | None = None) -> bool | None:
        """Whether that scoring trial solved its point (within ``budget``); None without an outcome."""
        for t in self.trials:
            if (t.kind, t.size, t.point, t.seed) == (kind, size, point, seed) and t.status in OUTCOMES:
                return t.solved_by(budget) if budget is not None else t.solved
        return None

    def cell(self, kind: str, size: str, point: str) -> tuple[int, int]:
        """(successes, outcomes) of one cell over the scoring seeds."""
        outs = [o for s in self.seeds if (o := self.outcome(kind, size, point, s)) is not None]
        return sum(outs), len(outs)

    def highest(self, kind: str, size: str, seed: int, multi: bool, budget: int | None = None) -> int:
        """Highest solved rung of one seed on the single- (or multi-) task ladder; -1 if none."""
        rungs = [r for r, p, m in self.points if m == multi and self.outcome(kind, size, p, seed, budget)]
        return max(rungs, default=-1)

    def complete(self, kinds: Sequence[str], size: str, multi: bool) -> list[int]:
        """Scoring seeds with an outcome at every rung of the ladder for each of ``kinds``: the seeds
        whose highest solved rung is known (a rung not run is not an unsolved rung)."""
        rungs = [p for _, p, m in self.points if m == multi]
        return [s for s in self.seeds if all(self.outcome(k, size, p, s) is not None for k in kinds for p in rungs)]

    def mean_highest(self, kind: str, size: str, multi: bool, budget: int | None = None) -> float | None:
        """Mean over complete seeds of the highest solved rung (None without a complete seed)."""
        seeds = self.complete([kind], size, multi)
        return statistics.fmean(self.highest(kind, size, s, multi, budget) for s in seeds) if seeds else None


def _ladders(study: Study) -> list[bool]:
    return [m for m in (False, True) if any(pm == m for _, _, pm in study.points)]


def budget_moves(study: Study) -> dict[str, bool]:
    """Per size: whether DPA's mean per-seed frontier (every ladder) differs between b/2 and b."""
    out = {}
    for size in study.sizes:
        moved = False
        for multi in _ladders(study):
            moved |= study.mean_highest(REFERENCE, size, multi, study.budget // 2) != study.mean_highest(
                REFERENCE, size, multi
            )
        out[size] = moved
    return out


@dataclass(frozen=True)
class Paired:
    """EA reading vs DPA at one size, paired over scoring seeds and points."""

    kind: str
    size: str
    wins: int  # (point, seed) pairs only the EA reading solved
    losses: int  # pairs only DPA solved
    pairs: int
    p_value: float
    margin: tuple[float, float | None, float | None]  # per-seed solved-points margin: mean, low, high
    rung_margin: tuple[float, float | None, float | None] | None  # per complete seed: frontier margin, rungs
    any_solved: bool

    @property
    def verdict(self) -> str:
        if self.p_value < ALPHA:
            return "EA ahead" if self.wins > self.losses else "DPA ahead"
        return "no detectable difference"


def paired(study: Study, kind: str, size: str) -> Paired:
    wins = losses = pairs = 0
    per_seed, per_seed_rung, any_solved = [], [], False
    for s in study.seeds:
        diff, seen = 0, False
        for _, p, _ in study.points:
            a, b = study.outcome(kind, size, p, s), study.outcome(REFERENCE, size, p, s)
            if a is None or b is None:
                continue
            pairs += 1
            wins += a and not b
            losses += b and not a
            diff += int(a) - int(b)
            any_solved |= a or b
            seen = True
        if seen:
            per_seed.append(float(diff))
        if s in study.complete([kind, REFERENCE], size, False):
            per_seed_rung.append(float(study.highest(kind, size, s, False) - study.highest(REFERENCE, size, s, False)))
    return Paired(
        kind,
        size,
        wins,
        losses,
        pairs,
        exact_mcnemar(wins, losses),
        mean_ci(per_seed) if per_seed else (0.0, None, None),
        mean_ci(per_seed_rung) if per_seed_rung else None,
        any_solved,
    )


@dataclass(frozen=True)
class Growth:
    """EA's margin on a ladder's harder half minus its margin on the easier half, per (size, seed)."""

    units: list[float]  # one per (size, scoring seed)
    mean: tuple[float, float | None, float | None]  # mean with its bootstrap interval
    p_value: float  # exact sign test: units that grow against units that shrink

    @property
    def ups(self) -> int:
        return sum(u > 0 for u in self.units)

    @property
    def downs(self) -> int:
        return sum(u < 0 for u in self.units)


def growth(study: Study, kind: str, multi: bool) -> Growth | None:
    """How much EA's solve margin grows from the easier to the harder half of a ladder.

    Per (size, scoring seed): mean(EA - DPA solved) on the harder half of the ladder's rungs minus
    the same on the easier half (the middle rung of an odd ladder is left out). None for a ladder
    of fewer than two rungs, or without a (size, seed) that has pairs in both halves.
    """
    rungs = [p for _, p, m in study.points if m == multi]
    if len(rungs) < 2:
        return None
    half = len(rungs) // 2
    easy, hard = rungs[:half], rungs[-half:]

    def margin(part: list[str], size: str, seed: int) -> float | None:
        d = [
            int(a) - int(b)
            for p in part
            if (a := study.outcome(kind, size, p, seed)) is not None
            and (b := study.outcome(REFERENCE, size, p, seed)) is not None
        ]
        return statistics.fmean(d) if d else None

    units = []
    for size in study.sizes:
        for s in study.seeds:
            h, e = margin(hard, size, s), margin(easy, size, s)
            if h is not None and e is not None:  # a unit needs pairs in both halves
                units.append(h - e)
    if not units:
        return None
    return Growth(units, mean_ci(units), sign_test(units))


# --- verdicts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    state: str  # supported | contradicted | undetermined
    evidence: str


def _ci(m: tuple[float, float | None, float | None], unit: str = "") -> str:
    if m[1] is None or m[2] is None:
        return f"{m[0]:+.2f}{unit} (one unit, no interval)"
    return f"{m[0]:+.2f}{unit} [{m[1]:+.2f}, {m[2]:+.2f}]"


def claim1(bench: Bench, kind: str) -> Verdict:
    """Claim 1 from the benchmarks: CPU step time (ratio of medians, IQR of paired ratios) and
    activation memory (exact bytes saved for backward). Within ``COST_TARGET`` on both is
    supported; a memory ratio or a whole time IQR above it contradicts."""
    times, memory = bench.time.get(kind, {}), bench.memory.get(kind, {})
    if not times and not memory:
        return Verdict("undetermined", "no benchmark of this kind")
    text = f"step time {kind}/dpa (CPU, median [IQR]): " + ", ".join(
        f"{size} {r:.3f} [{lo:.3f}-{hi:.3f}]" for size, (r, lo, hi) in times.items()
    )
    if memory:
        text += f"; activation memory {kind}/dpa: " + ", ".join(f"{size} {r:.3f}" for size, r in memory.items())
    over = any(lo > COST_TARGET for _, lo, _ in times.values()) or any(r > COST_TARGET for r in memory.values())
    if over:
        state = "contradicted"
    elif times and memory and all(hi <= COST_TARGET for _, _, hi in times.values()):
        state = "supported"
    else:
        state = "undetermined"
    return Verdict(state, text)


def claim2(study: Study, kind: str) -> Verdict:
    """EA at least as good as DPA, judged on (point, seed) pairs per size with exact tests.

    Contradicted when DPA is ahead at some size (sign test p < 0.05). Supported when at every size
    where anything was solved EA is ahead (p < 0.05) or DPA-only pairs are rare with confidence
    (their Wilson 95% upper bound <= ``NON_INFERIORITY``).
    """
    ps = [paired(study, kind, s) for s in study.sizes]
    text = "; ".join(
        f"{p.size}: {p.wins} EA-only vs {p.losses} DPA-only of {p.pairs} pairs, p={p.p_value:.2g}, "
        f"margin {_ci(p.margin, ' pts')}"
        for p in ps
    )
    live = [p for p in ps if p.any_solved and p.pairs]
    if any(p.verdict == "DPA ahead" for p in live):
        state = "contradicted"
    elif live and all(
        p.verdict == "EA ahead" or wilson_interval(p.losses, p.pairs)[1] <= NON_INFERIORITY for p in live
    ):
        state = "supported"
    else:
        state = "undetermined"
    return Verdict(state, text)


def claim3(study: Study, kind: str) -> Verdict:
    """EA's margin grows with complexity on every ladder (single- and multi-task), judged by an exact
    sign test over (size, seed) units: supported when it grows on every ladder (p < 0.05);
    contradicted when it shrinks on some ladder (p < 0.05)."""
    parts, states = [], []
    for multi in _ladders(study):
        g = growth(study, kind, multi)
        name = "multi-task" if multi else "single-task"
        if g is None:
            parts.append(f"{name}: no trend (fewer than two rungs, or no (size, seed) with pairs in both halves)")
            states.append("undetermined")
            continue
        parts.append(f"{name}: {_ci(g.mean)}, {g.ups} up / {g.downs} down of {len(g.units)}, p={g.p_value:.2g}")
        significant = g.p_value < ALPHA
        states.append(
            "supported" if significant and g.ups > g.downs else "contradicted" if significant else "undetermined"
        )
    if "contradicted" in states:
        state = "contradicted"
    elif states and all(s == "supported" for s in states):
        state = "supported"
    else:
        state = "undetermined"
    return Verdict(state, "margin growth, hard half minus easy half: " + "; ".join(parts))


def claim4(study: Study, kind: str) -> Verdict:
    """EA solves a point DPA cannot at the same size: supported when some cell is solved for EA and
    unsolved for DPA (both by the Wilson rule); contradicted when, at every size, DPA's limit was
    reached (some cell unsolved for DPA) and DPA solves every cell EA might solve."""
    found, dominated, notes = [], True, []
    for size in study.sizes:
        limit = False
        for _, p, _ in study.points:
            (ea_s, ea_n), (dp_s, dp_n) = study.cell(kind, size, p), study.cell(REFERENCE, size, p)
            ea_state, dpa_state = cell_state(ea_s, ea_n), cell_state(dp_s, dp_n)
            limit |= dpa_state == "unsolved"
            if ea_state == "solved" and dpa_state == "unsolved":
                found.append(f"{size} {p} ({ea_s}/{ea_n} vs {dp_s}/{dp_n})")
            if ea_state != "unsolved" and dpa_state != "solved":
                dominated = False
                if ea_s * dp_n > dp_s * ea_n:
                    notes.append(f"{size} {p} {ea_s}/{ea_n} vs {dp_s}/{dp_n}")
        dominated &= limit
    if found:
        return Verdict("supported", "EA solved, DPA unsolved: " + ", ".join(found))
    if dominated:
        return Verdict("contradicted", "at every size DPA's limit was reached, and DPA solves every cell EA may solve")
    shown = ", ".join(notes[:4]) + (" ..." if len(notes) > 4 else "")
    return Verdict(
        "undetermined",
        "no cell solved for EA and unsolved for DPA" + (f"; EA ahead, undecided: {shown}" if notes else ""),
    )


# --- tables -----------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


CLAIMS = {
    "1": ("EA costs no more compute or memory than DPA", None),
    "2": ("EA performs at least as well as DPA", claim2),
    "3": ("EA's advantage grows with complexity, multi-task included", claim3),
    "4": ("EA reaches 100% where DPA cannot, same size", claim4),
}


def claims_table(study: Study, bench: Bench) -> str:
    moved = budget_moves(study)
    qualifier = " at this budget" if any(moved.values()) else ""
    readings = [k for k in READINGS if k in study.kinds]
    rows = []
    for num, (text, fn) in CLAIMS.items():
        row = [num, text]
        for kind in readings:
            v = claim1(bench, kind) if fn is None else fn(study, kind)
            suffix = qualifier if fn is not None else ""
            row.append(f"**{v.state}{suffix}**: {v.evidence}")
        rows.append(row)
    head = ["#", "claim", *(f"`{k}` = {READINGS[k]}" for k in readings)]
    return _table(head, rows)


def frontier_table(study: Study) -> str:
    """Per size and kind: cells as successes/seeds with their state, per rung."""
    head = ["size", "kind", "lr", *[f"{r}: {p}" for r, p, _ in study.points]]
    mark = {"solved": "✓", "unsolved": "✗", "undetermined": "?"}
    rows = []
    for size in study.sizes:
        for kind in study.kinds:
            c = study.choices[(kind, size)]
            cells = []
            for _, p, _ in study.points:
                s, n = study.cell(kind, size, p)
                cells.append(f"{s}/{n} {mark[cell_state(s, n)]}" if n else "-")
            rows.append([size, kind, f"{c.lr:g}" + ("" if c.setting == "default" else f" {c.setting}"), *cells])
    return _table(head, rows)


def paired_table(study: Study) -> str:
    head = [
        "size",
        "reading",
        "EA-only / DPA-only / pairs",
        "sign test p",
        "solved-points margin",
        "rung margin",
        "verdict",
    ]
    rows = []
    for size in study.sizes:
        for kind in (k for k in READINGS if k in study.kinds):
            p = paired(study, kind, size)
            rows.append(
                [
                    size,
                    kind,
                    f"{p.wins} / {p.losses} / {p.pairs}",
                    f"{p.p_value:.3g}",
                    _ci(p.margin),
                    _ci(p.rung_margin) if p.rung_margin else "-",
                    p.verdict,
                ]
            )
    return _table(head, rows)


def budget_table(study: Study, steps: int = 4) -> str:
    """Mean per-seed frontier (highest solved single-task rung, -1 none; complete seeds) at budgets b/steps .. b."""
    budgets = [study.budget * (i + 1) // steps for i in range(steps)]
    head = ["size", "kind", *[f"b={b}" for b in budgets], "moves b/2→b"]
    rows = []
    for size in study.sizes:
        for kind in study.kinds:
            at = [study.mean_highest(kind, size, False, b) for b in budgets]
            half = study.mean_highest(kind, size, False, study.budget // 2)
            cells = ["-" if x is None else f"{x:.2f}" for x in at]
            rows.append([size, kind, *cells, "-" if half is None else "yes" if half != at[-1] else "no"])
    return _table(head, rows)


def compute_table(trials: Sequence[Trial]) -> str:
    head = ["kind", "trials", "CPU-s", "GPU-s", *sorted({t.status for t in trials})]
    rows = []
    statuses = sorted({t.status for t in trials})
    for kind in sorted({t.kind for t in trials}, key=lambda k: (k != REFERENCE, k)):
        ts = [t for t in trials if t.kind == kind]
        rows.append(
            [kind, str(len(ts)), f"{math.fsum(t.cpu_s for t in ts):,.0f}", f"{math.fsum(t.gpu_s for t in ts):,.0f}"]
            + [str(sum(t.status == s for t in ts)) for s in statuses]
        )
    rows.append(
        [
            "all",
            str(len(trials)),
            f"{math.fsum(t.cpu_s for t in trials):,.0f}",
            f"{math.fsum(t.gpu_s for t in trials):,.0f}",
        ]
        + [str(sum(t.status == s for t in trials)) for s in statuses]
    )
    return _table(head, rows)


# --- claim 1 input: the attention benchmark ---------------------------------------------


@dataclass(frozen=True)
class Bench:
    """Claim 1's evidence: {kind: {size: (ratio, IQR low, IQR high)}} and {kind: {size: memory ratio}}."""

    time: dict[str, dict[str, tuple[float, float, float]]]
    memory: dict[str, dict[str, float]]


def read_benchmark(path: str | Path, memory: str | Path | None = None) -> Bench:
    """EA/DPA and EA-norm/DPA CPU step-time ratios from the first results table of docs/benchmarks.md,
    and activation-memory ratios from ``benchmarks.bench_memory``'s JSON.

    Raises:
        ValueError: if the table is not found.
    """
    text = Path(path).read_text()
    start = text.find("### Results (CPU, final code)")
    if start < 0:
        raise ValueError(f"{path}: no '### Results (CPU, final code)' section")
    ratio = re.compile(r"\*\*([\d.]+)\*\* \[([\d.]+)-([\d.]+)\]")
    times: dict[str, dict[str, tuple[float, float, float]]] = {"ea": {}, "ea_norm": {}}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        found = ratio.findall(line)
        if line.startswith("| d") and len(found) == 2:
            size = line.split("|")[1].strip()
            for kind, (r, lo, hi) in zip(("ea", "ea_norm"), found, strict=True):
                times[kind][size] = (float(r), float(lo), float(hi))
    if not times["ea"]:
        raise ValueError(f"{path}: no ratio rows in the CPU results table")
    mem: dict[str, dict[str, float]] = {}
    if memory is not None:
        saved = json.loads(Path(memory).read_text())["saved_bytes"]
        for size, by_kind in sorted(saved.items(), key=lambda kv: int(kv[0].lstrip("d"))):
            for kind in READINGS:
                mem.setdefault(kind, {})[size] = by_kind[kind] / by_kind[REFERENCE]
    return Bench(times, mem)


# --- the document ----------------------------------------------------------------------


def blocks(trials: Sequence[Trial], bench: Bench) -> dict[str, str]:
    """Every generated block of the findings document, by name."""
    study = Study.of(trials)
    return {
        "claims": claims_table(study, bench),
        "frontier": frontier_table(study),
        "paired": paired_table(study),
        "budget": budget_table(study),
        "compute": compute_table(trials),
    }


def render(doc: str, generated: dict[str, dict[str, str]]) -> str:
    """``doc`` with each ``<!-- claims:DATA:NAME -->`` .. ``<!-- /claims:DATA:NAME -->`` block replaced
    by block NAME of dataset DATA.

    Raises:
        ValueError: if the document names a dataset or block that is not generated.
    """

    def sub(m: re.Match[str]) -> str:
        data, name = m.group(1), m.group(2)
        if name not in generated.get(data, {}):
            raise ValueError(f"unknown block claims:{data}:{name}; generated: {sorted(generated)}")
        return f"<!-- claims:{data}:{name} -->\n{generated[data][name]}<!-- /claims:{data}:{name} -->"

    return TAG.sub(sub, doc)


def datasets(doc: str) -> list[str]:
    """The datasets a document's generated blocks name, in order of first use."""
    return list(dict.fromkeys(m.group(1) for m in TAG.finditer(doc)))


def rendered(doc_path: str | Path, data_dir: str | Path, benchmarks: str | Path) -> str:
    """The document with every block regenerated from its data under ``data_dir``:
    ``<dataset>-trials.csv`` for the claims blocks, ``<dataset>-geometry.json`` for ``geometry``."""
    doc = Path(doc_path).read_text()
    bench = read_benchmark(benchmarks, Path(data_dir) / "attention-memory.json")
    generated: dict[str, dict[str, str]] = {}
    for d in datasets(doc):
        trials, geometry = Path(data_dir) / f"{d}-trials.csv", Path(data_dir) / f"{d}-geometry.json"
        generated[d] = blocks(read_csv(trials), bench) if trials.exists() else {}
        if geometry.exists():
            generated[d]["geometry"] = geometry_block(json.loads(geometry.read_text())["rows"])
    return render(doc, generated)


def geometry_block(rows: list[dict[str, Any]]) -> str:
    """Per kind: the geometry table rows, then the share of weight at t-T that came with a negative score."""
    from workers.geometry import geometry_table

    lines = []
    for kind in sorted({r["kind"] for r in rows}, key=lambda k: (k != REFERENCE, k)):
        mine = [r for r in rows if r["kind"] == kind]
        w = math.fsum(r["mass_t_minus_T"] for r in mine)
        neg = math.fsum(r["mass_t_minus_T"] * r["neg_share_t_minus_T"] for r in mine)
        trials = {(r["point"], r["seed"], r["size"]) for r in mine}
        readers = [r for r in mine if r["mass_t_minus_T"] >= READER]
        anti = sum(r["score_t_minus_T"] < 0 for r in readers)
        lines.append(
            f"- `{kind}`: {neg / w if w else 0:.0%} of the weight on key t-T came with a negative score; "
            f"{anti} of {len(readers)} heads that read t-T (weight >= {READER}) did so with a negative mean score "
            f"({len(trials)} trained models, {len(mine)} heads)"
        )
    return geometry_table(rows) + "\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Judge the paper's claims from trial CSVs; rewrite a findings document.")
    p.add_argument("--export", metavar="CSV", help="write the trials of --studies as one compact CSV")
    p.add_argument("--studies", nargs="+", default=[], metavar="STUDY_DIR", help="study directories to export")
    p.add_argument("--selection-seeds", type=int, nargs="*", default=[], help="seeds that tune the lr (with --export)")
    p.add_argument("--doc", default="docs/findings.md", help="the findings document to rewrite")
    p.add_argument("--data", default="docs/data", help="where <dataset>-trials.csv live")
    p.add_argument("--benchmarks", default="docs/benchmarks.md")
    p.add_argument("--figures", help="also write each dataset's figures (<dataset>-cells.png, -budget.png) here")
    args = p.parse_args(argv)
    if args.export:
        from studies.records import read_records

        trials: list[Trial] = []
        for study_dir in map(Path, args.studies):
            spec = StudySpec.model_validate_json((study_dir / "spec.json").read_text())
            trials += trials_from_records(spec, read_records(study_dir / "trials.jsonl"), args.selection_seeds)
        write_csv(sorted(trials, key=_order), args.export)
        return 0
    Path(args.doc).write_text(rendered(args.doc, args.data, args.benchmarks))
    if args.figures:
        from studies.claims_plots import write_figures

        for name in datasets(Path(args.doc).read_text()):
            csv_path = Path(args.data) / f"{name}-trials.csv"
            if csv_path.exists():
                write_figures(Study.of(read_csv(csv_path)), Path(args.figures), name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
