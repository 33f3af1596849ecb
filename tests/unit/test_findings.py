"""docs/findings.md is generated from its data: every table in it is recomputed here from the
committed trial CSVs, geometry JSON and benchmarks, and must match the document byte for byte."""

from __future__ import annotations

from pathlib import Path

from studies.claims import datasets, rendered

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "findings.md"


def test_findings_document_matches_its_data() -> None:
    text = DOC.read_text()
    assert {"paper", "paper-small"} <= set(datasets(text))
    for name in ("claims", "frontier", "paired", "budget", "compute"):
        assert f"<!-- claims:paper:{name} -->" in text
    regenerated = rendered(DOC, ROOT / "docs" / "data", ROOT / "docs" / "benchmarks.md")
    assert regenerated == text, "docs/findings.md drifted from its data: run `python -m studies.claims` and review"
