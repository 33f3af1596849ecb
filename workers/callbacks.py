"""The study's Tune callback: a trial record per finished trial, the status file and the progress bar.

MLflow goes through :mod:`workers.tracking`; this callback only tells the tracker when.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from ray.tune import Callback
from ray.tune.experiment import Trial

from studies.records import OUTCOMES, TrialRecord, append_record, read_records
from studies.report import build_report, frontier_text
from studies.settings import Settings
from studies.spec import StudySpec
from studies.studydir import RECORDS, update_status
from workers.packing import cells_of, is_pack, member_results
from workers.tracking import StudyTracker, cell_key
from workers.trial import trial_config


def fixed_config(spec: StudySpec) -> dict[str, Any]:
    """The part of every trial's config that the study fixes (``trial_config`` resolves it per kind)."""
    return {
        "identify_margin": spec.task.identify_margin,
        "context_length": spec.training.context_length,
        "eps": spec.eps,
        "warmup_steps": spec.training.warmup_steps,
        "weight_decay": spec.training.weight_decay,
        "grad_clip": spec.training.grad_clip,
        "batch_size": spec.training.batch_size,
        "max_steps": spec.training.max_steps,
        "eval_interval": spec.training.eval_interval,
        "eval_sequences": spec.training.eval_sequences or 0,
        "holdout": spec.evaluation.holdout,
        "positional": spec.fairness.positional,
        "grad_clip_mode": spec.fairness.grad_clip_mode,
        "kinds": {k: spec.fairness.kind(k).model_dump() for k in spec.attention},
        "threshold": spec.threshold,
    }


def classify_error(trial: Trial) -> str:
    """Why an errored trial has no outcome: ``oom``, ``preempted`` or ``failed``."""
    text = str(getattr(trial, "error_msg", "") or "")
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text += Path(path).read_text(errors="replace")
    if "OutOfMemoryError" in text or "MemoryError" in text:
        return "oom"
    if any(s in text for s in ("NodeDiedError", "ActorDiedError", "RayActorError", "node", "preempt")):
        return "preempted"
    return "failed"


def frontier_summary(spec: StudySpec, records: list[TrialRecord]) -> dict[str, dict[str, Any]]:
    """The frontier so far per kind and size, decided as the report decides it (``studies.stats.decide``).

    Each lane gives the points certainly solved and possibly solved (solved or undetermined),
    on a ladder the interval [highest rung certainly solved, highest possibly solved], whether
    that frontier is determined, and how many of its cells are still undetermined.
    """
    report = build_report(spec, records)
    out: dict[str, dict[str, Any]] = {}
    for f in report.frontier:
        out.setdefault(f.kind, {})[f.size] = {
            "text": frontier_text(report, f),
            "determined": f.determined,
            "highest_rung": f.highest_rung,
            "highest_possible_rung": f.highest_possible_rung,
            "solved": [p.name for p in f.points],
            "possible": [p.name for p in f.possible_points],
            "undetermined": f.n_undetermined,
        }
    return out


def _short(s: dict[str, dict[str, Any]], spec: StudySpec) -> str:
    """``frontier_summary`` on one line, for the progress bar."""
    return " ".join(f"{k}:" + "|".join(v["text"] for v in s[k].values()) for k in spec.attention if k in s)


