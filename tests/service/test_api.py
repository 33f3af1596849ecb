"""The REST API over TestClient, on SQLite and on PostgreSQL: every endpoint and error path.

Tests that need a finished study share one tiny real study (local Ray, real MLflow) that the
module launches when it starts; each such test gets a copy of it in its own registry. Tests
that launch drivers cancel them and wait until the driver is gone.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from service.lifecycle import ACTIVE
from service.registry import Study
from service.routes.results import PLOTS
from service.routes.studies import EXAMPLE_SPEC
from studies.live_report import publish_report
from studies.records import TrialRecord
from studies.spec import StudySpec, json_schema
from studies.studydir import driver_lock, read_status, update_status, write_exit
from tests.service import (
    TINY_SPEC,
    TINY_YAML,
    YAML,
    Service,
    assert_error,
    cancel_and_wait,
    dead_pid,
    force_state,
    handle_pid,
    insert_study,
    join_stop_threads,
    pid_alive,
    reap,
    stop_leftovers,
    wait_state,
)
from tests.service.conftest import OpenService, hermetic_settings

integration = pytest.mark.integration
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def spec_with(**top: Any) -> dict[str, Any]:
    return json.loads(json.dumps(TINY_SPEC)) | top


def no_studies(svc: Service) -> None:
    """A refused submission leaves nothing behind: no registry row, no study directory."""
    assert svc.registry.page(10, 0) == ([], 0)
    studies = svc.settings.data_dir / "studies"
    assert not studies.exists() or not any(studies.iterdir())


# --- ops, schemas -------------------------------------------------------------------------


def test_healthz(svc: Service) -> None:
    r = svc.client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checks": {}}


def test_readyz_checks_registry_and_data_dir(svc: Service) -> None:
    r = svc.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checks": {"registry": "ok", "data_dir": "ok"}}
    assert not list(svc.settings.data_dir.glob(".ready-*"))  # the probe file is cleaned up


def test_readyz_is_503_when_data_dir_is_not_writable(svc: Service) -> None:
    shutil.rmtree(svc.settings.data_dir)
    svc.settings.data_dir.write_text("a file where the data directory should be")
    r = svc.client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["registry"] == "ok"
    assert body["checks"]["data_dir"].startswith("error")


def test_schema_study_is_the_spec_schema(svc: Service) -> None:
    r = svc.client.get("/schema/study")
    assert r.status_code == 200
    assert r.json() == json_schema()
    assert r.json()["$id"].endswith("/schema/study/v1.json")


def test_openapi_publishes_spec_component_examples_and_error_shape(svc: Service) -> None:
    doc = svc.client.get("/openapi.json").json()
    comps = doc["components"]["schemas"]
    assert comps["StudySpec"]["title"] == "StudySpec"
    assert set(comps["StudySpec"]["required"]) == {"name", "task", "model"}
    assert {"ModelSize", "TaskAxes", "Training", "Caps"} <= set(comps)
    post = doc["paths"]["/studies"]["post"]
    content = post["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/StudySpec"}
    assert "application/yaml" in content
    example = content["application/json"]["example"]
    assert example == EXAMPLE_SPEC
    StudySpec.model_validate(example)  # the documented example is a valid spec
    assert any(p["name"] == "Idempotency-Key" for p in post["parameters"])
    assert {"200", "201", "400", "401", "409", "413", "415", "422", "429"} <= set(post["responses"])
    err = post["responses"]["422"]["content"]["application/json"]["schema"]
    assert err == {"$ref": "#/components/schemas/ErrorBody"}
    for path in ("/studies/{study_id}", "/studies/{study_id}/cancel", "/studies/{study_id}/trials"):
        ops = doc["paths"][path]
        assert all("404" in op["responses"] for op in ops.values()), path


def test_openapi_declares_the_bearer_scheme(svc: Service) -> None:
    doc = svc.client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes == {
        "HTTPBearer": {"type": "http", "scheme": "bearer", "description": schemes["HTTPBearer"]["description"]}
    }
    for path, method in [("/studies", "post"), ("/studies/{study_id}/cancel", "post"), ("/studies/{study_id}", "get")]:
        assert doc["paths"][path][method]["security"] == [{"HTTPBearer": []}], (path, method)
    assert "security" not in doc["paths"]["/healthz"]["get"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "[::2]:80"])
def test_a_host_not_allowed_is_400(svc: Service, host: str) -> None:
    """DNS rebinding: a page on another name that resolves to loopback is refused, on every path."""
    for method, path in [("GET", "/healthz"), ("GET", "/studies"), ("POST", "/studies")]:
        r = svc.client.request(method, path, headers={"Host": host}, json=TINY_SPEC)
        assert_error(r, 400, ["header", "Host"], "LADDER_ALLOWED_HOSTS")
    no_studies(svc)


def test_allowed_hosts_default_to_localhost_names_without_a_token(open_service: OpenService) -> None:
    with open_service(allowed_hosts=[]) as svc:
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
            assert svc.client.get("/healthz", headers={"Host": host}).status_code == 200, host
        assert_error(svc.client.get("/healthz", headers={"Host": "ladder.example"}), 400, ["header", "Host"])
    with open_service(allowed_hosts=[], api_token=TOKEN) as svc:  # with a token: any name (it may sit behind a proxy)
        assert svc.client.get("/healthz", headers={"Host": "ladder.example"}).status_code == 200


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.0.7"])
def test_requests_off_loopback_without_a_token_are_403(open_service: OpenService, address: str) -> None:
    """However the app is served (``uvicorn --factory``), it answers off loopback only with a token."""
    import asyncio

    with open_service(allowed_hosts=["*"]) as svc:

        async def get() -> httpx.Response:
            transport = httpx.ASGITransport(app=svc.app)
            async with httpx.AsyncClient(transport=transport, base_url=f"http://{address}:8000") as client:
                return await client.get("/studies")

        assert_error(asyncio.run(get()), 403, [], "LADDER_API_TOKEN")


def test_report_errors_are_documented_as_json(svc: Service) -> None:
    responses = svc.client.get("/openapi.json").json()["paths"]["/studies/{study_id}/report"]["get"]["responses"]
    assert "text/html" in responses["200"]["content"]
    assert list(responses["404"]["content"]) == ["application/json"]


# --- POST /studies ----------------------------------------------------------------------


def check_created(svc: Service, r: httpx.Response, name: str = "t") -> str:
    assert r.status_code == 201, r.text
    body = r.json()
    sid = body["id"]
    assert sid.startswith(f"{name}-")
    assert r.headers["location"] == f"http://testserver/studies/{sid}"
    assert body["links"]["self"] == r.headers["location"]
    assert body["links"]["trials"] == f"{r.headers['location']}/trials"
    assert body["name"] == name
    assert body["state"] == "launching"
    assert body["launcher"] == "local" and body["attempts"] == 0 and body["error"] is None
    assert body["progress"] == {"planned": 4, "done": 0, "running": 0, "counts": {}}
    row = svc.registry.get(sid)
    assert row is not None and row.spec_json == StudySpec.model_validate(TINY_SPEC | {"name": name}).to_json()
    assert (svc.settings.study_dir(sid) / "spec.json").read_text() == row.spec_json
    assert pid_alive(handle_pid(svc, sid))
    return str(sid)


@integration
def test_create_with_json(svc: Service) -> None:
    sid = check_created(svc, svc.client.post("/studies", json=TINY_SPEC))
    got = svc.client.get(f"/studies/{sid}")
    assert got.status_code == 200 and got.json()["id"] == sid
    assert cancel_and_wait(svc.client, sid)["state"] == "cancelled"


@integration
def test_create_with_yaml(svc: Service) -> None:
    sid = check_created(svc, svc.client.post("/studies", content=TINY_YAML, headers=YAML))
    assert cancel_and_wait(svc.client, sid)["state"] == "cancelled"


@integration
def test_idempotency_key(svc: Service) -> None:
    c = svc.client
    key = {"Idempotency-Key": "submit-42"}
    sid = check_created(svc, c.post("/studies", json=TINY_SPEC, headers=key))
    again = c.post("/studies", json=TINY_SPEC, headers=key)
    assert again.status_code == 200 and again.json()["id"] == sid
    as_yaml = c.post("/studies", content=TINY_YAML, headers=key | YAML)  # the same spec, written differently
    assert as_yaml.status_code == 200 and as_yaml.json()["id"] == sid
    other = c.post("/studies", json=spec_with(name="u"), headers=key)
    assert_error(other, 409, ["header", "Idempotency-Key"], "different spec")
    assert svc.registry.page(10, 0)[1] == 1  # one study, one driver
    assert cancel_and_wait(c, sid)["state"] == "cancelled"


@pytest.mark.parametrize("key", ["", "k" * 201])
def test_idempotency_key_length(svc: Service, key: str) -> None:
    r = svc.client.post("/studies", json=TINY_SPEC, headers={"Idempotency-Key": key})
    assert_error(r, 422, ["header", "Idempotency-Key"], "1 to 200 characters")
    no_studies(svc)


@pytest.mark.parametrize(
    "ctype",
    ["text/plain", "application/xml", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", None],
)
def test_create_unsupported_content_type_is_415(svc: Service, ctype: str | None) -> None:
    """Only JSON or YAML: a browser's simple cross-site POST (no preflight) cannot submit a study."""
    headers = {"Content-Type": ctype} if ctype else {}
    r = svc.client.post("/studies", content=json.dumps(TINY_SPEC), headers=headers)
    assert_error(r, 415, ["header", "Content-Type"], "application/json or application/yaml")
    no_studies(svc)


