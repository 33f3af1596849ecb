"""Which trials a study packs together, and the spec's execution field (no Ray needed)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from studies.spec import StudySpec
from workers.callbacks import fixed_config
from workers.packing import AUTO_MAX_MEMBERS, MIX_KINDS_BELOW, cells_of, max_members, member_results, plan_packs
from workers.search import make_cell

BASE: dict[str, Any] = {
    "name": "p",
    "task": {"ladder": [[[7, 2]], [[13, 2]], [[13, 4]]]},
    "model": {"sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2}]},
    "seeds": [0, 1],
}


def _spec(**over: Any) -> StudySpec:
    return StudySpec.model_validate(BASE | over)


# ASHA is allowed within one cell only (one kind, size and point).
ONE_CELL: dict[str, Any] = {
    "attention": ["dpa"],
    "model": {"sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}]},
    "task": {"ladder": [[[7, 2]]]},
    "hparams": {"lr": {"values": [1e-3, 3e-3]}},
}
ASHA = {"early_stopping": {"asha": True, "grace_period": 100}}


def _cells(spec: StudySpec) -> list[dict[str, Any]]:
    return [
        make_cell(spec, kind, si, pi, 3e-3, seed)
        for si in range(2)
        for pi in range(3)
        for seed in spec.seeds
        for kind in spec.attention
    ]


def test_packs_group_one_kind_and_size_and_keep_every_cell_once():
    spec = _spec()
    cells = _cells(spec)
    packs = plan_packs(cells, max_members(spec), fixed_config(spec), spec.max_concurrent)
    assert len(packs) == 4  # (dpa, ea) x (d16, d32), 6 members each
    assert sorted(len(p) for p in packs) == [6, 6, 6, 6]
    for p in packs:
        assert len({(c["kind"], c["size_idx"]) for c in p}) == 1
    flat = [c for p in packs for c in p]
    assert sorted(map(str, flat)) == sorted(map(str, cells))


def test_packs_are_balanced_under_the_limit_and_split_for_idle_workers():
    spec = _spec()
    cells, fixed = _cells(spec), fixed_config(spec)
    assert sorted(len(p) for p in plan_packs(cells, 4, fixed, 1)) == [3] * 8  # 6 a group, limit 4: two of 3
    one_group = [c for c in cells if c["kind"] == "dpa" and c["size_idx"] == 0]
    assert [len(p) for p in plan_packs(one_group, 32, fixed, 1)] == [6]
    assert sorted(len(p) for p in plan_packs(one_group, 32, fixed, 2)) == [3, 3]  # two workers: two packs
    assert sorted(len(p) for p in plan_packs(one_group[:1], 32, fixed, 4)) == [1]  # nothing left to split


def test_a_searchers_few_twins_share_a_pack_and_many_train_by_kind():
    spec = _spec(attention=["dpa", "ea", "ea_norm"])
    cells, fixed = _cells(spec), fixed_config(spec)
    probe = [c for c in cells if c["size_idx"] == 0 and c["coords"] == [1] and c["seed"] == 0]  # one probe's twins
    (pack, norm) = sorted(plan_packs(probe, 32, fixed, mix_kinds=True), key=len, reverse=True)
    assert sorted(c["kind"] for c in pack) == ["dpa", "ea"] and [c["kind"] for c in norm] == ["ea_norm"]
    assert sorted(len(p) for p in plan_packs(probe, 32, fixed)) == [1, 1, 1]  # a grid packs one kind at a time
    # every kind with MIX_KINDS_BELOW cells of its own: packs by kind again (mixing costs more than it saves)
    many = [make_cell(spec, k, 0, 0, 3e-3, seed) for seed in range(MIX_KINDS_BELOW) for k in ("dpa", "ea")]
    assert [{c["kind"] for c in p} for p in plan_packs(many, 32, fixed, mix_kinds=True)] == [{"dpa"}, {"ea"}]
    mixed = plan_packs(many[:-1], 32, fixed, mix_kinds=True)  # one EA cell short: one pack
    assert [len(p) for p in mixed] == [2 * MIX_KINDS_BELOW - 1]


def test_execution_pack_resolves_per_study():
    assert max_members(_spec()) == AUTO_MAX_MEMBERS
    assert max_members(_spec(execution={"pack": "off"})) == 1
    assert max_members(_spec(execution={"pack": 5})) == 5
    assert max_members(_spec(**ONE_CELL, **ASHA)) == 1  # auto: ASHA runs unpacked
    lr = {"lr": {"low": 1e-3, "high": 1e-2}}
    # optuna: small packs, so that TPE sees OPTUNA_ROUNDS rounds of results (2 seeds x n_trials per kind)
    assert max_members(_spec(search={"method": "optuna", "n_trials": 3}, hparams=lr)) == 1
    assert max_members(_spec(search={"method": "optuna", "n_trials": 40}, hparams=lr)) == 20
    assert max_members(_spec(search={"method": "optuna", "n_trials": 40}, hparams=lr, execution={"pack": 3})) == 3
    assert max_members(_spec(search={"method": "frontier"})) == AUTO_MAX_MEMBERS


@pytest.mark.parametrize(
    ("over", "rule"),
    [
        ({"execution": {"pack": 4}, **ONE_CELL, **ASHA}, "asha"),
        ({"execution": {"pack": 0}}, "greater than or equal to 1"),
        ({"execution": {"pack": "sometimes"}}, "pack"),
        ({"execution": {"checkpoint_every": 0}}, "greater than or equal to 1"),
    ],
)
def test_bad_execution_is_refused_naming_the_field(over, rule):
    with pytest.raises(ValidationError) as e:
        _spec(**over)
    text = str(e.value)
    assert "execution" in text and rule in text


def test_member_ids_and_results_map_back_to_cells():
    spec = _spec()
    pack = plan_packs(_cells(spec), 32, fixed_config(spec), 1)[0]
    config = {"pack": pack, "fixed": {}}
    ids = [tid for tid, _ in cells_of("abc_00001", config)]
    assert ids == [f"abc_00001.m{i}" for i in range(len(pack))]
    result = {"members": {"1": {"step": 100, "eval_acc": 0.5}}, "finals": {"0": {"status": "solved"}}}
    got = list(member_results("abc_00001", config, result))
    assert got == [
        ("abc_00001.m1", pack[1], "progress", {"step": 100, "eval_acc": 0.5}),
        ("abc_00001.m0", pack[0], "final", {"status": "solved"}),
    ]
    solo = {"cell": pack[0], "fixed": {}}
    assert list(member_results("t", solo, {"final": True})) == [("t", pack[0], "final", {"final": True})]


def test_a_pack_worker_imports_only_what_training_needs():
    """A fresh Ray worker running ``train_pack`` imports ``workers.packing`` and what its functions
    import when they run: not the driver's report, its statistics (scipy), MLflow or Optuna, which
    cost every worker start about 1 s more (docs/benchmarks.md)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import workers.packing

    tree = ast.parse(Path(workers.packing.__file__).read_text())
    mods = sorted({n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level})
    mods += sorted({a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names})
    heavy = ["scipy", "mlflow", "optuna", "studies.report", "workers.callbacks", "workers.driver"]
    code = f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
    code += f"print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", (mods, out.stdout)
