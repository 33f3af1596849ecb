"""A real scale-out deployment on one machine, for the cluster tests.

A Ray cluster of separate nodes (``ray start``, token auth, private ports and temp dirs),
an MLflow tracking server on PostgreSQL and the Ladder service on PostgreSQL, wired as
docs/cluster.md describes. Everything here is stopped by PID: each process we start
carries a marker in its environment (``LR_TEST_PROC=<run>-<role>``), inherited by the
daemons ``ray start`` leaves behind (GCS, raylet, dashboard, monitors); their workers,
agents and job drivers are their descendants. Teardown finds exactly our processes that
way and never touches another Ray on the machine (no ``ray stop``, no kill by name).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.integration.helpers import wait_for

MARKER = "LR_TEST_PROC"
PG = "postgresql://postgres@127.0.0.1:5432"
BIN = Path(sys.executable).parent
# Never leak a caller's Ladder/Ray settings into what we start.
_SCRUB = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", MARKER)


def base_env(role: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LADDER_") and k not in _SCRUB}
    env |= {
        MARKER: role,
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in a Ray Job entrypoint is ours
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    return env | extra


# --- processes -----------------------------------------------------------------------


def marked(pred: Callable[[str], bool], var: str = MARKER) -> list[psutil.Process]:
    """Our processes whose ``LR_TEST_PROC`` (or ``var``) satisfies ``pred``, with all their descendants.

    Ray renames its workers and agents (``ray::...``, setproctitle), which clobbers what
    /proc shows of their environment: they are found as descendants of a marked process.
    """
    roots = []
    for p in psutil.process_iter():
        try:
            role = p.environ().get(var)
            if role is not None and pred(role):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    found: dict[int, psutil.Process] = {}
    for p in roots:
        found[p.pid] = p
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            found |= {c.pid: c for c in p.children(recursive=True)}
    out = []
    for p in found.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def kill_marked(pred: Callable[[str], bool], rounds: int = 5, var: str = MARKER) -> int:
    """SIGKILL every marked process and its descendants until none is left."""
    killed = 0
    for _ in range(rounds):
        procs = marked(pred, var)
        if not procs:
            break
        kill_all(procs)
        killed += len(procs)
    return killed


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def port_block(n: int) -> list[int]:
    """``n`` consecutive free ports away from Ray's and the OS's defaults."""
    for _ in range(200):
        base = random.randrange(21000, 31000 - n)
        ports = list(range(base, base + n))
        if all(_bindable(p) for p in ports):
            return ports
    raise RuntimeError(f"no {n} consecutive free ports")


# --- PostgreSQL ------------------------------------------------------------------------


class Databases:
    """Fresh databases on the local PostgreSQL (trust auth), dropped at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []
        import psycopg

        try:
            psycopg.connect(f"{PG}/postgres", connect_timeout=5).close()
        except psycopg.OperationalError as e:
            raise RuntimeError(f"these tests need PostgreSQL at {PG} (user postgres, trust auth): {e}") from None

    def create(self, prefix: str) -> str:
        import psycopg

        name = f"{prefix}_{secrets.token_hex(4)}"
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return f"{PG}/{name}"

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.clear()


# --- Ray -------------------------------------------------------------------------------


