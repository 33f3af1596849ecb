"""Study spec: every validation rule names its field and rule; parsing, schema, presets, points, plans."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from studies.spec import SPEC_VERSION, FloatParam, StudySpec, json_schema

STUDIES = Path(__file__).resolve().parents[2] / "studies"
PRESETS = sorted(STUDIES.glob("*.yaml"))

SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}
BASE: dict[str, Any] = {"name": "t", "task": {"ladder": [[[7, 2]], [[13, 2]]]}, "model": {"sizes": [SIZE]}}


def make(**top: Any) -> dict[str, Any]:
    """The base spec data with top-level fields replaced (a value None removes the field)."""
    data = copy.deepcopy(BASE) | copy.deepcopy(top)
    return {k: v for k, v in data.items() if v is not None}


def grid(n: list[int], t: list[Any], **task: Any) -> dict[str, Any]:
    return {"grid": {"N": n, "T": t}, **task}


def lr(**param: Any) -> dict[str, Any]:
    return {"lr": param}


def rejected(data: dict[str, Any], loc: tuple[str | int, ...], *fragments: str) -> None:
    """``data`` fails validation with an error at exactly ``loc`` whose message has every fragment."""
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(data)
    errors = info.value.errors()
    seen = [(e["loc"], e["msg"]) for e in errors]
    at_loc = [e["msg"] for e in errors if tuple(e["loc"]) == loc]
    assert at_loc, f"no error at {loc}; errors: {seen}"
    assert any(all(f in msg for f in fragments) for msg in at_loc), f"no error at {loc} says {fragments}; {seen}"


def accepted(data: dict[str, Any]) -> StudySpec:
    return StudySpec.model_validate(data)


# --- validation rules: (data, field, rule) ------------------------------------------------


def rule(data: dict[str, Any], loc: tuple[str | int, ...], *fragments: str, id: str) -> Any:
    return pytest.param(data, loc, fragments, id=id)


# Cross-field rules of the whole spec are reported at loc () and name the field in the message.
RULES = [
    # model sizes
    rule(
        make(model={"sizes": [SIZE, {"d_model": 16, "n_layers": 1, "n_heads": 3}]}),
        ("model", "sizes", 1),
        "d_model must be divisible by n_heads",
        "n_heads=3",
        id="heads-divide-sizes",
    ),
    rule(
        make(model={"d_model": [16, 20], "n_layers": [1], "n_heads": [2, 8]}),
        ("model",),
        "d_model must be divisible by n_heads",
        "d_model=20, n_heads=8",
        id="heads-divide-axes-product",
    ),
    rule(make(model={"sizes": [SIZE], "d_model": [16]}), ("model",), "not both", id="model-sizes-and-axes"),
    rule(make(model={}), ("model",), "give sizes, or all three axes", id="model-neither-form"),
    rule(make(model={"d_model": [16], "n_layers": [1]}), ("model",), "all three axes", id="model-axis-missing"),
    rule(make(model={"sizes": []}), ("model",), "sizes must not be empty", id="empty-sizes"),
    rule(
        make(model={"d_model": [], "n_layers": [1], "n_heads": [2]}),
        ("model",),
        "d_model axis must not be empty",
        id="empty-d_model-axis",
    ),
    rule(
        make(model={"d_model": [16], "n_layers": [], "n_heads": [2]}),
        ("model",),
        "n_layers axis must not be empty",
        id="empty-n_layers-axis",
    ),
    rule(
        make(model={"d_model": [16], "n_layers": [1], "n_heads": []}),
        ("model",),
        "n_heads axis must not be empty",
        id="empty-n_heads-axis",
    ),
    rule(
        make(model={"sizes": [{"d_model": 0, "n_layers": 1, "n_heads": 1}]}),
        ("model", "sizes", 0, "d_model"),
        "greater than or equal to 1",
        id="d_model-positive",
    ),
    # context length
    rule(
        make(task={"ladder": [[[7, 2]], [[7, 13]]]}),
        ("training", "context_length"),
        "training.context_length=16 is too short for task point N7_T13",
        ">= 17",
        id="context-too-short-for-T",
    ),
    rule(
        make(task={"ladder": [[[7, 11], [7, 4]]]}),
        ("training", "context_length"),
        "too short for task point N7_T11+N7_T4",
        ">= 17",
        id="context-too-short-for-mixture",
    ),
    rule(
        make(task={"ladder": [[[7, 8]]], "context_margin": 9}),
        ("training", "context_length"),
        "too short for task point N7_T8",
        "context_margin=9",
        id="context-too-short-for-margin",
    ),
    rule(
        make(task=grid([5], [1, 13])),
        ("training", "context_length"),
        "too short for task point N5_T13",
        id="context-too-short-grid",
    ),
    # task values
    rule(make(task={"ladder": [[[1, 2]]]}), ("task", "ladder", 0, 0, 0), "greater than or equal to 2", id="N-below-2"),
    rule(make(task=grid([5, 1], [1])), ("task", "grid", "N", 1), "greater than or equal to 2", id="grid-N-below-2"),
    rule(make(task={"ladder": [[[7, 0]]]}), ("task", "ladder", 0, 0, 1), "greater than or equal to 1", id="T-below-1"),
    rule(
        make(task=grid([5], [0])),
        ("task", "grid", "T", 0, "constrained-int"),
        "greater than or equal to 1",
        id="grid-T-below-1",
    ),
    rule(
        make(task=grid([5], [[1, 0]])),
        ("task", "grid", "T", 0, "list[constrained-int]", 1),
        "greater than or equal to 1",
        id="grid-T-set-below-1",
    ),
    rule(make(task={"ladder": [[[7, 2, 1]]]}), ("task", "ladder", 0, 0), "at most 2 items", id="member-is-a-pair"),
    rule(
        make(task={"ladder": [[[7, 2]]], "identify_margin": -1}),
        ("task", "identify_margin"),
        "greater than or equal to 0",
        id="identify-margin-range",
    ),
    rule(
        make(task={"ladder": [[[7, 2]]], "context_margin": 0}),
        ("task", "context_margin"),
        "greater than or equal to 1",
        id="context-margin-range",
    ),
    rule(make(task={"ladder": [[[7, 2]]], "family": "xy"}), ("task", "family"), "'nt'", id="unknown-family"),
    # task forms, emptiness and duplicates
    rule(make(task={"ladder": []}), ("task",), "ladder must not be empty", id="empty-ladder"),
    rule(make(task={"ladder": [[[7, 2]], []]}), ("task",), "ladder[1] must have at least one", id="empty-rung"),
    rule(make(task=grid([], [1])), ("task", "grid", "N"), "at least 1 item", id="empty-grid-N"),
    rule(make(task=grid([5], [])), ("task", "grid", "T"), "at least 1 item", id="empty-grid-T"),
    rule(make(task=grid([5], [1, []])), ("task",), "grid.T set [] must be non-empty", id="empty-grid-T-set"),
    rule(make(task=grid([5], [[1, 1]])), ("task",), "grid.T set [1, 1]", "distinct values", id="grid-T-set-repeats"),
    rule(
        make(task={"ladder": [[[7, 2], [13, 2], [7, 2]]]}),
        ("task",),
        "ladder[0] repeats a member",
        id="rung-repeats-member",
    ),
    rule(
        make(task={"ladder": [[[7, 2]], [[13, 2]], [[7, 2]]]}),
        ("task",),
        "task points must be distinct",
        id="duplicate-rungs",
    ),
    rule(make(task=grid([5, 5], [1])), ("task",), "task points must be distinct", id="duplicate-grid-N"),
    rule(make(task=grid([5], [2, 2])), ("task",), "task points must be distinct", id="duplicate-grid-T"),
    rule(
        make(task={"ladder": [[[7, 2]]], "grid": {"N": [5], "T": [1]}}),
        ("task",),
        "give exactly one of ladder or grid",
        id="ladder-and-grid",
    ),
    rule(make(task={}), ("task",), "give exactly one of ladder or grid", id="neither-ladder-nor-grid"),
    rule(make(task=None), ("task",), "Field required", id="task-required"),
    # attention kinds and seeds
    rule(make(attention=[]), ("attention",), "at least 1 item", id="empty-attention"),
    rule(
        make(attention=["dpa", "softmax2"]),
        ("attention",),
        "unknown attention kind(s) ['softmax2']",
        "registered kinds",
        id="unknown-kind",
    ),
    rule(make(attention=["ea", "ea"]), ("attention",), "attention kinds must be distinct", id="duplicate-kinds"),
    rule(make(seeds=[]), ("seeds",), "at least 1 item", id="empty-seeds"),
    rule(make(seeds=[0, 1, 0]), ("seeds",), "seeds must be distinct", id="duplicate-seeds"),
    rule(make(seeds=[-1]), ("seeds", 0), "greater than or equal to 0", id="negative-seed"),
    rule(make(seeds=[2**31]), ("seeds", 0), "less than 2147483648", id="seed-too-large"),
    # learning rate
    rule(
        make(hparams=lr(values=[1e-3], low=1e-4, high=1e-2)),
        ("hparams", "lr"),
        "give either values or both low and high",
        id="lr-values-and-range",
    ),
    rule(make(hparams=lr()), ("hparams", "lr"), "give either values or both low and high", id="lr-neither"),
    rule(make(hparams=lr(low=1e-4)), ("hparams", "lr"), "give either values or both low and high", id="lr-low-only"),
    rule(make(hparams=lr(high=1e-2)), ("hparams", "lr"), "give either values or both low and high", id="lr-high-only"),
    rule(make(hparams=lr(values=[])), ("hparams", "lr"), "values must not be empty", id="lr-empty-values"),
    rule(make(hparams=lr(low=1e-2, high=1e-2)), ("hparams", "lr"), "low must be < high", id="lr-low-equals-high"),
    rule(make(hparams=lr(low=1e-2, high=1e-3)), ("hparams", "lr"), "low must be < high", id="lr-low-above-high"),
    rule(make(hparams=lr(values=[1e-3, 0.0])), ("hparams", "lr", "values", 1), "greater than 0", id="lr-positive"),
    # search, budget, early stopping, training
    rule(make(search={"method": "optuna"}), ("search",), "n_trials is required when method is 'optuna'", id="optuna-n"),
    rule(make(search={"method": "random"}), ("search", "method"), "'grid'", id="unknown-search-method"),
    rule(
        make(caps={"max_trials": 3}),
        ("caps", "max_trials"),
        "the study plans 4 trials, more than caps.max_trials=3",
        "raise the cap",
        id="planned-over-cap",
    ),
    rule(
        make(search={"method": "optuna", "n_trials": 6}, seeds=[0, 1], caps={"max_trials": 23}),
        ("caps", "max_trials"),
        "plans 24 trials",
        id="optuna-planned-over-cap",
    ),
    rule(
        make(early_stopping={"asha": True, "grace_period": 1001}, attention=["ea"], task={"ladder": [[[7, 2]]]}),
        ("early_stopping", "grace_period"),
        "early_stopping.grace_period must be <= training.max_steps",
        id="asha-grace-over-max-steps",
    ),
    rule(
        make(early_stopping={"reduction_factor": 1}),
        ("early_stopping", "reduction_factor"),
        "greater than 1",
        id="asha-reduction-factor",
    ),
    rule(
        make(training={"max_steps": 100, "eval_interval": 101}),
        ("training",),
        "eval_interval must be <= max_steps (101 > 100)",
        id="eval-interval-over-max-steps",
    ),
    rule(
        make(training={"context_length": 5000}),
        ("training", "context_length"),
        "less than or equal to 4096",
        id="context-length-cap",
    ),
    # unknown fields (typos) are errors, at every level
    rule(
        make(training={"max_step": 100}), ("training", "max_step"), "Extra inputs are not permitted", id="typo-training"
    ),
    rule(make(seed=[0]), ("seed",), "Extra inputs are not permitted", id="typo-top-level"),
    rule(
        make(task={"ladders": [[[7, 2]]], "ladder": [[[7, 2]]]}),
        ("task", "ladders"),
        "Extra inputs are not permitted",
        id="typo-task",
    ),
    rule(
        make(model={"sizes": [{"d_model": 16, "n_layer": 1, "n_layers": 1, "n_heads": 2}]}),
        ("model", "sizes", 0, "n_layer"),
        "Extra inputs are not permitted",
        id="typo-size",
    ),
    rule(
        make(hparams=lr(values=[1e-3], logg=True)),
        ("hparams", "lr", "logg"),
        "Extra inputs are not permitted",
        id="typo-lr",
    ),
    rule(make(resources={"gpus": 1}), ("resources", "gpus"), "Extra inputs", id="typo-resources"),
    # version, name, ranges
    rule(make(spec_version=2), ("spec_version",), "Input should be 1", id="spec-version-2"),
    rule(make(spec_version=0), ("spec_version",), "Input should be 1", id="spec-version-0"),
    rule(make(name="a b"), ("name",), "should match pattern", id="name-space"),
    rule(make(name="a/b"), ("name",), "should match pattern", id="name-slash"),
    rule(make(name="../etc"), ("name",), "should match pattern", id="name-dotdot"),
    rule(make(name=".hidden"), ("name",), "should match pattern", id="name-leading-dot"),
    rule(make(name="a\\b"), ("name",), "should match pattern", id="name-backslash"),
    rule(make(name="a\nb"), ("name",), "should match pattern", id="name-newline"),
    rule(make(name=""), ("name",), "at least 1 character", id="name-empty"),
    rule(make(name="x" * 101), ("name",), "at most 100 characters", id="name-too-long"),
    rule(make(name=None), ("name",), "Field required", id="name-required"),
    rule(make(threshold=0), ("threshold",), "greater than 0", id="threshold-zero"),
    rule(make(threshold=1.01), ("threshold",), "less than or equal to 1", id="threshold-above-1"),
    rule(make(resources={"cpu": 0}), ("resources", "cpu"), "greater than 0", id="cpu-zero"),
    rule(make(resources={"cpu": 257}), ("resources", "cpu"), "less than or equal to 256", id="cpu-too-many"),
    rule(make(resources={"gpu": -0.5}), ("resources", "gpu"), "greater than or equal to 0", id="gpu-negative"),
    rule(make(resources={"gpu": 9}), ("resources", "gpu"), "less than or equal to 8", id="gpu-too-many"),
    rule(make(max_concurrent=0), ("max_concurrent",), "greater than or equal to 1", id="max-concurrent"),
    rule(make(eps=0), ("eps",), "greater than 0", id="eps-zero"),
    rule(make(eps=1), ("eps",), "less than 1", id="eps-one"),
    rule(make(caps={"max_trials": 0}), ("caps", "max_trials"), "greater than or equal to 1", id="cap-zero"),
]


@pytest.mark.parametrize(("data", "loc", "fragments"), RULES)
def test_invalid_spec_names_field_and_rule(
    data: dict[str, Any], loc: tuple[str | int, ...], fragments: tuple[str, ...]
) -> None:
    rejected(data, loc, *fragments)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(make(model={"d_model": [16, 32], "n_layers": [1, 2], "n_heads": [2, 4]}), id="axes-all-divide"),
        pytest.param(make(task={"ladder": [[[7, 12]]]}), id="context-exactly-enough-for-T"),
        pytest.param(make(task={"ladder": [[[7, 11], [7, 4]]], "identify_margin": 1}), id="mixture-smaller-margin"),
        pytest.param(make(task={"ladder": [[[7, 10], [7, 4]]]}), id="mixture-exactly-enough"),
        pytest.param(make(task={"ladder": [[[7, 11], [7, 4]]]}, training={"context_length": 17}), id="longer-context"),
        pytest.param(make(task={"ladder": [[[2, 1]]]}), id="smallest-N-and-T"),
        pytest.param(make(caps={"max_trials": 4}), id="planned-equals-cap"),
        pytest.param(
            make(early_stopping={"asha": True, "grace_period": 1000}, attention=["ea"], task={"ladder": [[[7, 2]]]}),
            id="grace-equals-max-steps",
        ),
        pytest.param(make(early_stopping={"asha": False, "grace_period": 5000}), id="grace-ignored-without-asha"),
        pytest.param(make(training={"max_steps": 100, "eval_interval": 100}), id="eval-interval-equals-max-steps"),
        pytest.param(make(hparams=lr(low=1e-4, high=1e-2, log=False)), id="lr-linear-range"),
        pytest.param(make(name="DPA-vs-EA_v1.2"), id="name-with-dot-dash-underscore"),
        pytest.param(make(threshold=1.0, resources={"cpu": 0.5, "gpu": 0.25}), id="threshold-1-fractional-resources"),
        pytest.param(make(attention=["ea_norm"], eps=1e-3), id="one-kind"),
        pytest.param(make(task=grid([5, 7], [1, [1, 2], [2, 3]])), id="grid-with-T-sets"),
    ],
)
def test_valid_edge_cases_are_accepted(data: dict[str, Any]) -> None:
    accepted(data)


def test_defaults_are_the_documented_ones() -> None:
    spec = accepted(make())
    assert spec.spec_version == SPEC_VERSION == 1
    assert spec.attention == ["dpa", "ea"]
    assert spec.seeds == [0]
    assert spec.threshold == 0.99
    assert spec.search.method == "grid"
    assert spec.training.context_length == 16
    assert spec.hparams.lr.grid_values() == [3e-3]


def test_spec_is_frozen() -> None:
    spec = accepted(make())
    with pytest.raises(ValidationError, match="frozen"):
        spec.threshold = 0.5


# --- rules added after review: each once failed as a strict xfail -----------------------------------


@pytest.mark.parametrize(
    "model",
    [
        pytest.param({"sizes": [SIZE, SIZE]}, id="sizes"),
        pytest.param({"d_model": [16, 16], "n_layers": [1], "n_heads": [2]}, id="axes"),
    ],
)
def test_duplicate_sizes_are_rejected(model: dict[str, Any]) -> None:
    rejected(make(model=model), ("model",), "distinct")


def test_duplicate_lr_values_are_rejected() -> None:
    rejected(make(hparams=lr(values=[1e-3, 1e-3])), ("hparams", "lr"), "distinct")


def test_lr_values_with_a_half_range_is_rejected() -> None:
    rejected(make(hparams=lr(values=[1e-3], low=1e-4)), ("hparams", "lr"), "give either values or both low and high")


@pytest.mark.parametrize(
    "task",
    [
        pytest.param({"ladder": [[[7, 1], [7, 2]], [[7, 2], [7, 1]]]}, id="ladder"),
        pytest.param({"grid": {"N": [7], "T": [[1, 2], [2, 1]]}}, id="grid"),
    ],
)
def test_reordered_mixtures_are_duplicate_points(task: dict[str, Any]) -> None:
    rejected(make(task=task), ("task",), "task points must be distinct")


# --- parsing ------------------------------------------------------------------------------

YAML_TEXT = """\
# a comment
name: parsed
attention: [dpa, ea]
task:
  ladder:
    - [[7, 2]]
    - [[7, 1], [7, 2]]
