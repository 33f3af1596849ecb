"""Screenshots of the MLflow UI over a real study, for docs/review.md; rerun to refresh them.

Usage: ``python -m studies.review_shots [--data-dir DIR] [--out docs/img]``. Runs
``studies/review.yaml`` into DIR unless a finished study is there, starts ``mlflow server``
on a free port over DIR's store, and drives headless Chromium (the system's, through
Playwright) through the views docs/review.md describes. :func:`review_queries` are the
same facts asked of MLflow's API; a test checks them against what the doc promises.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from studies.render_png import INSTALL_HINT, find_chromium
from studies.studydir import read_status

log = logging.getLogger(__name__)

REVIEW_SPEC = Path(__file__).with_name("review.yaml")
DOC_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "img"
WIDTH, HEIGHT = 1440, 900


@dataclass
class Review:
    """What a reviewer finds in MLflow for one study (the facts docs/review.md promises)."""

    experiment_id: str
    experiment_kind: str | None
    artifact_location: str
    parent_run_id: str
    parent_run_name: str
    runs_per_kind: dict[str, int]
    pairs: dict[str, list[str]]  # pair tag -> kinds of its runs
    solved_per_kind: dict[str, int]
    summary: dict[str, float]  # the parent run's frontier metrics
    parent_artifacts: list[str]
    child_metrics: set[str] = field(default_factory=set)


def review_queries(tracking_uri: str, study_id: str) -> Review:
    """Ask MLflow what the review doc tells a user to look at, with the doc's own filters."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(f"ladder/{study_id}")
    if exp is None:
        raise LookupError(f"no MLflow experiment ladder/{study_id} at {tracking_uri}")
    ids = [exp.experiment_id]
    (parent,) = client.search_runs(ids, "tags.`ladder.role` = 'study'")
    children = client.search_runs(ids, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=5000)
    runs_per_kind = Counter(r.data.tags["kind"] for r in children)
    solved = client.search_runs(ids, "metrics.solved = 1", max_results=5000)
    pairs: dict[str, list[str]] = {}
    for r in children:
        pairs.setdefault(r.data.tags["pair"], []).append(r.data.tags["kind"])
    summary = {k: v for k, v in parent.data.metrics.items() if k.startswith(("frontier_", "solved_"))}
    return Review(
        experiment_id=exp.experiment_id,
        experiment_kind=exp.tags.get("mlflow.experimentKind"),
        artifact_location=exp.artifact_location,
        parent_run_id=parent.info.run_id,
        parent_run_name=parent.info.run_name,
        runs_per_kind=dict(runs_per_kind),
        pairs={k: sorted(v) for k, v in pairs.items()},
        solved_per_kind=dict(Counter(r.data.tags["kind"] for r in solved)),
        summary=summary,
        parent_artifacts=sorted(a.path for a in client.list_artifacts(parent.info.run_id)),
        child_metrics={k for r in children for k in r.data.metrics},
    )


# --- a real study and a real MLflow UI ------------------------------------------------------