class StudyCallback(Callback):
    """Writes trial records, status and progress, and tells the tracker about every trial.

    Picklable (Tune stores it with the experiment): the progress bar is made lazily, and the
    records are read from the trials file once per driver (at the first event after a start or
    a resume) and then kept in memory, so a Tune result costs no file read. The status file is
    written only when what it shows changes.
    """

    def __init__(
        self, study_id: str, spec: StudySpec, settings: Settings, tracker: StudyTracker, progress: bool = False
    ) -> None:
        self.study_id, self.spec, self.progress, self.tracker = study_id, spec, progress, tracker
        self.study_dir = settings.study_dir(study_id)
        self._bar: Any = None
        self._closed: set[str] = set()  # pack members whose record and MLflow run are both final
        self._by_key: dict[str, TrialRecord] | None = None  # the trials file, as read_records reads it
        self._shown: dict[str, Any] | None = None  # what the status file shows now

    _CACHES: ClassVar[dict[str, Any]] = {"_bar": None, "_by_key": None, "_shown": None}  # rebuilt on use, never pickled

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | self._CACHES

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tune restores this object from the experiment on resume, perhaps pickled by an older version
        # that had fewer caches: a cache it lacks starts empty rather than failing the resume.
        self.__dict__.update(self._CACHES | state)

    def _records(self) -> dict[str, TrialRecord]:
        """Records by trial key (the last one wins, in file order), read from the file once."""
        if self._by_key is None:
            self._by_key = {r.trial_key: r for r in read_records(self.study_dir / RECORDS)}
        return self._by_key

    def _run(self, trial_id: str, cell: dict[str, Any], fixed: dict[str, Any]) -> str:
        return self.tracker.trial_run(trial_id, cell, asdict(trial_config({"cell": cell, "fixed": fixed})))

    # Tune hooks: a Tune trial stands for one trial, or for every member of its pack -------------
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        for tid, cell in cells_of(trial.trial_id, trial.config):
            self._run(tid, cell, trial.config["fixed"])
        self._refresh(trials)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        fixed = trial.config["fixed"]
        recorded = self._records_by_id() if is_pack(trial.config) else {}
        for tid, cell, what, values in member_results(trial.trial_id, trial.config, result):
            if what == "progress":
                if not self._has_outcome(cell_key(cell)):  # a member re-run after a resume: its curve is logged
                    self.tracker.log_progress(self._run(tid, cell, fixed), values)
            elif tid in recorded:
                self._close(recorded[tid])
            elif is_pack(trial.config):  # a solo trial is recorded on completion
                self._finish(tid, cell, fixed, values.get("status", "failed"), values, values.get("error"))
        self._refresh(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        status = result.get("status", "failed") if result.get("final") else "stopped"
        self._finish_unrecorded(trial, status, result, result.get("error"))
        self._refresh(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        error = str(getattr(trial, "error_msg", "") or "")[:2000]
        self._finish_unrecorded(trial, classify_error(trial), trial.last_result or {}, error)
        self._refresh(trials)

    def _records_by_id(self) -> dict[str, TrialRecord]:
        return {r.trial_id: r for r in self._records().values()}

    def _close(self, record: TrialRecord) -> None:
        """Finish the MLflow run of an already recorded pack member, if a kill came between the two."""
        if record.trial_id in self._closed:
            return
        if record.mlflow_run_id and self.tracker.client.get_run(record.mlflow_run_id).info.status == "RUNNING":
            self.tracker.finish(record)
        self._closed.add(record.trial_id)

    def _finish_unrecorded(self, trial: Trial, status: str, result: dict[str, Any], error: str | None) -> None:
        """Record every trial ``trial`` stands for that has no record yet (a pack's members: once each).

        A pack's members without a record (the pack was stopped or failed) get ``status`` and no metrics.
        """
        pack = is_pack(trial.config)
        recorded = self._records_by_id() if pack else {}
        for tid, cell in cells_of(trial.trial_id, trial.config):
            if tid in recorded:
                self._close(recorded[tid])
            else:
                self._finish(tid, cell, trial.config["fixed"], status, {} if pack else result, error)

    def _finish(
        self,
        trial_id: str,
        cell: dict[str, Any],
        fixed: dict[str, Any],
        status: str,
        result: dict[str, Any],
        error: str | None,
    ) -> None:
        acc = {k[4:]: v for k, v in result.items() if k.startswith("acc_")}
        rec = TrialRecord(
            study_id=self.study_id,
            trial_id=trial_id,
            kind=cell["kind"],
            **cell["size"],
            n_params=result.get("n_params"),
            point=cell["point"],
            coords=cell["coords"],
            seed=cell["seed"],
            lr=cell["lr"],
            status=status,  # type: ignore[arg-type]
            eval_acc=result.get("eval_acc"),
            acc_per_task=acc,
            eval_loss=result.get("eval_loss"),
            eval_acc_lo=result.get("eval_acc_lo"),
            eval_acc_hi=result.get("eval_acc_hi"),
            eval_pool=result.get("eval_pool"),
            eval_exhaustive=result.get("eval_exhaustive"),
            search_acc=result.get("search_acc"),
            eval_tokens=None if result.get("eval_tokens") is None else int(result["eval_tokens"]),
            config=asdict(trial_config({"cell": cell, "fixed": fixed})),
            steps=int(result.get("steps", result.get("step", 0)) or 0),
            steps_to_solve=result.get("steps_to_solve"),
            wall_s=float(result.get("wall_s", 0.0) or 0.0),
            cpu_s=float(result.get("cpu_s", 0.0) or 0.0),
            gpu_s=float(result.get("gpu_s", 0.0) or 0.0),
            gpu_share=float(result.get("gpu_share", self.spec.resources.gpu)),
            node_id=result.get("node_id"),
            mlflow_run_id=self._run(trial_id, cell, fixed),
            error=error,
        )
        if self._has_outcome(rec.trial_key):  # a trial rerun after a resume is recorded (and counted) once: the first
            rec = self._records()[rec.trial_key]
        else:
            append_record(self.study_dir / RECORDS, rec)
            records = self._records()
            records.pop(rec.trial_key, None)
            records[rec.trial_key] = rec
        self.tracker.finish(rec)
        self._closed.add(trial_id)

    def _has_outcome(self, key: str) -> bool:
        """An outcome is on file for this trial key already (a failure may be retried and recorded again)."""
        prior = self._records().get(key)
        return prior is not None and prior.status in OUTCOMES

    def _refresh(self, trials: list[Trial]) -> None:
        records = list(self._records().values())
        counts: dict[str, int] = {}
        for r in records:
            counts[r.status] = counts.get(r.status, 0) + 1
        running = sum(1 for t in trials if t.status == Trial.RUNNING)
        shown = {"counts": counts, "done": len(records), "running": running}
        if shown == self._shown:
            return
        self._shown = shown
        frontier = frontier_summary(self.spec, records)
        update_status(self.study_dir, **shown, frontier=frontier)
        if self.progress:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.spec.planned_trials(), unit="trial", dynamic_ncols=True)
            self._bar.n = len(records)
            bad = sum(v for k, v in counts.items() if k not in OUTCOMES and k != "stopped")
            self._bar.set_postfix_str(f"running={running} failed={bad} frontier={_short(frontier, self.spec)}")
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
