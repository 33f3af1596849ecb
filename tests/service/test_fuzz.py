"""Property-based fuzz of the API from its own OpenAPI document (schemathesis, SQLite registry).

Every operation gets positive and negative cases, once with generated parameters and, for the
study-scoped operations, once more on a study that exists (with trial records), so queries,
plot names and state changes reach the routes instead of stopping at 404. Every response must
be a non-5xx and match the response schema the API publishes. The service's caps make a
generated spec almost never launch a driver; whatever did run is cancelled at teardown.

Three ways in: no token configured; a token configured and sent (reads need it too); a token
configured and not sent (every protected operation is 401, nothing changes). Besides the
OpenAPI-driven cases, a strategy of large specs near the server's bounds (axes of up to 64
values, N up to 10^5, sizes up to d_model 8192, a little past every bound too) must get a 422
naming the field (valid ones plan more trials than the fuzzed service allows: caps.max_trials).
The default tier runs a fixed derandomised set (a failure reproduces); the slow tier runs more
examples from a random seed, printed (``LADDER_FUZZ_SEED`` replays it).
"""

from __future__ import annotations

import os
import random
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.lifecycle import ACTIVE
from studies.records import append_record
from studies.spec import MAX_AXIS, MAX_BATCH, MAX_D_MODEL, MAX_HEADS, MAX_LAYERS, MAX_MEMBERS, MAX_N, MAX_STEPS, MAX_T
from studies.stores import init_stores
from tests.service import SIZE, Service, insert_study, wait_state
from tests.service.conftest import OpenService

MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
TOKEN = "fuzz-t0ken"
PUBLIC = {"GET /healthz", "GET /readyz", "GET /schema/study"}  # answer without a token, even with auth_reads


@dataclass(frozen=True)
class Run:
    """How many examples, and whether from a fixed (derandomised) or a random, printed seed."""

    max_examples: int
    seed: int | None = None  # None: derandomised

    def hypothesis_settings(self) -> settings:
        return settings(
            max_examples=self.max_examples,
            derandomize=self.seed is None,  # the same cases on every run: a failure reproduces
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )

    def apply(self, test: Any) -> Any:
        test = self.hypothesis_settings()(test)
        return test if self.seed is None else seed(self.seed)(test)


DEFAULT = Run(max_examples=50)  # per operation, mode and target: ~15 s in all on an idle 2-core box (budget: 90 s)


def random_run(max_examples: int) -> Run:
    """A randomised run; its seed is printed so that ``LADDER_FUZZ_SEED=<seed>`` replays it."""
    chosen = int(os.environ.get("LADDER_FUZZ_SEED") or random.randrange(2**32))
    print(f"fuzz seed: {chosen} (replay with LADDER_FUZZ_SEED={chosen})")
    return Run(max_examples=max_examples, seed=chosen)


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    """The fuzz runs once, on SQLite (the API suite covers PostgreSQL)."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture(params=["open", "token"])
def fuzz_service(request: pytest.FixtureRequest, open_service: OpenService) -> Iterator[Service]:
    """The service without a token ("open") or with one that reads need too ("token")."""
    # One trial per study and one study at a time: a generated spec must name exactly one
    # known attention kind, seed, size, point and learning rate to launch, and only the first does.
    auth = {"api_token": TOKEN, "auth_reads": True} if request.param == "token" else {}
    with open_service(max_trials_per_study=1, max_concurrent_studies=1, **auth) as svc:
        init_stores(svc.settings)  # what the first launch does first (seconds on a busy box: past a fuzz timeout)
        yield svc
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for study in svc.registry.in_states(ACTIVE):
            r = svc.client.post(f"/studies/{study.id}/cancel", headers=headers)
            assert r.status_code in (202, 409), r.text
            wait_state(
                svc.client, study.id, lambda b: b["state"] not in ACTIVE, 60, "a fuzzed study to stop", headers=headers
            )


def credentials(svc: Service) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"} if svc.settings.api_token else {}


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


def fuzz_operation(
    operation: APIOperation,
    mode: GenerationMode,
    path_parameters: dict[str, str] | None,
    run: Run,
    headers: dict[str, str],
    check: Any = None,
) -> None:
    """Hypothesis over the operation's generated cases; ``check(case, response)`` on each answer, if given."""

    def test(case: schemathesis.Case) -> None:
        # The configured token (or a wrong one), over whatever was generated.
        response = case.call_and_validate(headers=headers, checks=[not_a_server_error, response_schema_conformance])
        if check is not None:
            check(case, response)

    run.apply(given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))(test))()