class RayNode:
    """One ``ray start`` node with its own ports and temp dir; its processes found by marker."""

    def __init__(self, cluster: RayCluster, name: str, head: bool) -> None:
        self.cluster, self.name, self.head = cluster, name, head
        self.role = f"{cluster.run}-{name}"
        self.temp_dir = cluster.root / name
        self.log = cluster.root / f"{name}.start.log"
        self.node_id = ""
        p = port_block(12 + 40)
        self.ports = {
            "node_manager": p[0],
            "object_manager": p[1],
            "ray_client_server": p[2],
            "dashboard_agent_listen": p[3],
            "dashboard_agent_grpc": p[4],
            "runtime_env_agent": p[5],
            "metrics_export": p[6],
            "gcs": p[7],
            "dashboard": p[8],
            "min_worker": p[12],
            "max_worker": p[-1],
        }

    def start(self, num_cpus: int = 1, timeout: float = 120) -> RayNode:
        args = [
            str(BIN / "ray"),
            "start",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={self.ports['node_manager']}",
            f"--object-manager-port={self.ports['object_manager']}",
            f"--min-worker-port={self.ports['min_worker']}",
            f"--max-worker-port={self.ports['max_worker']}",
            f"--dashboard-agent-listen-port={self.ports['dashboard_agent_listen']}",
            f"--dashboard-agent-grpc-port={self.ports['dashboard_agent_grpc']}",
            f"--runtime-env-agent-port={self.ports['runtime_env_agent']}",
            f"--metrics-export-port={self.ports['metrics_export']}",
            f"--object-store-memory={200 * 1024**2}",
            "--disable-usage-stats",
            "--log-style=record",
        ]
        if self.head:
            args += [
                "--head",
                f"--port={self.ports['gcs']}",
                f"--ray-client-server-port={self.ports['ray_client_server']}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.ports['dashboard']}",
            ]
        else:
            args.append(f"--address=127.0.0.1:{self.cluster.gcs_port}")
        env = base_env(self.role, **self.cluster.auth_env())
        t0 = time.monotonic()
        with self.log.open("ab") as log:
            # its own session: the daemons it leaves behind are found by marker, never by name
            out = subprocess.run(
                args,
                env=env,
                cwd=self.cluster.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                timeout=timeout,
            )
        assert out.returncode == 0, f"ray start {self.name} failed:\n{self.log.read_text()[-4000:]}"
        raylet = self.raylet()
        assert raylet is not None, f"no raylet of {self.name}"
        self.node_id = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))
        self.started_s = time.monotonic() - t0
        return self

    def processes(self) -> list[psutil.Process]:
        return marked(lambda r: r == self.role)

    def raylet(self) -> psutil.Process | None:
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.name() == "raylet":
                    return p
        return None

    def kill(self) -> int:
        """SIGKILL every process of this node (raylet, agents, workers, trials): a lost machine."""
        return kill_marked(lambda r: r == self.role)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the raylet (it deregisters the node), then kill whatever of ours is left."""
        tree = self.processes()  # before the raylet goes: its workers are found as its children
        raylet = self.raylet()
        if raylet is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                raylet.send_signal(signal.SIGTERM)
            psutil.wait_procs([raylet], timeout=grace)
        kill_all(tree)
        self.kill()


class RayCluster:
    """A head (GCS, dashboard, Ray Jobs) plus worker nodes, all with one auth token."""

    def __init__(self) -> None:
        self.run = secrets.token_hex(3)
        # a short root: Ray's unix sockets live under it (AF_UNIX paths are at most 107 bytes)
        self.root = Path(f"/tmp/lr-{self.run}")
        self.root.mkdir(mode=0o700)
        self.token = secrets.token_hex(32)
        self.head = RayNode(self, "head", head=True)
        self.workers: list[RayNode] = []

    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def gcs_port(self) -> int:
        return self.head.ports["gcs"]

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.head.ports['dashboard']}"

    def start(self) -> RayCluster:
        self.head.start()
        wait_for(lambda: self._ok("/api/gcs_healthz"), 60, "the Ray dashboard")
        return self

    def add_worker(self, name: str, num_cpus: int = 1) -> RayNode:
        node = RayNode(self, name, head=False)
        self.workers.append(node)
        node.start(num_cpus)
        wait_for(lambda: node.node_id in self.alive_node_ids(), 60, f"node {name} to join")
        return node

    def _ok(self, path: str) -> bool:
        try:
            return httpx.get(self.dashboard + path, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def get(self, path: str, token: str | None = "", **params: Any) -> httpx.Response:
        """GET on the dashboard; ``token=""`` sends the cluster token, ``None`` none."""
        headers = {"Authorization": f"Bearer {token or self.token}"} if token is not None else {}
        return httpx.get(self.dashboard + path, headers=headers, params=params, timeout=30)

    def nodes(self) -> list[dict[str, Any]]:
        r = self.get("/api/v0/nodes", limit=100, detail="true")
        assert r.status_code == 200, r.text
        return list(r.json()["data"]["result"]["result"])

    def alive_node_ids(self) -> set[str]:
        return {n["node_id"] for n in self.nodes() if n["state"] == "ALIVE"}

    def job(self, submission_id: str) -> dict[str, Any]:
        r = self.get(f"/api/jobs/{submission_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def stop(self) -> None:
        mine = lambda r: r.startswith(f"{self.run}-")  # noqa: E731
        tree = marked(mine)  # every node, its workers and the jobs' drivers, while still parented
        for node in [*self.workers, self.head]:
            node.stop(grace=5)
        kill_all(tree)
        kill_marked(mine)
        shutil.rmtree(self.root, ignore_errors=True)


# --- MLflow server -----------------------------------------------------------------------


class MlflowServer:
    def __init__(self, root: Path, backend_uri: str, role: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri, self.role = backend_uri, role
        self.artifacts = root / "mlartifacts"
        self.log = root / "mlflow.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        args = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "2",
            "--allowed-hosts",
            f"127.0.0.1,127.0.0.1:{self.port},localhost,localhost:{self.port}",
        ]
        self.proc = subprocess.Popen(
            args,
            env=base_env(self.role),
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._healthy, timeout, "the MLflow server", 1.0)
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-4000:]
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        kill_marked(lambda r: r == self.role)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- the Ladder service ------------------------------------------------------------------


class Service:
    """``python -m studies.cli serve`` as a Ray Jobs client of the cluster."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env, self.log = env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        args = [sys.executable, "-m", "studies.cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            args, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        wait_for(self._ready, 90, "the Ladder service")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-4000:]
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/studies", json=spec, timeout=60)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def wait_state(self, study_id: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        def done() -> bool:
            return self.get(f"/studies/{study_id}")["state"] in states

        wait_for(done, timeout, f"study {study_id} in {states}", 2.0)
        return dict(self.get(f"/studies/{study_id}"))
