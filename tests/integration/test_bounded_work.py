"""Bounded work per request, against a real uvicorn process over real HTTP.

No request can make the service read an unbounded body, expand an unbounded spec or block
its event loop: a 200 MB chunked upload is refused as it streams, absurd specs are refused
in milliseconds, and ``/healthz`` answers quickly while submits and report renders run.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from benchmarks.seeding import seed_stopped_study, trial_record
from studies.spec import StudySpec
from tests.integration.helpers import Server

pytestmark = pytest.mark.integration

TOKEN = "t0ken"
SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}
SPEC: dict[str, Any] = {
    "name": "b",
    "task": {"ladder": [[[7, 2]], [[61, 6]]]},
    "model": {"sizes": [SIZE]},
    "training": {"max_steps": 200, "eval_interval": 100},
}


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    # The trial cap keeps every submit here from launching a driver: they are validated, then refused.
    srv = Server(data_dir, LADDER_API_TOKEN=TOKEN, LADDER_MAX_TRIALS_PER_STUDY="1")
    srv.start()
    yield srv
    srv.stop()


def rss(server: Server) -> int:
    assert server.proc is not None
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def test_chunked_body_over_the_limit_is_413_as_it_streams(server: Server) -> None:
    """200 MB, chunked, no Content-Length and no token: 413, and the service's memory barely moves."""
    for _ in range(3):  # warm up the request path (imports, pools) before measuring memory
        httpx.post(f"{server.url}/studies", json=SPEC, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    before = rss(server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = (
        f"POST /studies HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode())
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0

    def send() -> None:
        nonlocal sent
        try:
            while sent < 200 * 2**20:
                sock.sendall(frame)
                sent += len(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the service answered and closed the connection: the rest is never read

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    response = b""
    while not response.endswith(b"}"):  # the error body is one JSON object
        data = sock.recv(65536)
        if not data:
            break
        response += data
    writer.join(60)
    sock.close()
    growth = rss(server) - before
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"larger than" in response
    assert sent < 200 * 2**20, "the service read the whole body before answering"
    assert growth < 20 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MB"


@pytest.mark.parametrize(
    ("spec", "loc"),
    [
        (SPEC | {"task": {"ladder": [[[10**12, 2]]]}}, ["body", "task", "ladder", 0, 0, 0]),
        (
            SPEC
            | {
                "task": {"grid": {"N": list(range(2, 3002)), "T": list(range(1, 3001))}},
                "search": {"method": "optuna", "n_trials": 10},
            },
            ["body", "task", "grid", "N"],
        ),
        (SPEC | {"model": {"d_model": list(range(8, 72)), "n_layers": list(range(1, 60)), "n_heads": [1]}}, None),
    ],
    ids=["N=1e12", "optuna 3000x3000 grid", "64x59 sizes"],
)
def test_oversized_specs_are_refused_within_2s(server: Server, spec: dict[str, Any], loc: list[Any] | None) -> None:
    start = time.monotonic()
    r = httpx.post(f"{server.url}/studies", json=spec, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    took = time.monotonic() - start
    assert r.status_code == 422, r.text[:500]
    assert took < 2.0, f"{took:.2f} s"
    if loc is not None:
        assert loc in [item["loc"] for item in r.json()["detail"]], r.text[:500]
    assert httpx.get(f"{server.url}/studies", timeout=10).json()["total"] == 0


def seed_finished(data_dir: Path, n: int) -> list[str]:
    """``n`` stopped studies with trial records, written as a driver would have left them."""
    trials = [("dpa", "N7_T2", "solved"), ("ea", "N7_T2", "solved"), ("dpa", "N61_T6", "unsolved")]

    def records(sid: str) -> list[dict[str, Any]]:
        return [
            trial_record(sid, j, kind, SIZE, point, [int(point != "N7_T2")], status=status, eval_acc=0.5 + 0.1 * j)
            for j, (kind, point, status) in enumerate(trials)
        ]

    return [
        seed_stopped_study(data_dir, StudySpec.model_validate(SPEC | {"name": f"r{i}"}), records, "cancelled")
        for i in range(n)
    ]


def test_healthz_stays_fast_while_submits_and_report_renders_run(server: Server, data_dir: Path) -> None:
    """The event loop never blocks: /healthz stays fast (p95) under 10 submits + 10 renders.

    Timing on a shared box is luck, so the bound is relative: 10x /healthz's own p95 measured
    idle just before, and never below 250 ms (the issue's 100 ms is what an idle box gives).
    A blocked loop shows a render's seconds, not milliseconds: no probe may take as long as
    the median request, however loaded the machine.
    """
    studies = seed_finished(data_dir, 10)
    heavy = SPEC | {  # 1024 task points: validation is real work (refused afterwards by the trial cap)
        "task": {"grid": {"N": list(range(200, 232)), "T": list(range(1, 33))}},
        "training": {"max_steps": 200, "eval_interval": 100, "context_length": 64},
        "search": {"method": "optuna", "n_trials": 1},
    }
    auth = {"Authorization": f"Bearer {TOKEN}"}
    codes: list[int] = []
    took: list[float] = []

    def call(method: str, path: str, **kw: Any) -> None:
        start = time.perf_counter()
        codes.append(httpx.request(method, f"{server.url}{path}", timeout=900, **kw).status_code)
        took.append(time.perf_counter() - start)

    def probe(client: httpx.Client) -> float:
        start = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        return time.perf_counter() - start

    load = [
        threading.Thread(target=call, args=("POST", "/studies"), kwargs={"json": heavy, "headers": auth})
        for _ in range(10)
    ]
    load += [threading.Thread(target=call, args=("GET", f"/studies/{sid}/report")) for sid in studies]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        idle = []
        for _ in range(40):
            idle.append(probe(client))
            time.sleep(0.02)
        for t in load:
            t.start()
        latencies = []
        while any(t.is_alive() for t in load):
            latencies.append(probe(client))
            time.sleep(0.02)
    for t in load:
        t.join()
    assert sorted(codes) == [200] * 10 + [422] * 10, codes
    assert len(latencies) >= 10, "the load finished before it could be measured"
    idle_p95 = statistics.quantiles(idle, n=20)[-1]
    p95 = statistics.quantiles(latencies, n=20)[-1]
    bound = max(0.250, 10 * idle_p95)
    summary = (
        f"/healthz p95 {p95 * 1000:.0f} ms (idle {idle_p95 * 1000:.0f} ms), max {max(latencies) * 1000:.0f} ms, "
        f"{len(latencies)} probes; requests took {min(took):.1f}-{max(took):.1f} s"
    )
    print(summary)
    assert p95 < bound, summary
    assert max(latencies) < statistics.median(took), summary  # no probe waited for a whole request
