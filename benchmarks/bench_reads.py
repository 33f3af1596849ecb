"""Cheap reads: throughput of GET /studies/{id}, /frontier and /trials against /healthz, 50 readers.

Starts ``ladder serve`` on a fresh data directory holding one stopped study with trial
records (as a driver leaves them), then runs rounds of a fixed duration per endpoint with
50 concurrent readers (one asyncio client, on the same machine as the service), endpoints
interleaved round by round so that they share the machine's load. Prints (and with
``--json`` writes) the median requests/s and p95 latency per endpoint and the ratio to /healthz.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.bench_reads --seconds 5 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.seeding import seed_stopped_study, trial_record
from studies.spec import StudySpec

SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}
SPEC: dict[str, Any] = {
    "name": "bench",
    "task": {"ladder": [[[7, 2]], [[13, 2]], [[13, 4]], [[61, 6]]]},
    "model": {"sizes": [SIZE, {"d_model": 32, "n_layers": 2, "n_heads": 4}]},
    "seeds": [0, 1, 2],
    "training": {"max_steps": 200, "eval_interval": 100},
}


def seed(data_dir: Path) -> str:
    """One finished study with a record for each of its planned trials."""
    spec = StudySpec.model_validate(SPEC)

    def records(sid: str) -> Iterator[dict[str, Any]]:
        n = 0
        for kind in spec.attention:
            for size in spec.model.all_sizes():
                for i, point in enumerate(spec.task.points()):
                    for s in spec.seeds:
                        status = "solved" if i < 2 else "unsolved"
                        coords = list(point.coords)
                        more = {"seed": s, "status": status, "eval_acc": 1.0 - 0.1 * i}
                        yield trial_record(sid, n, kind, size.model_dump(), point.name, coords, **more)
                        n += 1

    return seed_stopped_study(data_dir, spec, records, "finished")


async def round_(url: str, path: str, seconds: float, readers: int) -> tuple[float, float, int]:
    """(requests/s, p95 latency s, errors) of ``readers`` clients reading ``path`` for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=readers, max_keepalive_connections=readers)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        end = time.perf_counter() + seconds

        async def reader() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                start = time.perf_counter()
                r = await client.get(path)
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(reader() for _ in range(readers)))
        took = time.perf_counter() - start
    return len(latencies) / took, statistics.quantiles(latencies, n=20)[-1], errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="duration of one round per endpoint")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--readers", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        sid = seed(data_dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, LADDER_DATA_DIR=str(data_dir), MLFLOW_DISABLE_TELEMETRY="true")
        for name in ("LADDER_REGISTRY_URL", "LADDER_API_TOKEN", "LADDER_AUTH_READS", "LADDER_RAY_ADDRESS"):
            env.pop(name, None)
        cmd = [sys.executable, "-m", "studies.cli", "serve", "--port", str(port), "--log-level", "warning"]
        server = subprocess.Popen(cmd, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            paths = {
                "/healthz": "/healthz",
                "/studies/{id}": f"/studies/{sid}",
                "/studies/{id}/frontier": f"/studies/{sid}/frontier",
                "/studies/{id}/trials": f"/studies/{sid}/trials",
            }
            for path in paths.values():  # warm caches and pools
                httpx.get(f"{url}{path}", timeout=60).raise_for_status()
            runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in paths}
            for _ in range(args.rounds):
                for name, path in paths.items():
                    runs[name].append(asyncio.run(round_(url, path, args.seconds, args.readers)))
        finally:
            server.terminate()
            server.wait(30)
    base = statistics.median(r[0] for r in runs["/healthz"])
    out = {"readers": args.readers, "seconds": args.seconds, "rounds": args.rounds, "cpus": os.cpu_count()}
    out["endpoints"] = {
        name: {
            "rps": round(statistics.median(r[0] for r in rs), 1),
            "p95_ms": round(1000 * statistics.median(r[1] for r in rs), 1),
            "ratio_to_healthz": round(statistics.median(r[0] for r in rs) / base, 2),
            "errors": sum(r[2] for r in rs),
        }
        for name, rs in runs.items()
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
