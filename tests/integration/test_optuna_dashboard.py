"""An Optuna-mode study's storage opens in optuna-dashboard as it is, and reads well there."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import optuna_dashboard
import pytest

from tests.unit.test_search import PAIRED, TWINS, final, take
from workers.search import PairedOptunaSearch

pytestmark = pytest.mark.integration


def _value(shown: str) -> object:
    """optuna-dashboard shows a string attribute as it is and any other as JSON."""
    try:
        return json.loads(shown)
    except json.JSONDecodeError:
        return shown


def test_optuna_dashboard_lists_the_study_with_named_objectives_and_ladder_links(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = PairedOptunaSearch(PAIRED, url, "ladder-study-1")
    got = take(search, TWINS * 2)
    for i, (trial_id, _) in enumerate(got):
        search.on_trial_complete(trial_id, final(1.0 + i % 2, "solved"))

    # optuna-dashboard's own WSGI app over the storage URL, spoken to over HTTP
    app = optuna_dashboard.wsgi(url)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://dashboard") as client:
        studies = client.get("/api/studies").raise_for_status().json()["study_summaries"]
        assert [s["study_name"] for s in studies] == ["ladder-study-1"]
        detail = client.get(f"/api/studies/{studies[0]['study_id']}").raise_for_status().json()
        assert client.get("/dashboard").status_code == 200
    assert detail["objective_names"] == [f"rung_{k}" for k in PAIRED.attention] + ["n_params"]
    assert {p["name"] for p in detail["intersection_search_space"]} == {"size_idx", "point_idx", "lr"}
    trials = detail["trials"]
    assert [t["state"] for t in trials] == ["Complete", "Complete"]
    sizes = {s.name for s in PAIRED.model.all_sizes()}
    points = {p.name for p in PAIRED.task.points()}
    for i, t in enumerate(trials):
        attrs = {a["key"]: _value(a["value"]) for a in t["user_attrs"]}
        assert attrs["ladder.pick"] == f"pick{i:05d}"
        # readable names beside the ordered indices Optuna samples
        assert attrs["ladder.size"] in sizes and attrs["ladder.point"] in points
        keys = attrs["ladder.trial_keys"]
        assert len(keys) == TWINS and all(f"/{attrs['ladder.size']}/{attrs['ladder.point']}/" in k for k in keys)
        tune_ids = {v for k, v in attrs.items() if k.startswith("ladder.trial.")}
        assert tune_ids == {tid for tid, _ in got[i * TWINS : (i + 1) * TWINS]}, "each Tune trial of the pick"
