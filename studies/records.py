"""Trial records: what the driver writes for every finished trial and the report reads.

One JSON object per line in ``<study dir>/trials.jsonl``. A trial key (``trial_key``: what the
trial trains) may appear more than once (a retried or resumed trial): the last line wins. A
driver killed mid-write leaves a torn last line: readers skip it, ``repair_records`` cuts it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)

# solved / unsolved: a real outcome at the study's budget. stopped: cut short by the
# early-stopping scheduler, so censored: not known to be unsolved, never counted as an outcome.
# diverged / oom / failed / preempted: no outcome; never counted as unsolved.
Status = Literal["solved", "unsolved", "stopped", "diverged", "oom", "failed", "preempted"]
OUTCOMES: frozenset[str] = frozenset({"solved", "unsolved"})


class TrialRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    study_id: str
    trial_id: str
    kind: str
    d_model: int
    n_layers: int
    n_heads: int
    n_params: int | None = None
    point: str  # e.g. "N7_T2" or "N7_T1+N7_T2"
    coords: list[int]  # position on the study's complexity axes (ladder: [rung]; grid: [iN, iT])
    seed: int
    lr: float
    status: Status
    eval_acc: float | None = None  # on set B, the confirmation set (docs/evaluation.md)
    eval_acc_lo: float | None = None  # 95% Wilson interval of eval_acc from eval_tokens scored tokens
    eval_acc_hi: float | None = None
    eval_tokens: int | None = None
    eval_pool: int | None = None  # distinct held-out sequences the sets were drawn from (smallest member)
    eval_exhaustive: bool | None = None  # the pool was evaluated whole (A = B, an exact accuracy)
    search_acc: float | None = None  # on set A, which stop-when-solved looks at
    acc_per_task: dict[str, float] = {}
    eval_loss: float | None = None
    steps: int = 0
    steps_to_solve: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0  # wall time on a device
    gpu_share: float | None = None  # share of one device held (resources.gpu, or a pack's share of it)
    node_id: str | None = None
    mlflow_run_id: str | None = None
    error: str | None = None
    config: dict[str, Any] = {}  # the resolved trial config: evaluation and fairness settings included

    @property
    def size_name(self) -> str:
        return f"d{self.d_model}_l{self.n_layers}_h{self.n_heads}"

    @property
    def pair_key(self) -> str:
        return pair_key(self.size_name, self.point, self.lr, self.seed)

    @property
    def trial_key(self) -> str:
        return trial_key(self.kind, self.size_name, self.point, self.lr, self.seed)


def pair_key(size: str, point: str, lr: float, seed: int) -> str:
    """What twins of different attention kinds share: model size, task point, learning rate, seed."""
    return f"{size}/{point}/lr={lr:.6g}/seed={seed}"


def trial_key(kind: str, size: str, point: str, lr: float, seed: int) -> str:
    """One trial of a study, stable across resumes and re-runs (unlike Tune's trial id).

    Two trials with the same key ran the same configuration: a re-run, never a second sample.
    """
    return f"{kind}/{pair_key(size, point, lr, seed)}"


def _parse_lines(text: str, path: Path) -> list[TrialRecord]:
    out = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(TrialRecord.model_validate_json(line))
        except ValidationError:
            torn = i == len(lines) - 1  # no newline after it: a write the driver did not finish
            log.warning("%s line %d: %s record skipped", path, i + 1, "torn (unfinished)" if torn else "unreadable")
    return out


def read_records(path: str | Path) -> list[TrialRecord]:
    """Records of a trials file, one per trial key (the last line wins), in file order; bad lines skipped."""
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except FileNotFoundError:
        return []
    by_key: dict[str, TrialRecord] = {}
    for rec in _parse_lines(text, p):
        by_key.pop(rec.trial_key, None)
        by_key[rec.trial_key] = rec
    return list(by_key.values())


def repair_records(path: str | Path) -> int:
    """Cut a torn last line (a driver killed mid-write); returns the bytes removed."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return 0
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(p, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: cut a torn last record (%d bytes)", p, len(data) - keep)
    return len(data) - keep


def append_record(path: str | Path, record: TrialRecord | dict[str, Any]) -> None:
    """Append one record as one line, flushed to disk (a torn line is only ever the last)."""
    rec = record if isinstance(record, TrialRecord) else TrialRecord.model_validate(record)
    with open(path, "a") as f:
        f.write(json.dumps(rec.model_dump(mode="json"), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