def operations_of(svc: Service) -> list[APIOperation]:
    """Every operation the app publishes, asserted to be exactly the app's API routes."""
    api = schemathesis.openapi.from_asgi("/openapi.json", svc.app)
    operations = []
    for result in api.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    published = [r for r in api_routes(svc.app.routes) if r.include_in_schema]  # not /docs, /redoc
    routed = {(m, r.path) for r in published for m in r.methods or ()}
    assert {(op.method.upper(), op.path) for op in operations} == routed
    return operations


def fuzz_all(svc: Service, run: Run) -> None:
    """Every operation, both modes, generated and seeded targets, sent with the service's credentials."""
    seeded = seed_studies(svc)
    failures: list[str] = []
    negated: set[str] = set()
    for operation in operations_of(svc):
        label = f"{operation.method.upper()} {operation.path}"
        targets: list[dict[str, str] | None] = [None]
        if "{study_id}" in operation.path:
            targets.append({"study_id": seeded.get(label, seeded["*"])})
        for target in targets:
            for mode in MODES:
                try:
                    fuzz_operation(operation, mode, target, run, credentials(svc))
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
    assert svc.registry.get(seeded["DELETE /studies/{study_id}"]) is None
    assert svc.registry.get(seeded["POST /studies/{study_id}/resume"]).attempts == 1  # type: ignore[union-attr]


@pytest.mark.integration  # it launches a driver (the seeded resume), and a generated spec may too
def test_api_fuzz(fuzz_service: Service) -> None:
    """Every operation of the published OpenAPI, with and without a token configured: nothing is excluded.

    (schemathesis' lazy ``from_fixture(...).parametrize()`` reads ``Node._nodeid``, which
    pytest 9 removed; hence one test that drives each operation's Hypothesis strategy and
    reports every failing operation at once.)
    """
    fuzz_all(fuzz_service, DEFAULT if fuzz_service.settings.api_token is None else Run(max_examples=25))


@pytest.mark.integration
@pytest.mark.slow
def test_api_fuzz_randomised(fuzz_service: Service) -> None:
    """The same fuzz from a random seed (printed), with more examples per operation."""
    fuzz_all(fuzz_service, random_run(200))


@pytest.mark.parametrize("sent", [None, "Bearer wrong", "Basic Zm9vOmJhcg=="], ids=["none", "wrong", "basic"])
def test_api_fuzz_without_credentials(open_service: OpenService, sent: str | None) -> None:
    """A token is configured and not sent (or a wrong one): every protected operation is 401, nothing changes."""
    with open_service(max_trials_per_study=1, api_token=TOKEN, auth_reads=True) as svc:
        seeded = seed_studies(svc)
        headers = {"Authorization": sent} if sent else {}

        def unauthorized(label: str) -> Any:
            def check(case: schemathesis.Case, response: Any) -> None:
                assert response.status_code == 401, (label, response.status_code, response.text[:300])
                assert response.json()["detail"][0]["loc"] == ["header", "Authorization"], response.text[:300]

            return check

        failures = []
        for operation in operations_of(svc):
            label = f"{operation.method.upper()} {operation.path}"
            target = {"study_id": seeded.get(label, seeded["*"])} if "{study_id}" in operation.path else None
            try:
                check = None if label in PUBLIC else unauthorized(label)
                fuzz_operation(operation, GenerationMode.POSITIVE, target, Run(max_examples=10), headers, check)
            except (Exception, FailureGroup) as e:
                failures.append(f"{label}: {''.join(traceback.format_exception(e))[-2000:]}")
        assert not failures, "\n\n".join(failures)
        assert svc.registry.get(seeded["DELETE /studies/{study_id}"]) is not None
        assert svc.registry.get(seeded["POST /studies/{study_id}/resume"]).attempts == 0  # type: ignore[union-attr]
        assert svc.registry.page(100, 0)[1] == 3  # no generated spec was accepted