@pytest.mark.parametrize(
    ("body", "ctype", "fragment"),
    [
        ('{"name": "t",', "application/json", "cannot parse"),
        ("", "application/json", "cannot parse"),
        ("name: [unclosed\n", "application/yaml", "cannot parse"),
        ("a: 1\n---\nb: 2\n", "application/yaml", "cannot parse"),
        ("name: !!python/object:os.system ls\n", "application/yaml", "cannot parse"),
        ("base: &b {d_model: 16}\nmodel: *b\n", "application/yaml", "aliases are not allowed"),
        (b"\xff\xfe{}", "application/json", "UTF-8"),
    ],
    ids=[
        "json-truncated",
        "json-empty",
        "yaml-unclosed",
        "yaml-two-documents",
        "yaml-python-tag",
        "yaml-alias",
        "utf8",
    ],
)
def test_create_unparsable_body_is_400(svc: Service, body: str | bytes, ctype: str, fragment: str) -> None:
    r = svc.client.post("/studies", content=body, headers={"Content-Type": ctype})
    assert_error(r, 400, ["body"], fragment)
    no_studies(svc)


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        ("[1, 2]", "application/json"),
        ('"t"', "application/json"),
        ("null", "application/json"),
        ("- 1\n", YAML["Content-Type"]),
        ("", "application/yaml"),
    ],
)
def test_create_non_object_body_is_422(svc: Service, body: str, ctype: str) -> None:
    r = svc.client.post("/studies", content=body, headers={"Content-Type": ctype})
    assert_error(r, 422, ["body"], "must be an object")
    no_studies(svc)


@pytest.mark.parametrize(
    ("change", "loc", "fragments"),
    [
        (
            {"model": {"sizes": [{"d_model": 15, "n_layers": 1, "n_heads": 2}]}},
            ["body", "model", "sizes", 0],
            ("d_model must be divisible by n_heads", "d_model=15"),
        ),
        ({"attention": ["dpa", "nope"]}, ["body", "attention"], ("unknown attention kind", "nope")),
        ({"attention": ["dpa", "dpa"]}, ["body", "attention"], ("distinct",)),
        ({"task": None}, ["body", "task"], ("Field required",)),
        ({"bogus": 1}, ["body", "bogus"], ("Extra inputs are not permitted",)),
        ({"name": "has space"}, ["body", "name"], ("pattern",)),
        (
            {"training": {"max_steps": 50, "eval_interval": 100}},
            ["body", "training"],
            ("eval_interval must be <= max_steps",),
        ),
        ({"seeds": [-1]}, ["body", "seeds", 0], ("greater than or equal to 0",)),
        ({"caps": {"max_trials": 2}}, ["body", "caps", "max_trials"], ("plans 4 trials", "caps.max_trials=2")),
    ],
    ids=["heads", "unknown-kind", "repeated-kind", "missing-task", "extra-field", "name", "eval", "seed", "spec-cap"],
)
def test_create_invalid_spec_is_422_at_the_field(
    svc: Service, change: dict[str, Any], loc: list[str | int], fragments: tuple[str, ...]
) -> None:
    spec = {k: v for k, v in spec_with(**change).items() if v is not None}
    for r in (
        svc.client.post("/studies", json=spec),
        svc.client.post("/studies", content=yaml.safe_dump(spec), headers=YAML),
    ):
        assert_error(r, 422, loc, *fragments)
    no_studies(svc)


