"""docs/findings.md is generated from its data: every table in it is recomputed here from the
committed trial CSVs, geometry JSON, memory count and benchmarks, and must match byte for byte."""

from __future__ import annotations

from pathlib import Path

from studies.claims import datasets, rendered

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "findings.md"
DATA = ROOT / "docs" / "data"


def test_findings_document_matches_its_data() -> None:
    text = DOC.read_text()
    for name in ("claims", "frontier", "paired", "budget", "compute"):
        assert f"<!-- claims:paper:{name} -->" in text
    assert "<!-- claims:paper:geometry -->" in text
    for dataset in datasets(text):
        assert (DATA / f"{dataset}-trials.csv").exists() or (DATA / f"{dataset}-geometry.json").exists(), dataset
    regenerated = rendered(DOC, DATA, ROOT / "docs" / "benchmarks.md")
    assert regenerated == text, "docs/findings.md drifted from its data: run `python -m studies.claims` and review"