# --- large specs near the server's bounds --------------------------------------------------------


def _axis(values: st.SearchStrategy[Any], unique: bool = False, min_size: int = 1) -> st.SearchStrategy[list[Any]]:
    """An axis of up to a few values past MAX_AXIS (the bound itself must be checked too)."""
    return st.lists(values, min_size=min_size, max_size=MAX_AXIS + 2, unique=unique)


def _near(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers across the range, weighted to both ends and just past the upper bound."""
    return st.one_of(st.integers(low, high), st.integers(max(low, high - 8), high + 2), st.integers(low, low + 8))


KINDS = ["dpa", "ea", "ea_norm", "nope"]
SIZES = st.fixed_dictionaries(
    {"d_model": _near(1, MAX_D_MODEL), "n_layers": _near(1, MAX_LAYERS), "n_heads": _near(1, MAX_HEADS)}
)
MEMBERS = st.tuples(_near(2, MAX_N), _near(1, MAX_T))
BIG_SPECS = st.fixed_dictionaries(
    {
        "name": st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True),
        "attention": st.lists(st.sampled_from(KINDS), min_size=1, max_size=4, unique=True),
        "task": st.one_of(
            st.fixed_dictionaries(
                {"grid": st.fixed_dictionaries({"N": _axis(_near(2, MAX_N)), "T": _axis(_near(1, MAX_T))})}
            ),
            st.fixed_dictionaries({"ladder": _axis(st.lists(MEMBERS, min_size=1, max_size=MAX_MEMBERS + 1))}),
        ),
        "model": st.one_of(
            st.fixed_dictionaries({"sizes": _axis(SIZES)}),
            st.fixed_dictionaries(
                {
                    "d_model": _axis(_near(1, MAX_D_MODEL)),
                    "n_layers": _axis(_near(1, MAX_LAYERS)),
                    "n_heads": _axis(_near(1, MAX_HEADS)),
                }
            ),
        ),
        "training": st.fixed_dictionaries(
            {
                "max_steps": _near(1, MAX_STEPS),
                "batch_size": _near(1, MAX_BATCH),
                "eval_interval": _near(1, MAX_STEPS),
                "context_length": _near(2, 4096),
            }
        ),
        "seeds": _axis(st.integers(0, 2**31), unique=True, min_size=2),  # >= 2 trials: refused by the trial cap
        "search": st.one_of(
            st.just({"method": "grid"}),
            st.fixed_dictionaries({"method": st.just("optuna"), "n_trials": _near(1, 100_000)}),
            st.just({"method": "frontier"}),
        ),
    }
)


def check_big_spec(svc: Service, spec: dict[str, Any], slowest: list[float]) -> None:
    start = time.perf_counter()
    r = svc.client.post("/studies", json=spec, headers=credentials(svc))
    slowest.append(time.perf_counter() - start)
    assert r.status_code == 422, r.text[:1000]  # a valid spec too: it plans more trials than the service allows
    for item in r.json()["detail"]:
        assert item["loc"][:1] == ["body"] and len(item["loc"]) >= 2, item  # names the field, not just "body"
        assert item["msg"], item


def fuzz_big_specs(svc: Service, run: Run) -> list[float]:
    took: list[float] = []
    run.apply(given(spec=BIG_SPECS)(lambda spec: check_big_spec(svc, spec, took)))()
    return took


def test_large_specs_near_the_bounds_get_a_422_at_the_field(fuzz_service: Service) -> None:
    took = fuzz_big_specs(fuzz_service, Run(max_examples=40))
    print(f"large specs: {len(took)} requests, slowest {max(took):.2f} s")


@pytest.mark.integration
@pytest.mark.slow
def test_large_specs_randomised(fuzz_service: Service) -> None:
    took = fuzz_big_specs(fuzz_service, random_run(400))
    print(f"large specs: {len(took)} requests, slowest {max(took):.2f} s")