def test_create_over_the_service_trial_cap_is_422(open_service: OpenService) -> None:
    with open_service(max_trials_per_study=3) as svc:
        r = svc.client.post("/studies", json=TINY_SPEC)
        assert_error(
            r, 422, ["body", "caps", "max_trials"], "plans 4 trials", "at most 3", "LADDER_MAX_TRIALS_PER_STUDY"
        )
        no_studies(svc)


def test_body_over_the_limit_is_413(open_service: OpenService) -> None:
    with open_service(max_body_bytes=2048, max_trials_per_study=1) as svc:
        c = svc.client
        big = json.dumps(spec_with(description="x" * 1990))
        assert len(big) > 2048
        assert_error(
            c.post("/studies", content=big, headers={"Content-Type": "application/json"}), 413, ["body"], "2048"
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds for a streamed body too
            for i in range(0, len(big), 500):
                yield big[i : i + 500].encode()

        assert_error(c.post("/studies", content=chunks(), headers={"Content-Type": "application/json"}), 413, ["body"])
        no_studies(svc)
        # Just under the limit, the body reaches the route intact (here: refused by the trial cap, not by size).
        small = json.dumps(spec_with(description="x" * 1700))
        assert len(small) <= 2048
        r = c.post("/studies", content=small, headers={"Content-Type": "application/json"})
        assert_error(r, 422, ["body", "caps", "max_trials"], "plans 4 trials")


@integration
def test_more_active_studies_than_the_limit_is_429(open_service: OpenService) -> None:
    with open_service(max_concurrent_studies=1) as svc:
        c = svc.client
        key = {"Idempotency-Key": "first"}
        first = check_created(svc, c.post("/studies", json=TINY_SPEC, headers=key))
        r = c.post("/studies", json=spec_with(name="u"))
        assert_error(r, 429, [], "1 studies are active", "limit is 1", "LADDER_MAX_CONCURRENT_STUDIES")
        assert svc.registry.page(10, 0)[1] == 1
        # A repeat of an accepted submission is not a new study: it is answered, not refused.
        again = c.post("/studies", json=TINY_SPEC, headers=key)
        assert again.status_code == 200 and again.json()["id"] == first
        assert cancel_and_wait(c, first)["state"] == "cancelled"
        second = check_created(svc, c.post("/studies", json=spec_with(name="u")), name="u")  # the slot is free
        assert cancel_and_wait(c, second)["state"] == "cancelled"


@pytest.mark.parametrize("ctype", ["application/json", "application/yaml"])
def test_deeply_nested_body_is_400(svc: Service, ctype: str) -> None:
    depth = 100_000 if ctype == "application/json" else 1_100  # pure-Python YAML is slow: keep the test short
    body = "[" * depth + "]" * depth
    r = svc.client.post("/studies", content=body, headers={"Content-Type": ctype})
    assert_error(r, 400, ["body"])


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("GET", "/studies/x/plots/..%2Fspec.json", 404), ("PUT", "/studies", 405)],
)
def test_unrouted_requests_have_the_error_shape(svc: Service, method: str, path: str, status: int) -> None:
    assert_error(svc.client.request(method, path), status)


# --- GET /studies, GET /studies/{id} ------------------------------------------------------

STATES = ["finished", "failed", "cancelled", "finished", "interrupted"]


def test_list_pages_newest_first_with_state_filter(svc: Service) -> None:
    c = svc.client
    ids = [insert_study(svc, s, created=1_000.0 + i) for i, s in enumerate(STATES)]
    newest = ids[::-1]
    r = c.get("/studies")
    assert r.status_code == 200
    body = r.json()
    assert (body["total"], body["limit"], body["offset"]) == (5, 50, 0)
    assert [s["id"] for s in body["items"]] == newest
    assert [s["state"] for s in body["items"]] == STATES[::-1]
    pages = [c.get("/studies", params={"limit": 2, "offset": o}).json() for o in (0, 2, 4, 6)]
    assert [[s["id"] for s in p["items"]] for p in pages] == [newest[0:2], newest[2:4], newest[4:], []]
    assert {(p["total"], p["limit"]) for p in pages} == {(5, 2)}
    assert [p["offset"] for p in pages] == [0, 2, 4, 6]
    done = c.get("/studies", params={"state": "finished"}).json()
    assert done["total"] == 2 and [s["id"] for s in done["items"]] == [ids[3], ids[0]]
    assert c.get("/studies", params={"state": "running"}).json() == {"items": [], "total": 0, "limit": 50, "offset": 0}


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": 201}, ["query", "limit"]),
        ({"limit": "ten"}, ["query", "limit"]),
        ({"offset": -1}, ["query", "offset"]),
        ({"state": "sleeping"}, ["query", "state"]),
    ],
)
def test_list_bad_query_is_422(svc: Service, params: dict[str, Any], loc: list[str | int]) -> None:
    assert_error(svc.client.get("/studies", params=params), 422, loc)


def test_get_study(svc: Service) -> None:
    sid = insert_study(svc, "failed", error="boom")
    r = svc.client.get(f"/studies/{sid}")
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == sid and body["name"] == "t" and body["state"] == "failed" and body["error"] == "boom"
    assert body["progress"] == {"planned": 4, "done": 0, "running": 0, "counts": {}}
    assert body["links"]["self"] == f"http://testserver/studies/{sid}"
    assert body["links"]["mlflow_run"] is None and body["links"]["ray_job"] is None