def finished_study(data_dir: Path) -> str | None:
    """The newest finished study under ``data_dir``, if any."""
    studies = sorted((data_dir / "studies").glob("*/status.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in studies:
        if read_status(p.parent).get("state") == "finished":
            return p.parent.name
    return None


def run_review_study(data_dir: Path, spec: Path = REVIEW_SPEC) -> str:
    """Run ``spec`` with the ``ladder`` CLI into ``data_dir`` (minutes on 2 cores); returns its id."""
    env = os.environ | {"LADDER_DATA_DIR": str(data_dir), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
    for name in ("LADDER_MLFLOW_TRACKING_URI", "LADDER_OPTUNA_STORAGE", "LADDER_REGISTRY_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    subprocess.run([sys.executable, "-m", "studies.cli", "run", str(spec)], env=env, check=True)
    study = finished_study(data_dir)
    if study is None:
        raise RuntimeError(f"the review study under {data_dir} did not finish")
    return study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, timeout_s: float = 300) -> Iterator[str]:
    """``mlflow server`` on a free loopback port over ``tracking_uri``; yields its URL, stops it after."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer on {url} within {timeout_s} s")
            time.sleep(1)
        yield url
    finally:
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):  # the server and its workers, no more
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait_s)
                break


# --- the screenshots ------------------------------------------------------------------------


def shoot(url: str, review: Review, out_dir: Path, chromium: str | None = None) -> list[Path]:
    """Take the screenshots docs/review.md shows; returns their paths."""
    from playwright.sync_api import sync_playwright

    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"Chromium not found; {INSTALL_HINT}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        try:
            for name, action in SHOTS.items():
                context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})  # fresh UI state
                context.add_init_script(QUIET_ASSISTANT)
                page = context.new_page()
                page.set_default_timeout(180_000)  # a loaded 2-core box renders slowly
                action(page, url, review)
                page.wait_for_timeout(2500)  # let charts and lazy tables settle
                path = out_dir / f"review-{name}.png"
                page.screenshot(path=str(path))
                context.close()
                shots.append(path)
                log.info("wrote %s", path)
        finally:
            browser.close()
    return shots


# The assistant panel would cover a third of every screenshot.
QUIET_ASSISTANT = (
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
)
COLUMNS = ("Dataset", "Models", "solved", "steps_to_solve", "final_eval_acc", "final_eval_acc_lo", "final_eval_acc_hi")


def experiment_url(url: str, experiment_id: str) -> str:
    """The runs view; ``workflowType`` makes MLflow 3.17 show it as model training, not GenAI."""
    return f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _runs_view(page: Any, url: str, review: Review, group_by: str) -> None:
    page.goto(experiment_url(url, review.experiment_id))
    page.get_by_text(review.parent_run_name, exact=True).first.wait_for()  # the runs have loaded
    page.get_by_role("button", name="Columns").click()
    menu = page.locator("[role=dialog], [role=menu], [role=listbox]").last
    for name in (*COLUMNS, "kind", "status"):  # Dataset and Models off, the rest on
        menu.get_by_text(name, exact=True).first.click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Group by").click()
    page.locator("[role=menu]").get_by_text(group_by, exact=True).first.click()
    page.keyboard.press("Escape")


def _by_pair(page: Any, url: str, review: Review) -> None:
    _runs_view(page, url, review, "pair")


def _by_kind(page: Any, url: str, review: Review) -> None:
    _runs_view(page, url, review, "kind")


def _parent(page: Any, url: str, review: Review) -> None:
    page.goto(f"{url}/#/experiments/{review.experiment_id}/runs/{review.parent_run_id}?workflowType=machine_learning")
    page.get_by_text("frontier_rung/", exact=False).first.wait_for()


def _frontier_image(page: Any, url: str, review: Review) -> None:
    run = f"{url}/#/experiments/{review.experiment_id}/runs/{review.parent_run_id}"
    page.goto(f"{run}/artifacts/report/frontier.png?workflowType=machine_learning")
    page.get_by_text("frontier.png").first.wait_for()
    page.wait_for_timeout(5000)  # the image itself loads from a blob


SHOTS = {"by-pair": _by_pair, "by-kind": _by_kind, "parent": _parent, "frontier": _frontier_image}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.review_shots", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("ladder-review-data"), help="where the review study lives")
    p.add_argument("--out", type=Path, default=DOC_IMAGES, help="where the PNGs go")
    p.add_argument("--ui-url", help="an MLflow UI already serving the data dir's store (default: start one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data_dir = args.data_dir.resolve()
    study = finished_study(data_dir) or run_review_study(data_dir)
    tracking_uri = read_status(data_dir / "studies" / study)["mlflow"]["tracking_uri"]
    review = review_queries(tracking_uri, study)
    log.info("study %s: %s", study, review)
    with contextlib.nullcontext(args.ui_url) if args.ui_url else mlflow_ui(tracking_uri) as url:
        for path in shoot(url, review, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
