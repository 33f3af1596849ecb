"""One trial end to end on CPU: learning, stopping, divergence, reproducibility, resume, multi-task, failures."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from typing import Any

import pytest
import torch

from workers.model import count_parameters
from workers.tasks import GENERATOR_VERSION
from workers.trial import STATUSES, TrialConfig, lr_at, run_trial

TIME_FIELDS = ("wall_s", "cpu_s", "gpu_s")


# An easy point both kinds solve in ~200 steps, and the budget every learning test gets.
EASY = TrialConfig(
    task=[[7, 2]],
    d_model=32,
    n_layers=2,
    n_heads=2,
    context_length=16,
    lr=3e-3,
    max_steps=600,
    eval_interval=100,
    threshold=0.99,
    device="cpu",
)
# A tiny, fast configuration for the bookkeeping tests (it does not solve its point).
TINY = TrialConfig(
    task=[[13, 2]],
    d_model=16,
    n_layers=1,
    n_heads=2,
    context_length=12,
    batch_size=32,
    max_steps=60,
    warmup_steps=10,
    eval_interval=20,
    eval_sequences=64,
    device="cpu",
)


def _untimed(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in TIME_FIELDS}


class Recorder:
    """An on_eval callback that keeps every metrics dict and, at chosen steps, a serialised state."""

    def __init__(self, save_at: tuple[int, ...] = ()) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.states: dict[int, bytes] = {}
        self.save_at = save_at

    def __call__(self, metrics: dict[str, Any], state) -> None:
        self.metrics.append(dict(metrics))
        if metrics["step"] in self.save_at:
            buf = io.BytesIO()
            torch.save(state(), buf)  # what a checkpoint does: the state must survive serialisation
            self.states[metrics["step"]] = buf.getvalue()

    def state(self, step: int) -> dict[str, Any]:
        return torch.load(io.BytesIO(self.states[step]), weights_only=True)


# --- learning -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dpa", "ea"])
def test_easy_point_is_solved_and_training_stops_at_once(kind):
    rec = Recorder()
    r = run_trial(replace(EASY, attention=kind), on_eval=rec)
    assert r["status"] == "solved", r
    assert r["solved"] is True
    assert r["error"] is None
    assert r["steps_to_solve"] is not None and r["steps_to_solve"] < EASY.max_steps
    assert r["steps"] == r["steps_to_solve"] == rec.metrics[-1]["step"]
    assert r["steps_to_solve"] % EASY.eval_interval == 0
    assert r["eval_acc"] >= 0.99 and r["acc_N7_T2"] >= 0.99
    # Every evaluation before the last was unsolved; the last one was solved and nothing ran after it.
    assert [m["solved"] for m in rec.metrics] == [False] * (len(rec.metrics) - 1) + [True]
    assert [m["step"] for m in rec.metrics] == list(range(100, r["steps"] + 1, 100))


@pytest.mark.parametrize("kind", ["dpa", "ea"])
def test_hard_point_stays_unsolved_within_the_same_budget(kind):
    r = run_trial(replace(EASY, attention=kind, task=[[61, 6]]))
    assert r["status"] == "unsolved", r
    assert r["solved"] is False
    assert r["steps"] == EASY.max_steps
    assert r["steps_to_solve"] is None
    assert r["eval_acc"] < 0.5
    assert math.isfinite(r["eval_loss"]) and math.isfinite(r["train_loss"])


@pytest.mark.parametrize("kind", ["dpa", "ea", "ea_norm"])
def test_absurd_learning_rate_is_diverged_not_an_exception(kind):
    r = run_trial(replace(TINY, attention=kind, lr=1e4, max_steps=100))
    assert r["status"] == "diverged", r
    assert r["solved"] is False
    assert r["steps"] < 100
    assert "loss" in r["error"]


# --- the record -----------------------------------------------------------------------------------------------------


def test_record_carries_config_version_and_size():
    r = run_trial(TINY)
    assert r["status"] in STATUSES
    assert r["config"]["task"] == [[13, 2]] and r["config"]["seed"] == 0
    assert r["generator_version"] == GENERATOR_VERSION
    assert r["device"] == "cpu"
    assert r["n_params"] == count_parameters(TINY.model_config())
    assert r["gpu_s"] == 0.0
    assert r["wall_s"] > 0 and r["cpu_s"] > 0
    for key in ("eval_acc", "eval_loss", "train_loss", "acc_N13_T2", "lr"):
        assert math.isfinite(r[key]), key


def test_on_eval_is_called_at_every_evaluation_with_metrics():
    rec = Recorder()
    r = run_trial(replace(TINY, max_steps=50), on_eval=rec)
    assert [m["step"] for m in rec.metrics] == [20, 40, 50]  # every eval_interval, and at max_steps
    for m in rec.metrics:
        for key in ("search_acc", "search_loss", "train_loss", "lr", "search_acc_N13_T2", "solved", *TIME_FIELDS):
            assert key in m, key
        assert 0.0 <= m["search_acc"] <= 1.0
        assert ("eval_acc" in m) is (m["step"] == 50)  # set B: looked at for a solve, or at the end
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, replace(TINY, max_steps=50)))
    assert _untimed(rec.metrics[-1]).items() <= _untimed(r).items()
    assert r["status"] == "unsolved" and r["steps"] == 50


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    cfg = replace(TINY, lr=1.0, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_trial_trains_on_its_stream_and_records_the_confirmation_set_with_its_interval(monkeypatch):
    import workers.trial as trial

    made = []

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    real = trial.build_eval_sets
    monkeypatch.setattr(trial, "build_eval_sets", spy)
    r = run_trial(replace(TINY, max_steps=20))
    assert r["status"] == "unsolved" and len(made) == 1
    sets = made[0]
    assert r["eval_sequences"] == sets.confirm.inputs.shape[0] and r["eval_pool"] == 13**3
    assert r["eval_tokens"] == int(sets.confirm.scored.sum())
    assert r["eval_acc_lo"] <= r["eval_acc"] <= r["eval_acc_hi"]
    assert r["eval_acc_hi"] - r["eval_acc_lo"] < 0.1


def test_a_solve_on_set_a_that_set_b_does_not_confirm_is_not_recorded_as_solved(monkeypatch):
    import workers.trial as trial

    real = trial.build_eval_sets

    def corrupt_b(*args, **kwargs):  # set B's targets shifted by one token: no model can pass it
        sets = real(*args, **kwargs)
        b = sets.confirm
        bad = trial.Batch(b.inputs, (b.targets + 1) % 7, b.scored, b.member)
        return replace(sets, confirm=bad)

    monkeypatch.setattr(trial, "build_eval_sets", corrupt_b)
    rec = Recorder()
    r = run_trial(replace(EASY, max_steps=300), on_eval=rec)
    assert any(m["search_acc"] >= EASY.threshold for m in rec.metrics), "set A should be solved in 300 steps"
    assert r["status"] == "unsolved" and r["steps"] == 300 and r["confirm_misses"] >= 1
    assert r["eval_acc"] < 0.5 <= r["search_acc"]


# --- reproducibility and resume -------------------------------------------------------------------------------------


def test_same_seed_is_bit_for_bit_reproducible_and_another_seed_is_not():
    recs = [Recorder(), Recorder(), Recorder()]
    a = run_trial(TINY, on_eval=recs[0])
    b = run_trial(TINY, on_eval=recs[1])
    c = run_trial(replace(TINY, seed=1), on_eval=recs[2])
    assert _untimed(a) == _untimed(b)
    assert [_untimed(m) for m in recs[0].metrics] == [_untimed(m) for m in recs[1].metrics]
    assert a["eval_loss"] != c["eval_loss"]


@pytest.mark.parametrize("resume_at", [20, 40])
def test_resume_from_a_saved_state_equals_an_uninterrupted_run(resume_at):
    full = Recorder(save_at=(resume_at,))
    a = run_trial(TINY, on_eval=full)
    after = Recorder()
    b = run_trial(TINY, on_eval=after, resume=full.state(resume_at))
    assert b["status"] == a["status"]
    assert _untimed(b) == _untimed(a)
    tail = [_untimed(m) for m in full.metrics if m["step"] > resume_at]
    assert [_untimed(m) for m in after.metrics] == tail
    saved = full.state(resume_at)["elapsed"]  # elapsed time carries on from the saved state
    assert b["wall_s"] > saved["wall_s"] and b["cpu_s"] > saved["cpu_s"]


def test_resume_from_the_solving_evaluation_stays_solved_at_the_same_step():
    rec = Recorder(save_at=(100, 200, 300))
    a = run_trial(EASY, on_eval=rec)
    assert a["status"] == "solved"
    b = run_trial(EASY, resume=rec.state(a["steps_to_solve"]))
    assert (b["status"], b["steps"], b["steps_to_solve"]) == ("solved", a["steps"], a["steps_to_solve"])


# --- multi-task -----------------------------------------------------------------------------------------------------


def test_multi_task_point_reports_each_member_and_needs_all_of_them():
    # N5_T1 is learned within 100 steps; N61_T6 is not: the point stays unsolved.
    rec = Recorder()
    cfg = replace(EASY, task=[[5, 1], [61, 6]], max_steps=200)
    r = run_trial(cfg, on_eval=rec)
    assert r["status"] == "unsolved"
    assert r["acc_N5_T1"] >= cfg.threshold > r["acc_N61_T6"]
    for m in rec.metrics:
        assert m["solved"] is False
        # N5_T1's whole pool (25) is fewer than two sets: that member is evaluated whole, in A and B alike.
        assert m["search_acc_N5_T1"] == m.get("acc_N5_T1", m["search_acc_N5_T1"])
    assert r["eval_exhaustive"] is True and r["eval_pool"] == 25


# --- failures are records -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_heads": 3}, "divisible"),
        ({"task": [[7, 20]]}, "context_length"),
        ({"attention": "bogus"}, "bogus"),
        ({"task": [[1, 2]]}, "N must be"),
        ({"task": [[5, 1], [5, 1]]}, "distinct"),
    ],
)
def test_invalid_trial_fails_with_a_message_instead_of_raising(change, message):
    r = run_trial(replace(TINY, **change))
    assert r["status"] == "failed"
    assert r["solved"] is False
    assert message in r["error"]
    assert r["steps"] == 0


# --- gradient clipping groups ---------------------------------------------------------------------------------------


def test_split_clipping_keeps_the_attention_score_parameters_apart():
    from workers.model import Transformer
    from workers.trial import clip_groups

    cfg = replace(TINY, learn_temperature=True)
    names = [n for n, _ in Transformer(cfg.model_config()).named_parameters()]
    assert clip_groups(names, "global") == [names]
    groups = clip_groups(names, "split")
    assert len(groups) == 2
    attention = next(g for g in groups if any(".qkv." in n for n in g))
    rest = next(g for g in groups if g is not attention)
    assert set(attention) == {n for n in names if ".attn.qkv." in n or n.endswith("log_temperature")}
    assert attention and set(rest) == set(names) - set(attention)


@pytest.mark.parametrize("mode", ["global", "split"])
def test_a_trial_runs_under_each_clip_mode_and_they_differ(mode):
    a = run_trial(replace(TINY, max_steps=20, grad_clip=0.05, grad_clip_mode=mode))
    b = run_trial(replace(TINY, max_steps=20, grad_clip=0.05, grad_clip_mode="split" if mode == "global" else "global"))
    assert a["status"] == b["status"] == "unsolved"
    assert a["train_loss"] != b["train_loss"]  # a tight clip: grouping changes the updates