METHODS_AND_SUFFIXES = [
    ("GET", ""),
    ("POST", "/cancel"),
    ("POST", "/resume"),
    ("DELETE", ""),
    ("GET", "/trials"),
    ("GET", "/frontier"),
    ("GET", "/report"),
    ("GET", "/plots/frontier.png"),
]


@pytest.mark.parametrize(("method", "suffix"), METHODS_AND_SUFFIXES)
def test_unknown_study_is_404(svc: Service, method: str, suffix: str) -> None:
    r = svc.client.request(method, f"/studies/nope-00000000{suffix}")
    assert_error(r, 404, ["path", "study_id"], "no study with id 'nope-00000000'")


def test_unknown_study_id_with_a_nul_byte_is_404(svc: Service, request: pytest.FixtureRequest) -> None:
    assert_error(svc.client.get("/studies/a%00b"), 404, ["path", "study_id"])


# --- cancel, resume, delete ------------------------------------------------------------------


@integration
def test_running_study_cancel_delete_resume_conflicts(open_service: OpenService) -> None:
    with open_service(max_concurrent_studies=1) as svc:
        c = svc.client
        sid = check_created(svc, c.post("/studies", json=TINY_SPEC))
        pid = handle_pid(svc, sid)
        body = wait_state(c, sid, lambda b: b["state"] != "launching", 120, "the driver to start")
        assert body["state"] == "running", body
        assert_error(c.delete(f"/studies/{sid}"), 409, ["path", "study_id"], "study is running", "cancel it first")
        assert_error(c.post(f"/studies/{sid}/resume"), 409, ["path", "study_id"], "study is running")
        assert_error(c.post("/studies", json=spec_with(name="u")), 429, [], "limit is 1")
        r = c.post(f"/studies/{sid}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "cancelling"
        again = c.post(f"/studies/{sid}/cancel")  # a repeated cancel is accepted (and sent again)
        assert again.status_code == 202 and again.json()["state"] in ("cancelling", "cancelled")
        final = wait_state(c, sid, lambda b: b["state"] not in ACTIVE, 60, "the cancel")
        assert final["state"] == "cancelled"
        assert final["progress"]["running"] == 0
        assert not pid_alive(pid)
        join_stop_threads()  # the cancel's clean-up: the driver's own status agrees
        assert read_status(svc.settings.study_dir(sid))["state"] == "cancelled"
        assert c.delete(f"/studies/{sid}").status_code == 204


def test_a_cancel_the_reconciler_ended_first_still_settles_the_drivers_status(svc: Service) -> None:
    """The driver was killed at the end of its grace before it wrote its state; the watch loop saw it
    dead and ended the cancel before the cancel's own thread came back: the status file still says so."""
    sid = insert_study(svc, "cancelling", handle="local-0")
    d = svc.settings.study_dir(sid)
    update_status(d, state="running", attempt=0)  # the driver's last word before the SIGKILL
    supervisor = svc.app.state.supervisor
    study = svc.registry.get(sid)
    assert study is not None
    assert supervisor.reconcile(study).state == "cancelled"  # the reconciler, first
    supervisor._stop(sid, "local-0")  # then the cancel's thread, its driver gone
    assert read_status(d)["state"] == "cancelled"
    assert svc.client.get(f"/studies/{sid}").json()["state"] == "cancelled"


@pytest.mark.parametrize("state", ["cancelled", "failed", "interrupted"])
def test_cancel_a_stopped_study_is_409(svc: Service, state: str) -> None:
    sid = insert_study(svc, state)
    assert_error(svc.client.post(f"/studies/{sid}/cancel"), 409, ["path", "study_id"], f"study is {state}")
    assert svc.client.get(f"/studies/{sid}").json()["state"] == state


@integration
@pytest.mark.parametrize("state", ["interrupted", "cancelled", "failed"])
def test_resume_a_stopped_study_is_202(svc: Service, state: str) -> None:
    sid = insert_study(svc, state, error="it stopped")
    r = svc.client.post(f"/studies/{sid}/resume")
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["state"], body["attempts"], body["error"]) == ("launching", 1, None)
    pid = handle_pid(svc, sid)
    assert psutil.Process(pid).cmdline()[-5:] == ["workers.driver", sid, "--attempt", "1", "--resume"]
    assert cancel_and_wait(svc.client, sid)["state"] == "cancelled"
    assert not pid_alive(pid)


@integration
def test_a_resumed_study_stays_active_until_its_driver_reports(svc: Service) -> None:
    c = svc.client
    sid = check_created(svc, c.post("/studies", json=TINY_SPEC))
    wait_state(c, sid, lambda b: b["state"] != "launching", 120, "the driver to start")
    assert cancel_and_wait(c, sid)["state"] == "cancelled"
    assert read_status(svc.settings.study_dir(sid))["state"] == "cancelled"
    r = c.post(f"/studies/{sid}/resume")
    assert r.status_code == 202 and r.json()["state"] == "launching"
    resumed = handle_pid(svc, sid)
    try:
        end = time.monotonic() + 3  # the new driver needs longer than this to report "running"
        while time.monotonic() < end:
            body = c.get(f"/studies/{sid}").json()
            assert body["state"] in ("launching", "running") and body["attempts"] == 1, body
            time.sleep(0.25)
        assert pid_alive(resumed)
    finally:
        if c.get(f"/studies/{sid}").json()["state"] in ("launching", "running"):
            cancel_and_wait(c, sid)
        reap(svc.settings.data_dir)  # the resumed driver, if the service lost track of it


@pytest.mark.parametrize("state", ["cancelled", "failed", "interrupted"])
def test_delete_a_stopped_study_is_204_then_404(svc: Service, state: str) -> None:
    sid = insert_study(svc, state)
    r = svc.client.delete(f"/studies/{sid}")
    assert r.status_code == 204 and r.content == b""
    assert not svc.settings.study_dir(sid).exists()
    assert_error(svc.client.get(f"/studies/{sid}"), 404, ["path", "study_id"])
    assert_error(svc.client.delete(f"/studies/{sid}"), 404, ["path", "study_id"])


