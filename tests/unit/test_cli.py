"""The ``ladder`` command line: schema, spec errors before anything starts, report from records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from studies.cli import main
from studies.records import append_record
from studies.spec import StudySpec, json_schema

SPEC_YAML = """\
name: demo
task:
  ladder: [[[7, 2]], [[13, 2]], [[13, 4]]]
model:
  sizes:
    - {d_model: 16, n_layers: 1, n_heads: 2}
    - {d_model: 32, n_layers: 2, n_heads: 2}
"""
# the highest solved rung per (kind, size index): ea climbs one rung higher than dpa
TRUTH = {("dpa", 0): 0, ("ea", 0): 1, ("dpa", 1): 1, ("ea", 1): 2}


def exit_message(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert isinstance(info.value.code, str), f"exit without a message: {info.value.code!r}"
    return info.value.code


def test_schema_prints_the_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    Draft202012Validator.check_schema(schema)
    assert schema == json_schema()


@pytest.mark.parametrize(
    ("edit", "lines"),
    [
        pytest.param(
            {"  sizes:": "  sizes:\n    - {d_model: 16, n_layers: 1, n_heads: 3}"},
            ["model.sizes.0: Value error, d_model must be divisible by n_heads"],
            id="heads",
        ),
        pytest.param(
            {"name: demo": "name: demo\ntraining: {max_step: 10}\nseeds: []"},
            ["training.max_step: Extra inputs are not permitted", "seeds: List should have at least 1 item"],
            id="typo-and-empty-seeds",
        ),
        pytest.param(
            {"[[13, 4]]": "[[13, 14]]"},
            ["training.context_length: training.context_length=16 is too short for task point N13_T14"],
            id="cross-field",
        ),
    ],
)
def test_run_rejects_an_invalid_spec_naming_the_field(
    edit: dict[str, str], lines: list[str], tmp_path: Path, data_dir: Path
) -> None:
    text = SPEC_YAML
    for old, new in edit.items():
        text = text.replace(old, new, 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    msg = exit_message(["run", str(path)])
    assert msg.startswith(f"error: invalid study spec {path}:")
    for line in lines:
        assert f"\n  {line}" in msg, msg
    assert not (data_dir / "studies").exists(), "nothing is created for an invalid spec"


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        pytest.param("- just\n- a list\n", "must be a mapping", id="not-a-mapping"),
        pytest.param("name: [unclosed\n", "not valid YAML or JSON", id="syntax-error"),
    ],
)
def test_run_rejects_unreadable_spec_text(text: str, rule: str, tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    msg = exit_message(["run", str(path)])
    assert msg.startswith(f"error: invalid study spec {path}: ")
    assert rule in msg


def test_run_names_a_missing_spec_file(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert exit_message(["run", str(path)]) == f"error: no such spec file: {path}"
    assert not (data_dir / "studies").exists()


def test_run_names_an_unreadable_spec_path(tmp_path: Path, data_dir: Path) -> None:
    msg = exit_message(["run", str(tmp_path)])
    assert msg.startswith("error: ") and str(tmp_path) in msg


def make_study(study_dir: Path) -> StudySpec:
    """A finished study from synthetic files: spec.json and one record per trial."""
    spec = StudySpec.from_text(SPEC_YAML)
    study_dir.mkdir(parents=True)
    (study_dir / "spec.json").write_text(spec.to_json())
    n = 0
    for kind in spec.attention:
        for size_idx, size in enumerate(spec.model.all_sizes()):
            for point in spec.task.points():
                solved = point.coords[0] <= TRUTH[(kind, size_idx)]
                n += 1
                record = {
                    "study_id": study_dir.name,
                    "trial_id": f"t{n}",
                    "kind": kind,
                    **size.model_dump(),
                    "point": point.name,
                    "coords": list(point.coords),
                    "seed": 0,
                    "lr": 3e-3,
                    "status": "solved" if solved else "unsolved",
                    "eval_acc": 1.0 if solved else 0.4,
                    "steps": 300 if solved else 1000,
                    "steps_to_solve": 300 if solved else None,
                    "cpu_s": 2.0,
                }
                append_record(study_dir / "trials.jsonl", record)
    return spec


def frontier_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].startswith("d") and "_l" in cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_report_by_study_id_writes_html_and_prints_the_frontier(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study_dir = data_dir / "studies" / "demo-1a2b3c4d"
    make_study(study_dir)
    assert main(["report", "demo-1a2b3c4d"]) == 0
    out = capsys.readouterr().out
    assert "demo: highest rung solved, [certain, possible]" in out
    header = next(line for line in out.splitlines() if line.startswith("size"))
    assert header.split() == ["size", "params", "dpa", "ea", "ea-dpa"]
    rows = frontier_rows(out)
    # one seed decides nothing: every frontier is the whole ladder, with the seed's own reach shown
    assert " ".join(rows["d16_l1_h2"][1:]) == "[none, 2] seen 0 [none, 2] seen 1 +1 rung n=1"
    assert " ".join(rows["d32_l2_h2"][1:]) == "[none, 2] seen 1 [none, 2] seen 2 +1 rung n=1"
    assert "verdict: no detectable difference between ea and dpa at this budget" in out
    html = study_dir / "report" / "report.html"
    assert f"report: {html}" in out
    assert html.stat().st_size > 1000
    assert "demo" in html.read_text()
    assert json.loads((study_dir / "report" / "report.json").read_text())


def test_report_by_directory_with_out(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study_dir = tmp_path / "elsewhere" / "demo-x"
    make_study(study_dir)
    out_dir = tmp_path / "out"
    assert main(["report", str(study_dir), "--out", str(out_dir)]) == 0
    assert (out_dir / "report.html").exists()
    assert not (study_dir / "report").exists()
    assert "d16_l1_h2" in frontier_rows(capsys.readouterr().out)


def test_report_names_an_unknown_study(data_dir: Path) -> None:
    msg = exit_message(["report", "no-such-study"])
    assert "'no-such-study' is neither a study id nor a study directory" in msg


def test_resume_names_an_unknown_study(data_dir: Path) -> None:
    assert exit_message(["resume", "no-such-study"]).startswith("error: no study 'no-such-study'")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: ladder" in capsys.readouterr().err