model:
  sizes:
    - {d_model: 16, n_layers: 1, n_heads: 2}
hparams:
  lr: {low: 1e-4, high: 1.0e-2}
seeds: [0, 1]
search: {method: optuna, n_trials: 4}
"""


def test_from_text_reads_yaml() -> None:
    spec = StudySpec.from_text(YAML_TEXT)
    assert spec.name == "parsed"
    assert [p.name for p in spec.task.points()] == ["N7_T2", "N7_T1+N7_T2"]
    # YAML 1.1 reads 1e-4 as a string: it must still become the number
    assert spec.hparams.lr.low == pytest.approx(1e-4)
    assert spec.hparams.lr.high == pytest.approx(1e-2)
    assert spec.search.n_trials == 4


def test_from_text_reads_json() -> None:
    data = yaml.safe_load(YAML_TEXT)
    spec = StudySpec.from_text(json.dumps(data))
    assert spec == StudySpec.from_text(YAML_TEXT)
    assert spec == StudySpec.from_text(json.dumps(data, indent=2))


def test_from_text_reads_tab_indented_json() -> None:
    data = yaml.safe_load(YAML_TEXT)
    assert StudySpec.from_text(json.dumps(data, indent="\t")) == StudySpec.from_text(YAML_TEXT)


@pytest.mark.parametrize("text", ["[1, 2]", "42", "", "null", "just words", "- name: t\n"])
def test_from_text_rejects_non_mappings(text: str) -> None:
    with pytest.raises(ValueError, match="must be a mapping"):
        StudySpec.from_text(text)


@pytest.mark.parametrize("text", ["name: [unclosed", '{"name": "t",', "a: b: c"])
def test_from_text_reports_syntax_errors_as_value_errors(text: str) -> None:
    with pytest.raises(ValueError, match="not valid YAML or JSON"):
        StudySpec.from_text(text)


def test_from_text_refuses_yaml_aliases() -> None:
    text = YAML_TEXT.replace("seeds: [0, 1]", "seeds: &s [0, 1]\ndescription: *s")
    with pytest.raises(ValueError, match="aliases are not allowed"):
        StudySpec.from_text(text)


def test_from_text_validation_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.from_text(YAML_TEXT.replace("seeds: [0, 1]", "seeds: [0, 1]\nmax_step: 3"))
    assert [e["loc"] for e in info.value.errors()] == [("max_step",)]


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(YAML_TEXT)
    assert StudySpec.from_file(path) == StudySpec.from_text(YAML_TEXT)
    assert StudySpec.from_file(str(path)) == StudySpec.from_text(YAML_TEXT)
    with pytest.raises(FileNotFoundError):
        StudySpec.from_file(tmp_path / "missing.yaml")


ROUND_TRIP = [
    pytest.param(StudySpec.from_text(YAML_TEXT), id="ladder-optuna-range"),
    pytest.param(
        accepted(
            make(
                task=grid([5, 7], [1, [1, 2]], identify_margin=1),
                model={"d_model": [16, 32], "n_layers": [1], "n_heads": [2, 4]},
                hparams=lr(values=[1e-3, 3e-3]),
                early_stopping={"asha": False, "grace_period": 100},
                caps={"max_trials": 100, "max_cpu_hours": 2.5},
                resources={"cpu": 2, "gpu": 0.5},
                description="a grid",
            )
        ),
        id="grid-everything-set",
    ),
]


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_json_round_trip(spec: StudySpec) -> None:
    text = spec.to_json()
    again = StudySpec.model_validate_json(text)
    assert again == spec
    assert again.to_json() == text
    assert again.task.points() == spec.task.points()
    assert StudySpec.from_text(text) == spec


# --- JSON Schema and presets --------------------------------------------------------------


def test_json_schema_is_valid_and_versioned() -> None:
    schema = json_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$id"].endswith(f"/v{SPEC_VERSION}.json")
    assert {"name", "task", "model"} <= set(schema["required"])
    json.dumps(schema)  # publishable as is


def test_json_schema_validates_quickstart_and_rejects_typos() -> None:
    validator = Draft202012Validator(json_schema())
    data = yaml.safe_load((STUDIES / "quickstart.yaml").read_text())
    assert list(validator.iter_errors(data)) == []
    bad = copy.deepcopy(data) | {"max_step": 10, "name": "a b"}
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert any("'max_step' was unexpected" in m for m in messages), messages
    assert any("'a b' does not match" in m for m in messages), messages


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_json_schema_validates_dumped_specs(spec: StudySpec) -> None:
    assert list(Draft202012Validator(json_schema()).iter_errors(json.loads(spec.to_json()))) == []


def test_presets_exist() -> None:
    assert {"quickstart", "multitask", "scaling"} <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_validates(path: Path) -> None:
    spec = StudySpec.from_file(path)
    assert spec.name == path.stem
    assert path.read_text().startswith("#"), "a preset starts with a comment saying what it asks and what it costs"
    assert list(Draft202012Validator(json_schema()).iter_errors(yaml.safe_load(path.read_text()))) == []
    assert spec.planned_trials() <= spec.caps.max_trials


def test_multitask_preset_has_mixtures() -> None:
    spec = StudySpec.from_file(STUDIES / "multitask.yaml")
    assert all(len(p.members) >= 2 for p in spec.task.points())
    assert len(spec.seeds) >= 2


def test_scaling_preset_shape() -> None:
    spec = StudySpec.from_file(STUDIES / "scaling.yaml")
    d_models = [s.d_model for s in spec.model.all_sizes()]
    assert 4 <= len(d_models) <= 5 and min(d_models) == 16 and max(d_models) == 128
    assert spec.search.method == "frontier"
    assert spec.seeds == [0, 1, 2]
    assert spec.max_concurrent == 16
    assert spec.planned_trials() > 500  # above the default cap, which the preset raises


# --- points, sizes, plans -----------------------------------------------------------------


def test_ladder_points_in_order_with_rung_coords() -> None:
    spec = accepted(make(task={"ladder": [[[7, 2]], [[7, 1], [7, 3]], [[13, 2]]]}))
    points = spec.task.points()
    assert [(p.name, p.coords, p.members) for p in points] == [
        ("N7_T2", (0,), [(7, 2)]),
        ("N7_T1+N7_T3", (1,), [(7, 1), (7, 3)]),
        ("N13_T2", (2,), [(13, 2)]),
    ]
    assert spec.task.axes == ["rung"]


def test_grid_points_row_major_with_T_sets_as_mixtures() -> None:
    spec = accepted(make(task=grid([5, 7], [1, [1, 2], 3])))
    points = spec.task.points()
    assert [(p.name, p.coords) for p in points] == [
        ("N5_T1", (0, 0)),
        ("N5_T1+N5_T2", (0, 1)),
        ("N5_T3", (0, 2)),
        ("N7_T1", (1, 0)),
        ("N7_T1+N7_T2", (1, 1)),
        ("N7_T3", (1, 2)),
    ]
    assert points[4].members == [(7, 1), (7, 2)]
    assert spec.task.axes == ["N", "T"]
    mix = points[4].mix(spec.task.identify_margin)
    assert mix.score_start == 2 + spec.task.identify_margin


def test_axes_product_order_and_names() -> None:
    spec = accepted(make(model={"d_model": [16, 32], "n_layers": [1, 2], "n_heads": [2, 4]}))
    assert [s.name for s in spec.model.all_sizes()] == [
        "d16_l1_h2",
        "d16_l1_h4",
        "d16_l2_h2",
        "d16_l2_h4",
        "d32_l1_h2",
        "d32_l1_h4",
        "d32_l2_h2",
        "d32_l2_h4",
    ]


def test_lr_grid_values() -> None:
    assert FloatParam(values=[1e-3, 3e-3]).grid_values() == [1e-3, 3e-3]
    assert FloatParam(low=1e-4, high=1e-2).grid_values() == [pytest.approx(1e-3)]
    assert FloatParam(low=1e-4, high=1e-2, log=False).grid_values() == [pytest.approx(0.00505)]


PLAN = {
    "task": grid([5, 7], [1, 2, [1, 2]]),  # 6 points
    "model": {"d_model": [16, 32], "n_layers": [1], "n_heads": [2, 4]},  # 4 sizes
    "hparams": lr(values=[1e-3, 3e-3]),  # 2 lrs
    "seeds": [0, 1, 2],
    "attention": ["dpa", "ea"],
}


@pytest.mark.parametrize(
    ("search", "planned"),
    [
        pytest.param({"method": "grid"}, 2 * 3 * 4 * 6 * 2, id="grid"),
        pytest.param({"method": "frontier"}, 2 * 3 * 4 * 6 * 2, id="frontier-full-grid-bound"),
        pytest.param({"method": "optuna", "n_trials": 10}, 2 * 3 * 10, id="optuna"),
        pytest.param({"method": "grid", "n_trials": 10}, 2 * 3 * 4 * 6 * 2, id="grid-ignores-n_trials"),
    ],
)
def test_planned_trials(search: dict[str, Any], planned: int) -> None:
    assert accepted(make(**PLAN, search=search)).planned_trials() == planned


def test_planned_trials_with_a_searched_lr_counts_one_grid_value() -> None:
    spec = accepted(make(**PLAN | {"hparams": lr(low=1e-4, high=1e-2)}, search={"method": "frontier"}))
    assert spec.planned_trials() == 2 * 3 * 4 * 6 * 1


# --- evaluation: pools, resolution, identifiability -----------------------------------------------------------------


def test_orbit_holdout_refuses_a_pool_too_small_for_the_threshold_with_the_numbers():
    rejected(
        make(task={"ladder": [[[13, 2]]]}, evaluation={"holdout": "orbit"}),
        ("evaluation", "holdout"),
        "N13_T2",
        "181",
        "6085",
    )
    StudySpec.model_validate(make(task={"ladder": [[[13, 3]]]}, evaluation={"holdout": "orbit"}, threshold=0.9))


def test_orbit_holdout_refuses_mixtures_and_unknown_holdouts_are_named():
    rejected(
        make(task={"ladder": [[[13, 3], [13, 2]]]}, evaluation={"holdout": "orbit"}, threshold=0.9),
        ("evaluation", "holdout"),
        "mixture",
    )
    rejected(make(evaluation={"holdout": "split"}), ("evaluation", "holdout"), "unknown holdout", "fresh")


def test_a_mixture_no_model_can_solve_at_the_threshold_is_refused_with_its_bound():
    spec = make(task={"ladder": [[[5, 1], [5, 2]]], "identify_margin": 0, "context_margin": 1})
    rejected(spec | {"training": {"context_length": 4}}, ("threshold",), "N5_T1+N5_T2", "no model", "0.")
    StudySpec.model_validate(make(task={"ladder": [[[5, 1], [7, 1]]]}))  # bound 0.9925 >= 0.99


def test_eval_sequences_is_optional_and_a_minimum():
    assert StudySpec.model_validate(make()).training.eval_sequences is None
    assert StudySpec.model_validate(make(training={"eval_sequences": 2000})).training.eval_sequences == 2000


# --- fairness settings ----------------------------------------------------------------------------------------------


def test_fairness_defaults_and_per_kind_settings():
    spec = StudySpec.model_validate(make())
    assert spec.fairness.positional == "learned" and spec.fairness.grad_clip_mode in ("global", "split")
    assert spec.fairness.kind("ea").lr_scale == 1.0
    spec = StudySpec.model_validate(
        make(fairness={"kinds": {"ea": {"lr_scale": 3.0, "qkv_init_std": 0.2, "learn_temperature": True}}})
    )
    assert spec.fairness.kind("ea").lr_scale == 3.0 and spec.fairness.kind("ea").learn_temperature
    assert spec.fairness.kind("dpa") == type(spec.fairness.kind("ea"))()


@pytest.mark.parametrize(
    ("fairness", "loc", "fragment"),
    [
        ({"kinds": {"ea_norm": {}}}, ("fairness", "kinds"), "ea_norm"),
        ({"kinds": {"ea": {"lr_scale": 0}}}, ("fairness", "kinds", "ea", "lr_scale"), "greater than 0"),
        ({"kinds": {"ea": {"qkv_init_std": 2}}}, ("fairness", "kinds", "ea", "qkv_init_std"), "less than or equal"),
        ({"kinds": {"ea": {"temperature": -1}}}, ("fairness", "kinds", "ea", "temperature"), "greater than 0"),
        ({"positional": "alibi"}, ("fairness", "positional"), "unknown positional"),
        ({"grad_clip_mode": "per_param"}, ("fairness", "grad_clip_mode"), "global"),
    ],
)
def test_bad_fairness_settings_name_their_field(fairness, loc, fragment):
    rejected(make(fairness=fairness), loc, fragment)


def test_rotary_positions_refuse_odd_head_sizes():
    rejected(
        make(model={"sizes": [{"d_model": 6, "n_layers": 1, "n_heads": 2}]}, fairness={"positional": "rotary"}),
        ("fairness", "positional"),
        "even head size",
        "d6_l1_h2",
    )


# --- ASHA only within one cell --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "found"),
    [
        ({}, "2 attention kinds"),  # the base spec: dpa and ea, two points
        ({"attention": ["ea"]}, "2 task points"),
        (
            {
                "attention": ["ea"],
                "task": {"ladder": [[[7, 2]]]},
                "model": {"d_model": [16, 32], "n_layers": [1], "n_heads": [2]},
            },
            "2 model sizes",
        ),
    ],
)
def test_asha_across_kinds_sizes_or_points_is_refused(change, found):
    rejected(make(early_stopping={"asha": True, "grace_period": 100}, **change), ("early_stopping", "asha"), found)


def test_asha_within_one_cell_is_accepted():
    spec = make(attention=["dpa"], task={"ladder": [[[7, 2]]]}, hparams=lr(values=[1e-3, 3e-3]), seeds=[0, 1])
    StudySpec.model_validate(spec | {"early_stopping": {"asha": True, "grace_period": 100}})


# --- upper bounds: checked before anything is expanded -------------------------------------

BIG_GRID = grid(list(range(2, 3002)), list(range(1, 3001)))


@pytest.mark.parametrize(
    ("data", "loc", "fragment"),
    [
        (make(task={"ladder": [[[10**12, 2]]]}), ("task", "ladder", 0, 0, 0), "less than or equal to 100000"),
        (make(task={"ladder": [[[7, 10**6]]]}), ("task", "ladder", 0, 0, 1), "less than or equal to 512"),
        (make(task={"ladder": [[[n, 1]] for n in range(2, 70)]}), ("task", "ladder"), "at most 64 items"),
        (make(task={"ladder": [[[7, t] for t in range(1, 18)]]}), ("task", "ladder", 0), "at most 16 items"),
        (make(task=BIG_GRID, search={"method": "optuna", "n_trials": 10}), ("task", "grid", "T"), "at most 64"),
        (make(task=grid(list(range(2, 66)), list(range(1, 33)))), ("task",), "2048 task points, more than 1024"),
        (make(model={"sizes": [SIZE | {"d_model": 2**20}]}), ("model", "sizes", 0, "d_model"), "8192"),
        (make(model={"sizes": [SIZE | {"n_layers": 10**4}]}), ("model", "sizes", 0, "n_layers"), "128"),
        (make(model={"sizes": [SIZE | {"n_heads": 10**4}]}), ("model", "sizes", 0, "n_heads"), "128"),
        (
            make(model={"d_model": list(range(8, 72)), "n_layers": list(range(1, 60)), "n_heads": [1]}),
            ("model",),
            "3776 model sizes, more than 256",
        ),
        (make(training={"batch_size": 10**9}), ("training", "batch_size"), "8192"),
        (make(training={"max_steps": 10**12}), ("training", "max_steps"), "10000000"),
        (make(training={"context_length": 10**6}), ("training", "context_length"), "4096"),
        (make(training={"eval_sequences": 10**9}), ("training", "eval_sequences"), "1000000"),
        (make(seeds=list(range(100))), ("seeds",), "at most 64"),
        (make(search={"method": "optuna", "n_trials": 10**9}), ("search", "n_trials"), "100000"),
        (make(caps={"max_trials": 10**9}), ("caps", "max_trials"), "100000"),
    ],
    ids=lambda v: None,
)
def test_sizes_have_upper_bounds(data: dict[str, Any], loc: tuple[str | int, ...], fragment: str) -> None:
    rejected(data, loc, fragment)


def test_a_huge_grid_is_refused_in_milliseconds() -> None:
    """The optuna trial cap ignores the grid, so the grid has its own bound, counted without building it."""
    import time

    start = time.perf_counter()
    with pytest.raises(ValidationError):
        StudySpec.model_validate(make(task=BIG_GRID, search={"method": "optuna", "n_trials": 10}))
    wide = make(
        task=grid(list(range(2, 34)), list(range(1, 33))),
        model={"d_model": list(range(8, 72, 4)), "n_layers": [1, 2, 3, 4], "n_heads": [1, 2]},
        hparams={"lr": {"values": [1e-3 * (i + 1) for i in range(64)]}},
        search={"method": "optuna", "n_trials": 10},
    )
    rejected(wide, ("task",), "configurations, more than 100000")
    assert time.perf_counter() - start < 2.0