def test_delete_removes_tune_results_optuna_study_and_files_of_that_study_only(svc: Service) -> None:
    """DELETE takes ray_results/<id>, the Optuna study and the study's files, of that study and no other."""
    import optuna

    settings = svc.settings
    storage = optuna.storages.RDBStorage(settings.optuna_url)
    victim, bystander = insert_study(svc, "cancelled"), insert_study(svc, "finished")
    for sid in (victim, bystander):  # what a driver and a report render leave behind
        optuna.create_study(storage=storage, study_name=sid).ask()
        (Path(settings.tune_storage) / sid).mkdir(parents=True)
        (Path(settings.tune_storage) / sid / "experiment_state.json").write_text("{}")
        (settings.data_dir / "cache" / "reports" / sid).mkdir(parents=True)
    (settings.study_dir(victim) / "trials.jsonl").write_text("")

    def left(sid: str) -> dict[str, bool]:
        return {
            "row": svc.registry.get(sid) is not None,
            "study dir": settings.study_dir(sid).exists(),
            "tune": (Path(settings.tune_storage) / sid).exists(),
            "cache": (settings.data_dir / "cache" / "reports" / sid).exists(),
            "optuna": sid in {s.study_name for s in optuna.get_all_study_summaries(storage)},
        }

    assert svc.client.delete(f"/studies/{victim}").status_code == 204
    assert left(victim) == dict.fromkeys(left(victim), False)
    assert left(bystander) == dict.fromkeys(left(bystander), True)
    assert svc.client.get(f"/studies/{bystander}").status_code == 200


def test_delete_refuses_while_a_driver_lives(svc: Service) -> None:
    """A stopped study whose driver still holds its lock (it is writing its last words) is not deleted."""
    sid = insert_study(svc, "failed")
    d = svc.settings.study_dir(sid)
    (Path(svc.settings.tune_storage) / sid).mkdir(parents=True)
    with driver_lock(d) as mine:
        assert mine
        assert_error(svc.client.delete(f"/studies/{sid}"), 409, ["path", "study_id"], "still running")
        assert svc.registry.get(sid) is not None and (d / "spec.json").exists()
        assert (Path(svc.settings.tune_storage) / sid).exists()
    assert svc.client.delete(f"/studies/{sid}").status_code == 204
    assert not d.exists() and not (Path(svc.settings.tune_storage) / sid).exists()


@integration
def test_concurrent_resumes_launch_one_driver(svc: Service) -> None:
    sid = insert_study(svc, "interrupted")
    barrier = threading.Barrier(3)
    codes: list[int] = []

    def resume() -> None:
        barrier.wait()
        codes.append(svc.client.post(f"/studies/{sid}/resume").status_code)

    threads = [threading.Thread(target=resume) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        drivers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][-5:] == ["workers.driver", sid, "--attempt", "1", "--resume"]
        ]
        assert sorted(codes) == [202, 409, 409]
        assert len(drivers) == 1
    finally:
        reap(svc.settings.data_dir)  # every driver, tracked or not
        force_state(svc.registry, sid, "cancelled")


@integration
def test_resume_respects_the_concurrency_limit(open_service: OpenService) -> None:
    with open_service(max_concurrent_studies=1) as svc:
        c = svc.client
        stopped = insert_study(svc, "cancelled")
        running = check_created(svc, c.post("/studies", json=TINY_SPEC))
        try:
            assert_error(c.post(f"/studies/{stopped}/resume"), 429, [], "limit is 1")
        finally:
            for sid in (running, stopped):
                if c.get(f"/studies/{sid}").json()["state"] in ("launching", "running"):
                    cancel_and_wait(c, sid)


# --- auth -------------------------------------------------------------------------------------

BAD_AUTH = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}]


def assert_401(r: httpx.Response) -> None:
    assert_error(r, 401, ["header", "Authorization"], "bearer token")
    assert r.headers["www-authenticate"] == "Bearer"


def test_mutations_need_the_token(open_service: OpenService) -> None:
    with open_service(api_token=TOKEN, max_trials_per_study=1) as svc:
        c = svc.client
        sid = insert_study(svc, "cancelled")
        calls = [
            ("POST", "/studies", {"json": TINY_SPEC}),
            ("POST", f"/studies/{sid}/cancel", {}),
            ("POST", f"/studies/{sid}/resume", {}),
            ("DELETE", f"/studies/{sid}", {}),
            ("DELETE", "/studies/nope-00000000", {}),  # 401 before 404: no probing for ids
        ]
        for method, path, kw in calls:
            for headers in BAD_AUTH:
                assert_401(c.request(method, path, headers=headers, **kw))
        assert svc.registry.page(10, 0)[1] == 1 and svc.client.get(f"/studies/{sid}").json()["state"] == "cancelled"
        # Reads stay open.
        for path in ("/studies", f"/studies/{sid}", f"/studies/{sid}/trials", f"/studies/{sid}/frontier"):
            assert c.get(path).status_code == 200, path
        # With the token the request reaches the route.
        assert_error(c.post("/studies", json=TINY_SPEC, headers=AUTH), 422, ["body", "caps", "max_trials"])
        assert_error(c.post(f"/studies/{sid}/cancel", headers=AUTH), 409, ["path", "study_id"])
        assert c.delete(f"/studies/{sid}", headers=AUTH).status_code == 204


@integration
def test_submit_and_cancel_with_the_token(open_service: OpenService) -> None:
    with open_service(api_token=TOKEN) as svc:
        sid = check_created(svc, svc.client.post("/studies", json=TINY_SPEC, headers=AUTH))
        assert_401(svc.client.post(f"/studies/{sid}/cancel"))
        assert cancel_and_wait(svc.client, sid, headers=AUTH)["state"] == "cancelled"


def test_auth_reads(open_service: OpenService) -> None:
    with open_service(api_token=TOKEN, auth_reads=True) as svc:
        c = svc.client
        sid = insert_study(svc, "cancelled")
        reads = ["/studies", f"/studies/{sid}", f"/studies/{sid}/trials", f"/studies/{sid}/frontier"]
        reads += [f"/studies/{sid}/report", f"/studies/{sid}/plots/frontier.svg", "/studies/nope-00000000"]
        for path in reads:
            for headers in BAD_AUTH:
                assert_401(c.get(path, headers=headers))
        assert c.get("/studies", headers=AUTH).json()["total"] == 1
        assert c.get(f"/studies/{sid}", headers=AUTH).json()["state"] == "cancelled"
        # Probes and schemas stay open: orchestrators and clients need them without a token.
        for path in ("/healthz", "/readyz", "/schema/study", "/openapi.json"):
            assert c.get(path).status_code == 200, path


