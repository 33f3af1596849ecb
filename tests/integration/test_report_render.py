"""The HTML report renders in headless Chromium to a page with visible plots."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from studies.records import TrialRecord
from studies.render_png import INSTALL_HINT, find_chromium, render_png
from studies.report_html import write_report
from studies.spec import StudySpec

pytestmark = pytest.mark.integration

SPEC = StudySpec.model_validate(
    {
        "name": "quickstart",
        "task": {"ladder": [[[7, 2]], [[13, 2]], [[13, 4]], [[23, 4]], [[23, 1], [23, 2]]]},
        "model": {
            "sizes": [
                {"d_model": 16, "n_layers": 1, "n_heads": 2},
                {"d_model": 32, "n_layers": 2, "n_heads": 2},
                {"d_model": 64, "n_layers": 2, "n_heads": 4},
            ]
        },
        "seeds": [0, 1, 2],
    }
)


def synthetic_records() -> list[TrialRecord]:
    """EA one rung ahead of DPA at every size, with some failures and a never-run cell."""
    rng = random.Random(7)
    out = []
    for ki, kind in enumerate(SPEC.attention):
        for si, size in enumerate(SPEC.model.all_sizes()):
            for p in SPEC.task.points():
                if (ki, si, p.coords[0]) == (1, 0, 4):
                    continue  # stays unknown
                rung = p.coords[0]
                for seed in SPEC.seeds:
                    status = "solved" if rung <= si + ki else rng.choice(["unsolved", "stopped"])
                    if rng.random() < 0.1:
                        status = rng.choice(["failed", "diverged", "oom"])
                    acc = 1.0 if status == "solved" else max(0.05, 0.9 - 0.25 * (rung - si - ki))
                    out.append(
                        TrialRecord(
                            study_id="quickstart",
                            trial_id=f"{kind}-{size.name}-{p.name}-{seed}",
                            kind=kind,
                            d_model=size.d_model,
                            n_layers=size.n_layers,
                            n_heads=size.n_heads,
                            point=p.name,
                            coords=list(p.coords),
                            seed=seed,
                            lr=3e-3,
                            status=status,  # type: ignore[arg-type]
                            eval_acc=acc if status in ("solved", "unsolved", "stopped") else None,
                            steps=1000,
                            steps_to_solve=300 + 100 * rung if status == "solved" else None,
                            cpu_s=rng.uniform(5, 50),
                            wall_s=rng.uniform(5, 50),
                        )
                    )
    return out


def test_report_renders_to_a_png_with_visible_plots(tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.fail(f"headless Chromium is required to render the report: {INSTALL_HINT}")
    write_report(SPEC, synthetic_records(), tmp_path, provenance={"git_sha": "0123abc"})
    png = render_png(tmp_path / "report.html", tmp_path / "page.png", width=1280, height=4000)
    assert png.stat().st_size > 100_000
    with Image.open(png) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 4000)
        counted = rgb.getcolors(maxcolors=1 << 20)
        assert counted is not None
        colours = [(n, c) for n, c in counted if isinstance(c, tuple)]
        assert len(colours) > 1000  # anti-aliased text and coloured plots
        non_white = sum(n for n, c in colours if min(c) < 235) / (rgb.width * rgb.height)
        assert non_white > 0.05
        # the solved map's green and red cells are on the page
        assert any(g > 90 and r < 40 and b < 80 for _, (r, g, b) in colours)
        assert any(r > 140 and g < 40 and b < 60 for _, (r, g, b) in colours)
