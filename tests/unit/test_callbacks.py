"""A trial's resolved config: the study's fixed settings, resolved per attention kind."""

from __future__ import annotations

from studies.spec import StudySpec
from workers.callbacks import fixed_config, trial_config
from workers.search import make_cell

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
