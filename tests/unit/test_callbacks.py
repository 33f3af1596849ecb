"""A trial's resolved config per attention kind, and the progress view of the frontier."""

from __future__ import annotations

import pickle

from studies.records import TrialRecord
from studies.spec import StudySpec
from workers.callbacks import fixed_config, frontier_summary
from workers.search import make_cell
from workers.trial import trial_config

SPEC = StudySpec.model_validate(
    {
        "name": "fair",
        "attention": ["dpa", "ea", "ea_norm"],
        "task": {"ladder": [[[7, 2]]]},
        "model": {"sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}]},
        "eps": 1e-4,
        "evaluation": {"holdout": "fresh"},
        "fairness": {
            "positional": "rotary",
            "grad_clip_mode": "split",
            "kinds": {"ea": {"lr_scale": 3.0, "qkv_init_std": 0.2, "temperature": 0.5, "learn_temperature": True}},
        },
    }
)


def test_each_kind_gets_its_own_settings_and_the_shared_ones():
    fixed = fixed_config(SPEC)
    cfgs = {k: trial_config({"cell": make_cell(SPEC, k, 0, 0, 1e-3, 0), "fixed": fixed}) for k in SPEC.attention}
    ea, dpa = cfgs["ea"], cfgs["dpa"]
    assert (ea.lr, ea.qkv_init_std, ea.temperature, ea.learn_temperature) == (3e-3, 0.2, 0.5, True)
    assert (dpa.lr, dpa.temperature, dpa.learn_temperature) == (1e-3, 1.0, False)
    for cfg in cfgs.values():
        assert (cfg.positional, cfg.grad_clip_mode, cfg.eps, cfg.holdout) == ("rotary", "split", 1e-4, "fresh")
        assert cfg.model_config().positional == "rotary"
    assert cfgs["ea_norm"].qkv_init_std == dpa.qkv_init_std  # defaults where the spec says nothing


def _rec(spec: StudySpec, point: int, seed: int, solved: bool) -> TrialRecord:
    cell = make_cell(spec, "dpa", 0, point, 1e-3, seed)
    return TrialRecord(
        study_id=spec.name,
        trial_id=f"t{point}-{seed}",
        kind="dpa",
        **cell["size"],
        point=cell["point"],
        coords=cell["coords"],
        seed=seed,
        lr=1e-3,
        status="solved" if solved else "unsolved",
        eval_acc=1.0 if solved else 0.3,
        steps=100,
    )


def test_progress_frontier_shows_one_seed_as_undetermined_and_four_agreeing_seeds_as_decided():
    spec = StudySpec.model_validate(
        {
            "name": "progress",
            "attention": ["dpa"],
            "task": {"ladder": [[[7, 2]], [[13, 2]]]},
            "model": {"sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}]},
            "seeds": [0, 1, 2, 3],
        }
    )
    one = frontier_summary(spec, [_rec(spec, 0, 0, True), _rec(spec, 1, 0, False)])["dpa"]["d16_l1_h2"]
    assert one["determined"] is False and one["highest_rung"] is None and one["highest_possible_rung"] == 1
    assert one["solved"] == [] and one["undetermined"] == 2 and one["text"].startswith("[none, 1]")
    four = [_rec(spec, p, s, p == 0) for p in (0, 1) for s in range(4)]
    lane = frontier_summary(spec, four)["dpa"]["d16_l1_h2"]
    assert lane["determined"] is True and (lane["highest_rung"], lane["highest_possible_rung"]) == (0, 0)
    assert lane["solved"] == ["N7_T2"] and lane["undetermined"] == 0 and lane["text"] == "0 N7_T2"


class _Tracker:  # MLflow is not this test's business
    def trial_run(self, trial_id, cell, config):
        return f"run-{trial_id}"

    def log_progress(self, run_id, values):
        pass

    def finish(self, record):
        pass


class _Settings:
    def __init__(self, path):
        self.path = path

    def study_dir(self, study_id):
        return self.path


def test_the_callback_reads_the_trials_file_once_and_writes_status_only_on_change(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from workers import callbacks
    from workers.callbacks import StudyCallback
    from workers.packing import plan_packs

    reads, writes = [], []
    real_read, real_update = callbacks.read_records, callbacks.update_status
    monkeypatch.setattr(callbacks, "read_records", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(callbacks, "update_status", lambda d, **f: writes.append(f) or real_update(d, **f))
    settings = _Settings(tmp_path)
    fixed = fixed_config(SPEC)
    cells = [make_cell(SPEC, "dpa", 0, 0, lr, 0) for lr in (1e-3, 2e-3, 3e-3)]
    (pack,) = plan_packs(cells, 8, fixed)
    trial = SimpleNamespace(trial_id="t1", config={"pack": pack, "fixed": fixed}, status=Trial.RUNNING)
    cb = StudyCallback("s", SPEC, settings, _Tracker())  # type: ignore[arg-type]
    progress = {"members": {str(i): {"step": 10, "eval_acc": 0.5} for i in range(3)}, "finals": {}}
    cb.on_trial_start(0, [trial], trial)
    for _ in range(20):
        cb.on_trial_result(0, [trial], trial, progress)
    solved = {"status": "solved", "solved": True, "eval_acc": 1.0, "steps": 10}
    cb.on_trial_result(0, [trial], trial, {"members": {}, "finals": {"1": solved}})
    assert len(reads) == 1, "records are read once per driver, then kept in memory"
    assert len(writes) == 2, "status is written when it changes: the start, then a member's record"
    assert writes[-1]["done"] == 1 and writes[-1]["counts"] == {"solved": 1}
    trial.status, trial.last_result = Trial.TERMINATED, {"final": True, "finals": {"1": solved}}
    cb.on_trial_complete(0, [trial], trial)  # the other two members have no record: stopped
    assert [r.trial_id for r in real_read(tmp_path / "trials.jsonl")] == ["t1.m1", "t1.m0", "t1.m2"]
    resumed = pickle.loads(pickle.dumps(cb))  # Tune restores the callback from its experiment state
    assert resumed._records_by_id().keys() == {"t1.m0", "t1.m1", "t1.m2"} and len(reads) == 2


def test_a_callback_pickled_by_an_older_version_resumes(tmp_path):
    """Tune unpickles the callback of the experiment it restores: one from before the record cache must work."""
    from workers.callbacks import StudyCallback

    cb = StudyCallback("s", SPEC, _Settings(tmp_path), _Tracker())  # type: ignore[arg-type]
    state = cb.__getstate__()
    for cache in ("_by_key", "_shown"):  # what a driver of 2026-11-30 pickled had no such fields
        del state[cache]
    old = pickle.loads(pickle.dumps(cb))
    old.__dict__.clear()
    old.__setstate__(state)
    assert old._records_by_id() == {} and old.study_dir == cb.study_dir