# --- restart durability -----------------------------------------------------------------------


@integration
def test_a_study_survives_a_service_restart(open_service: OpenService) -> None:
    with open_service() as first:
        sid = check_created(first, first.client.post("/studies", json=TINY_SPEC))
        pid = handle_pid(first, sid)
    with open_service() as second:
        c = second.client
        listed = c.get("/studies").json()
        assert [s["id"] for s in listed["items"]] == [sid]
        body = listed["items"][0]
        assert body["name"] == "t" and body["progress"]["planned"] == 4
        assert body["state"] in ("launching", "running")  # its driver lives on: not interrupted
        row = second.registry.get(sid)
        assert row is not None and row.spec_json == StudySpec.model_validate(TINY_SPEC).to_json()
        assert c.get(f"/studies/{sid}/frontier").json()["spec"] == json.loads(row.spec_json)
        assert cancel_and_wait(c, sid)["state"] == "cancelled"
        assert not pid_alive(pid)


@integration
def test_startup_reconciles_studies_whose_driver_is_gone(open_service: OpenService) -> None:
    with open_service() as first:
        gone = insert_study(first, "running", handle=str(dead_pid()))
        cancelling = insert_study(first, "cancelling", handle=str(dead_pid()))
        finished = insert_study(first, "running", handle=str(dead_pid()))
        update_status(first.settings.study_dir(finished), state="finished", done=4)
        crashed = insert_study(first, "running", handle=str(dead_pid()))  # wrote its exit record, then died
        write_exit(first.settings.study_dir(crashed), 0, 1, "OperationalError: the MLflow store is gone")
    with open_service() as second:
        # Start-up did it, before any request.
        states = {s: second.registry.get(s).state for s in (gone, cancelling, finished, crashed)}  # type: ignore[union-attr]
        assert states == {gone: "failed", cancelling: "cancelled", finished: "finished", crashed: "failed"}
        c = second.client
        body = c.get(f"/studies/{gone}").json()
        assert body["state"] == "failed"  # a driver that died without a verdict: the reason, and how to go on
        assert "it wrote no exit record" in body["error"], body["error"]
        assert f"POST /studies/{gone}/resume" in body["error"]
        # A service that did not start the driver still reports its exit code and reason.
        error = c.get(f"/studies/{crashed}").json()["error"]
        assert "exited with code 1 (OperationalError: the MLflow store is gone)" in error, error
        r = c.post(f"/studies/{gone}/resume")
        assert r.status_code == 202 and r.json()["attempts"] == 1
        assert cancel_and_wait(c, gone)["state"] == "cancelled"


# --- results of a finished study -----------------------------------------------------------------


@dataclass
class RealStudy:
    svc: Service
    study_id: str


@pytest.fixture(scope="module")
def real_study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStudy]:
    """The module's one real study (local Ray, MLflow on SQLite), launched through the API."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    root = tmp_path_factory.mktemp("real-study")
    settings = hermetic_settings(root / "data", f"sqlite:///{root / 'registry.db'}")
    app = create_app(settings)
    with TestClient(app) as client:
        r = client.post("/studies", json=TINY_SPEC)
        assert r.status_code == 201, r.text
        yield RealStudy(Service(settings, app, client), r.json()["id"])
        stop_leftovers(app.state.registry, settings, app.state.launcher)
    app.state.registry.engine.dispose()


@pytest.fixture(scope="module", autouse=True)
def _launch_real_study_early(request: pytest.FixtureRequest) -> None:
    """If a selected test needs the finished study, launch it now: it trains while other tests run."""
    items = [i for i in request.session.items if isinstance(i, pytest.Function) and i.module is request.module]
    if any({"finished", "real_finished"} & set(i.fixturenames) for i in items):
        request.getfixturevalue("real_study")


@pytest.fixture(scope="module")
def real_finished(real_study: RealStudy) -> RealStudy:
    body = wait_state(
        real_study.svc.client,
        real_study.study_id,
        lambda b: b["state"] != "launching" and b["state"] not in ACTIVE,
        240,
        "the real study to finish",
    )
    log = real_study.svc.settings.study_dir(real_study.study_id) / "driver.log"
    assert body["state"] == "finished", log.read_text()[-4000:]
    return real_study


def seed(svc: Service, real: RealStudy) -> str:
    """A copy of the real finished study (files and registry row) in this test's service."""
    src = real.svc.registry.get(real.study_id)
    assert src is not None
    shutil.copytree(real.svc.settings.study_dir(real.study_id), svc.settings.study_dir(real.study_id))
    with svc.registry.session() as s:
        s.add(Study(**{col: getattr(src, col) for col in Study.__table__.columns.keys()}))  # noqa: SIM118
    return real.study_id


@pytest.fixture
def finished(svc: Service, real_finished: RealStudy) -> str:
    return seed(svc, real_finished)


