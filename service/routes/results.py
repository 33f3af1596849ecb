"""A study's results: trials (JSON or CSV), the frontier report, the HTML report and its plots.

Everything here is served from stored results (``service.views.Results`` caches them by
the records file's version); rendering runs in the thread pool, never on the event loop.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse

from service.deps import Reader, StudyDep, api_error
from service.schemas import ERRORS, TrialsPublic
from service.views import Results
from studies.records import TrialRecord

router = APIRouter(tags=["results"])
PLOTS = ("frontier.png", "frontier.svg", "solved_map.png", "accuracy.png", "budget.png")


def _results(request: Request) -> Results:
    results: Results = request.app.state.results
    return results


def _csv(rows: list[dict[str, Any]]) -> str:
    cols = list(TrialRecord.model_fields)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})
    return buf.getvalue()


@router.get(
    "/studies/{study_id}/trials",
    response_model=TrialsPublic,
    responses=ERRORS | {200: {"content": {"text/csv": {}}}},
)
def list_trials(
    request: Request,
    _: Reader,
    study: StudyDep,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    status: Annotated[str | None, Query(max_length=20)] = None,
    kind: Annotated[str | None, Query(max_length=50)] = None,
    point: Annotated[str | None, Query(max_length=500)] = None,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> Any:
    """Finished trials with paging and filters; ``format=csv`` (or Accept: text/csv) exports CSV."""
    records = _results(request).records(study.id)[1]
    rows = [
        r
        for r in records
        if (status is None or r.status == status)
        and (kind is None or r.kind == kind)
        and (point is None or r.point == point)
    ]
    page = [r.model_dump(mode="json") for r in rows[offset : offset + limit]]
    if format == "csv" or "text/csv" in request.headers.get("accept", ""):
        return Response(
            _csv(page),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{study.id}-trials.csv"'},
        )
    return TrialsPublic(items=page, total=len(rows), limit=limit, offset=offset)


@router.get("/studies/{study_id}/frontier", responses=ERRORS)
def frontier(request: Request, _: Reader, study: StudyDep) -> Response:
    """The capacity-frontier report (JSON, versioned schema); partial while the study runs."""
    return Response(_results(request).frontier_json(study), media_type="application/json")


@router.get(
    "/studies/{study_id}/report",
    responses=ERRORS | {200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
)
async def report_html(request: Request, _: Reader, study: StudyDep) -> HTMLResponse:
    """The HTML report (self-contained: plots embedded)."""
    out = await run_in_threadpool(_results(request).report_dir, study)
    return HTMLResponse(await run_in_threadpool((out / "report.html").read_text))


@router.get(
    "/studies/{study_id}/plots/{name}",
    responses=ERRORS | {200: {"content": {"image/png": {}, "image/svg+xml": {}}}},
)
async def plot(request: Request, _: Reader, study: StudyDep, name: str) -> FileResponse:
    """A report plot: frontier.png, frontier.svg, solved_map.png, accuracy.png or budget.png."""
    if name not in PLOTS:
        raise api_error(404, ["path", "name"], f"no plot {name!r}; plots: {', '.join(PLOTS)}", "not_found")
    out = await run_in_threadpool(_results(request).report_dir, study)
    return FileResponse(out / name, media_type="image/svg+xml" if name.endswith(".svg") else "image/png")
