"""Property-based fuzz of the API from its own OpenAPI document (schemathesis, SQLite registry).

Every operation gets positive and negative cases, once with generated parameters and, for the
study-scoped operations, once more on a study that exists (with trial records), so queries,
plot names and state changes reach the routes instead of stopping at 404. Every response must
be a non-5xx and match the response schema the API publishes. The service's caps make a
generated spec almost never launch a driver; whatever did run is cancelled at teardown.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.lifecycle import ACTIVE
from studies.records import append_record
from studies.stores import init_stores
from tests.service import SIZE, Service, insert_study, wait_state
from tests.service.conftest import OpenService

MAX_EXAMPLES = 50  # per operation, mode and target: ~15 s in all on an idle 2-core box (budget: 90 s)
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    """The fuzz runs once, on SQLite (the API suite covers PostgreSQL)."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
def fuzz_service(open_service: OpenService) -> Iterator[Service]:
    # One trial per study and one study at a time: a generated spec must name exactly one
    # known attention kind, seed, size, point and learning rate to launch, and only the first does.
    with open_service(max_trials_per_study=1, max_concurrent_studies=1) as svc:
        init_stores(svc.settings)  # what the first launch does first (seconds on a busy box: past a fuzz timeout)
        yield svc
        for study in svc.registry.in_states(ACTIVE):
            r = svc.client.post(f"/studies/{study.id}/cancel")
            assert r.status_code in (202, 409), r.text
            wait_state(svc.client, study.id, lambda b: b["state"] not in ACTIVE, 60, "a fuzzed study to stop")


def api_routes(routes: list[Any]) -> list[APIRoute]:
    """The app's API routes, also inside included routers (FastAPI keeps those as their own routes)."""
    out: list[APIRoute] = []
    for r in routes:
        if isinstance(r, APIRoute):
            out.append(r)
        elif hasattr(r, "original_router"):  # an included router
            out += api_routes(r.original_router.routes)
    return out


def seed_studies(svc: Service) -> dict[str, str]:
    """Studies for the study-scoped operations: {operation label: study id}."""
    finished = insert_study(svc, "finished")
    for i, (kind, point, status) in enumerate(
        [("dpa", "N7_T2", "solved"), ("ea", "N7_T2", "solved"), ("dpa", "N61_T6", "unsolved"), ("ea", "N61_T6", "oom")]
    ):
        record: dict[str, Any] = {"study_id": finished, "trial_id": f"t{i}", "kind": kind, **SIZE, "point": point}
        record |= {"coords": [int(point != "N7_T2")], "seed": 0, "lr": 0.003, "status": status, "steps": 200}
        record |= {"eval_acc": None if status == "oom" else 1.0 - 0.5 * i / 4, "cpu_s": 1.5, "error": None}
        append_record(svc.settings.study_dir(finished) / "trials.jsonl", record)
    return {
        "DELETE /studies/{study_id}": insert_study(svc, "cancelled"),  # 204 once, then 404
        "POST /studies/{study_id}/resume": insert_study(svc, "failed"),  # 202 once (a driver), then 409
    } | {"*": finished}  # every other study-scoped operation: reads, and cancel (409)


def fuzz_operation(operation: APIOperation, mode: GenerationMode, path_parameters: dict[str, str] | None) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same cases on every run: a failure reproduces
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

    run()


@pytest.mark.integration  # it launches a driver (the seeded resume), and a generated spec may too
def test_api_fuzz(fuzz_service: Service) -> None:
    """Every operation of the published OpenAPI: nothing is excluded.

    (schemathesis' lazy ``from_fixture(...).parametrize()`` reads ``Node._nodeid``, which
    pytest 9 removed; hence one test that drives each operation's Hypothesis strategy and
    reports every failing operation at once.)
    """
    seeded = seed_studies(fuzz_service)
    api = schemathesis.openapi.from_asgi("/openapi.json", fuzz_service.app)
    operations = []
    for result in api.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    published = [r for r in api_routes(fuzz_service.app.routes) if r.include_in_schema]  # not /docs, /redoc
    routed = {(m, r.path) for r in published for m in r.methods or ()}
    assert {(op.method.upper(), op.path) for op in operations} == routed

    failures: list[str] = []
    negated: set[str] = set()
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        targets: list[dict[str, str] | None] = [None]
        if "{study_id}" in operation.path:
            targets.append({"study_id": seeded.get(label, seeded["*"])})
        for target in targets:
            for mode in MODES:
                try:
                    fuzz_operation(operation, mode, target)
                except Unsatisfiable:
                    # Negative mode has nothing to break where every input is valid (no parameters,
                    # or only a free-form string path parameter); positive mode always has cases.
                    assert mode is GenerationMode.NEGATIVE, label
                except (Exception, FailureGroup) as e:  # collected, then reported together
                    detail = "".join(traceback.format_exception(e))[-3000:]
                    failures.append(f"{label} ({mode.value}, {target or 'generated'}): {detail}")
                else:
                    negated |= {label} if mode is GenerationMode.NEGATIVE else set()
    assert not failures, "\n\n".join(failures)
    assert {"POST /studies", "GET /studies", "GET /studies/{study_id}/trials"} <= negated, negated
    # The seeded studies were reached: the state-changing operations took effect.
    assert fuzz_service.registry.get(seeded["DELETE /studies/{study_id}"]) is None
    assert fuzz_service.registry.get(seeded["POST /studies/{study_id}/resume"]).attempts == 1  # type: ignore[union-attr]