def files_under(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``roots``: path -> (mtime ns, size, sha256)."""
    import hashlib

    out = {}
    for root in roots:
        for p in sorted(root.rglob("*") if root.is_dir() else [root]):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_mtime_ns, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@integration
def test_reads_of_a_finished_study_write_nothing(svc: Service, finished: str) -> None:
    """GETs only read: the driver rendered the report; no read touches a file of the data dir or the registry.

    A finished study without a report (written by a version whose driver rendered none) is the
    one exception: its first GET of the report renders it once, under a lock, into the cache.
    """
    c, d = svc.client, svc.settings.study_dir(finished)
    reads = ["/studies", f"/studies/{finished}", f"/studies/{finished}/trials", f"/studies/{finished}/frontier"]
    reads += [f"/studies/{finished}/trials?format=csv", f"/studies/{finished}/report"]
    reads += [f"/studies/{finished}/plots/{name}" for name in PLOTS]
    roots = [svc.settings.data_dir]
    if svc.registry.url.startswith("sqlite:///"):
        roots.append(Path(svc.registry.url.removeprefix("sqlite:///")))
    before = files_under(*roots)
    for _ in range(2):
        for path in reads:
            assert c.get(path).status_code == 200, path
    time.sleep(1.5)  # a reconcile round of the service's watch loop, too
    assert files_under(*roots) == before

    shutil.rmtree(d / "report")  # an older version's study: its driver wrote no report
    before = files_under(*roots)
    assert c.get(f"/studies/{finished}/report").status_code == 200
    after = files_under(*roots)
    cache = str(svc.settings.data_dir / "cache" / "reports" / finished)
    assert {k: v for k, v in after.items() if not k.startswith(cache)} == before
    assert any(k.startswith(cache) and k.endswith("report.html") for k in after)
    for path in reads:
        assert c.get(path).status_code == 200, path
    assert files_under(*roots) == after  # rendered once; from then on reads write nothing


def test_a_running_study_serves_its_drivers_report_and_reads_write_nothing(svc: Service) -> None:
    """While a study runs, its driver re-renders the report as records arrive; the service only serves it."""
    sid = insert_study(svc, "running")
    d, c = svc.settings.study_dir(sid), svc.client
    with driver_lock(d):  # the study's driver lives (for the service's watch too)
        publish_report(StudySpec.model_validate(TINY_SPEC), d, {"study_id": sid})
        time.sleep(0.01)
        rec = {"study_id": sid, "trial_id": "t0", "kind": "dpa", "d_model": 16, "n_layers": 1, "n_heads": 2}
        rec |= {"point": "N7_T2", "coords": [0], "seed": 0, "lr": 0.003, "status": "solved", "steps": 200}
        (d / "trials.jsonl").write_text(json.dumps(rec) + "\n")  # newer than the report: the driver renders next
        before = files_under(svc.settings.data_dir)
        r = c.get(f"/studies/{sid}/report")
        assert r.status_code == 200 and r.text == (d / "report" / "report.html").read_text()
        for name in PLOTS:
            assert c.get(f"/studies/{sid}/plots/{name}").status_code == 200
        assert c.get(f"/studies/{sid}/trials").json()["total"] == 1  # the records themselves are current
        assert files_under(svc.settings.data_dir) == before
        force_state(svc.registry, sid, "cancelled")


@integration
def test_real_study_ran_through_the_api(real_finished: RealStudy) -> None:
    c, sid = real_finished.svc.client, real_finished.study_id
    body = c.get(f"/studies/{sid}").json()
    assert body["state"] == "finished" and body["error"] is None
    assert body["progress"]["planned"] == body["progress"]["done"] == 4
    assert sum(body["progress"]["counts"].values()) == 4 and body["progress"]["running"] == 0
    assert set(body["mlflow"]) == {"experiment_id", "run_id", "tracking_uri"}
    status = read_status(real_finished.svc.settings.study_dir(sid))
    assert status["state"] == "finished" and status["finished"] >= status["started"]
    assert not pid_alive(handle_pid(real_finished.svc, sid))


@integration
def test_finished_study_links_and_conflicts(open_service: OpenService, real_finished: RealStudy) -> None:
    with open_service(mlflow_ui_url="http://mlflow.local:5000/") as svc:
        c = svc.client
        sid = seed(svc, real_finished)
        body = c.get(f"/studies/{sid}").json()
        ml = body["mlflow"]
        exp = f"http://mlflow.local:5000/#/experiments/{ml['experiment_id']}"
        assert body["links"]["mlflow_experiment"] == f"{exp}/runs?workflowType=machine_learning"
        assert body["links"]["mlflow_run"] == f"{exp}/runs/{ml['run_id']}?workflowType=machine_learning"
        assert_error(c.post(f"/studies/{sid}/cancel"), 409, ["path", "study_id"], "study is finished")
        assert_error(c.post(f"/studies/{sid}/resume"), 409, ["path", "study_id"], "study is finished")
        assert c.delete(f"/studies/{sid}").status_code == 204
        assert not svc.settings.study_dir(sid).exists()
        for path in (f"/studies/{sid}", f"/studies/{sid}/trials"):
            assert_error(c.get(path), 404, ["path", "study_id"])


@integration
def test_trials_json_paging_and_filters(svc: Service, finished: str) -> None:
    c = svc.client
    everything = c.get(f"/studies/{finished}/trials").json()
    items = everything["items"]
    assert (everything["total"], everything["limit"], everything["offset"], len(items)) == (4, 100, 0, 4)
    assert len({t["trial_id"] for t in items}) == 4
    assert {(t["kind"], t["point"]) for t in items} == {(k, p) for k in ("dpa", "ea") for p in ("N7_T2", "N61_T6")}
    for t in items:
        TrialRecord.model_validate(t)
        assert t["study_id"] == finished and t["status"] in ("solved", "unsolved")

    pages = [c.get(f"/studies/{finished}/trials", params={"limit": 3, "offset": o}).json() for o in (0, 3, 9)]
    assert [len(p["items"]) for p in pages] == [3, 1, 0] and {p["total"] for p in pages} == {4}
    assert pages[0]["items"] + pages[1]["items"] == items

    def filtered(**params: str) -> list[dict[str, Any]]:
        got = c.get(f"/studies/{finished}/trials", params=params).json()
        assert got["total"] == len(got["items"])
        return list(got["items"])

    assert filtered(kind="ea") == [t for t in items if t["kind"] == "ea"] and len(filtered(kind="ea")) == 2
    assert filtered(point="N61_T6") == [t for t in items if t["point"] == "N61_T6"]
    for status in ("solved", "unsolved", "failed"):
        assert filtered(status=status) == [t for t in items if t["status"] == status]
    assert filtered(kind="dpa", point="N7_T2") == [t for t in items if (t["kind"], t["point"]) == ("dpa", "N7_T2")]
    assert filtered(kind="nope") == []


TRIALS_BAD_QUERIES = [
    ({"limit": 0}, "limit"),
    ({"limit": 10_001}, "limit"),
    ({"offset": -1}, "offset"),
    ({"format": "xml"}, "format"),
    ({"status": "x" * 21}, "status"),
]


@pytest.mark.parametrize(("params", "loc"), TRIALS_BAD_QUERIES)
def test_trials_bad_query_is_422(svc: Service, params: dict[str, Any], loc: str) -> None:
    sid = insert_study(svc, "cancelled")
    assert_error(svc.client.get(f"/studies/{sid}/trials", params=params), 422, ["query", loc])


@integration
def test_trials_csv(svc: Service, finished: str) -> None:
    c = svc.client
    items = c.get(f"/studies/{finished}/trials").json()["items"]
    by_param = c.get(f"/studies/{finished}/trials", params={"format": "csv"})
    by_accept = c.get(f"/studies/{finished}/trials", headers={"Accept": "text/csv"})
    for r in (by_param, by_accept):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert r.headers["content-disposition"] == f'attachment; filename="{finished}-trials.csv"'
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert list(rows[0]) == list(TrialRecord.model_fields)
        assert {"trial_id", "kind", "status", "point", "eval_acc"} <= set(rows[0])
        assert len(rows) == len(items) == 4
        for row, item in zip(rows, items, strict=True):
            for col in ("trial_id", "kind", "status", "point", "d_model", "seed", "steps", "mlflow_run_id"):
                assert row[col] == str(item[col]), col
            assert float(row["eval_acc"]) == pytest.approx(item["eval_acc"])
            assert json.loads(row["coords"]) == item["coords"]
    assert by_param.text == by_accept.text
    ea = c.get(f"/studies/{finished}/trials", params={"format": "csv", "kind": "ea", "limit": 1})
    ea_rows = list(csv.DictReader(io.StringIO(ea.text)))
    assert [r["trial_id"] for r in ea_rows] == [next(t["trial_id"] for t in items if t["kind"] == "ea")]


@integration
def test_frontier_json(svc: Service, finished: str) -> None:
    r = svc.client.get(f"/studies/{finished}/frontier")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    report = r.json()
    assert report["report_version"] == 2
    assert report["kinds"] == ["dpa", "ea"] and report["axes"] == ["rung"]
    assert {(c["kind"], c["point"]) for c in report["cells"]} == {
        (k, p) for k in ("dpa", "ea") for p in ("N7_T2", "N61_T6")
    }
    assert all(c["n_trials"] == 1 for c in report["cells"])
    assert report["compute"]["n_trials"] == 4
    assert report["spec"] == StudySpec.model_validate(TINY_SPEC).model_dump(mode="json")


@integration
def test_report_html_and_plots(svc: Service, finished: str) -> None:
    c = svc.client
    r = c.get(f"/studies/{finished}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<img" in r.text or "<svg" in r.text
    assert "dpa" in r.text and "ea" in r.text
    for name in PLOTS:
        p = c.get(f"/studies/{finished}/plots/{name}")
        assert p.status_code == 200, name
        if name.endswith(".svg"):
            assert p.headers["content-type"].startswith("image/svg+xml")
            assert b"<svg" in p.content[:2000]
        else:
            assert p.headers["content-type"] == "image/png"
            assert p.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert_error(c.get(f"/studies/{finished}/plots/loss.png"), 404, ["path", "name"], "frontier.png")


def test_results_of_a_study_without_trials(svc: Service) -> None:
    """A study stopped before any trial still has (empty) results, not errors."""
    c = svc.client
    sid = insert_study(svc, "cancelled")
    assert c.get(f"/studies/{sid}/trials").json() == {"items": [], "total": 0, "limit": 100, "offset": 0}
    rows = list(csv.reader(io.StringIO(c.get(f"/studies/{sid}/trials", params={"format": "csv"}).text)))
    assert rows == [list(TrialRecord.model_fields)]
    report = c.get(f"/studies/{sid}/frontier").json()
    assert report["report_version"] == 2 and report["compute"]["n_trials"] == 0
    assert all(cell["n_trials"] == 0 for cell in report["cells"])
    assert c.get(f"/studies/{sid}/report").status_code == 200
    png = c.get(f"/studies/{sid}/plots/frontier.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_a_trial_record_written_later_refreshes_the_report(svc: Service) -> None:
    """A rendered report is cached (one render per records version) until newer trial records arrive.

    Reads never write into the study directory: that is the driver's.
    """
    c = svc.client
    sid = insert_study(svc, "cancelled")
    first = c.get(f"/studies/{sid}/report").text
    d = svc.settings.study_dir(sid)
    cache = svc.settings.data_dir / "cache" / "reports" / sid
    (version,) = [p for p in cache.iterdir() if not p.name.startswith(".")]  # .lock: the render lock
    before = (version / "report.html").stat().st_mtime_ns
    assert c.get(f"/studies/{sid}/report").text == first  # cached: not rendered again
    assert (version / "report.html").stat().st_mtime_ns == before
    record = {
        "study_id": sid,
        "trial_id": "x1",
        "kind": "dpa",
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "point": "N7_T2",
        "coords": [0],
        "seed": 0,
        "lr": 0.003,
        "status": "solved",
        "eval_acc": 1.0,
        "steps": 200,
    }
    (d / "trials.jsonl").write_text(json.dumps(record) + "\n")
    assert c.get(f"/studies/{sid}/report").text != first
    versions = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    assert versions != [version.name] and len(versions) == 1
    assert not (d / "report").exists()
    assert c.get(f"/studies/{sid}/trials").json()["total"] == 1


def test_results_survive_a_torn_last_record(svc: Service) -> None:
    """A driver killed mid-write leaves half a line: every results endpoint still answers (not a 500)."""
    c = svc.client
    sid = insert_study(svc, "failed")
    rec = {"study_id": sid, "trial_id": "t0", "kind": "dpa", "d_model": 16, "n_layers": 1, "n_heads": 2}
    rec |= {"point": "N7_T2", "coords": [0], "seed": 0, "lr": 0.003, "status": "solved", "steps": 200}
    path = svc.settings.study_dir(sid) / "trials.jsonl"
    path.write_text(json.dumps(rec) + "\n" + '{"study_id": "' + sid + '", "trial_id": "t1", "ki')
    assert c.get(f"/studies/{sid}/trials").json()["total"] == 1
    assert c.get(f"/studies/{sid}/frontier").status_code == 200
    assert c.get(f"/studies/{sid}/report").status_code == 200
    assert c.get(f"/studies/{sid}").status_code == 200
