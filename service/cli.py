"""Service commands of the ``ladder`` CLI: serve, submit, status, cancel, quickstart."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from studies.records import OUTCOMES
from studies.settings import is_loopback

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app
    from studies.settings import get_settings

    settings = get_settings()
    host, port = args.host or settings.host, args.port or settings.port
    if not is_loopback(host) and not settings.api_token:
        sys.exit(
            f"error: refusing to listen on {host} without a token: set LADDER_API_TOKEN "
            "(clients send it as 'Authorization: Bearer <token>'), or listen on 127.0.0.1"
        )
    print(f"Ladder API on http://{host}:{port} (docs: /docs); data in {settings.data_dir}", flush=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=args.log_level)
    return 0


class Client:
    """A small HTTP client for the Ladder API; errors exit with the API's message."""

    def __init__(self, url: str | None, token: str | None) -> None:
        self.url = (url or os.environ.get("LADDER_URL") or "http://127.0.0.1:8000").rstrip("/")
        token = token or os.environ.get("LADDER_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            sys.exit(f"error: cannot reach the Ladder service at {self.url}: {e}. Start it with `ladder serve`.")
        if r.status_code >= 400:
            try:
                items = r.json()["detail"]
                msg = "\n".join(f"  {'.'.join(str(x) for x in i['loc']) or '-'}: {i['msg']}" for i in items)
            except (ValueError, KeyError, TypeError):
                msg = r.text
            sys.exit(f"error: {method} {path} -> {r.status_code}\n{msg}")
        return r


def _print_study(s: dict[str, Any]) -> None:
    p = s["progress"]
    print(f"study {s['id']} ({s['name']}): {s['state']}  {p['done']}/{p['planned']} trials, {p['running']} running")
    if s.get("error"):
        print(f"  error: {s['error']}")


def wait_and_report(client: Client, study_id: str) -> dict[str, Any]:
    """Poll with a progress bar until the study ends; print the frontier table and where things are."""
    from tqdm import tqdm

    s = client.call("GET", f"/studies/{study_id}").json()
    with tqdm(total=s["progress"]["planned"], unit="trial", dynamic_ncols=True) as bar:
        while s["state"] in ("launching", "running", "cancelling"):
            time.sleep(1.0)
            s = client.call("GET", f"/studies/{study_id}").json()
            p = s["progress"]
            bad = sum(v for k, v in p["counts"].items() if k not in OUTCOMES)
            postfix = f"{s['state']} running={p['running']} failed={bad}"
            if (p["done"], postfix) != (bar.n, bar.postfix):
                bar.n = p["done"]
                bar.set_postfix_str(postfix)  # refreshes the bar only when something changed
    print()
    _print_study(s)
    from studies.report import Report, frontier_table

    report = Report.model_validate_json(client.call("GET", f"/studies/{study_id}/frontier").text)
    print(frontier_table(report))
    print(f"\nHTML report: {client.url}/studies/{study_id}/report (while the service runs)")
    ml = s.get("mlflow") or {}
    if ml:
        print(
            f"MLflow UI:   mlflow ui --backend-store-uri {ml.get('tracking_uri')}  "
            f"(experiment {ml.get('experiment_id')}, parent run {ml.get('run_id')})"
        )
    return s


def cmd_submit(args: argparse.Namespace) -> int:
    client = Client(args.url, args.token)
    text = Path(args.spec).read_text()
    headers = {"Content-Type": "application/yaml"}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    s = client.call("POST", "/studies", content=text.encode(), headers=headers).json()
    _print_study(s)
    if args.wait:
        s = wait_and_report(client, s["id"])
        return 0 if s["state"] == "finished" else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = Client(args.url, args.token)
    if args.study_id:
        _print_study(client.call("GET", f"/studies/{args.study_id}").json())
    else:
        for s in client.call("GET", "/studies", params={"limit": 50}).json()["items"]:
            _print_study(s)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _print_study(Client(args.url, args.token).call("POST", f"/studies/{args.study_id}/cancel").json())
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Start the service, submit the quick-start study over REST, wait, print the frontier, stop."""
    from studies.settings import get_settings

    settings = get_settings()
    port = args.port or _free_port()
    log_path = settings.data_dir / "service.log"
    print(f"starting the Ladder service on 127.0.0.1:{port} (log: {log_path})", flush=True)
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "studies.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client = Client(f"http://127.0.0.1:{port}", None)
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{client.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > end:
                sys.exit(f"error: the service did not start; see {log_path}")
            time.sleep(0.5)
        text = Path(args.spec).read_text()
        s = client.call("POST", "/studies", content=text.encode(), headers={"Content-Type": "application/yaml"}).json()
        _print_study(s)
        s = wait_and_report(client, s["id"])
        report = settings.study_dir(s["id"]) / "report" / "report.html"
        client.call("GET", f"/studies/{s['id']}/report")  # writes the final report files
        print(f"HTML report file: {report}")
        if args.keep_serving:
            print(f"service still running at {client.url} (Ctrl-C to stop)")
            server.wait()
        return 0 if s["state"] == "finished" else 1
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


def add_service_commands(sub: Any) -> None:
    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="service URL (default $LADDER_URL or http://127.0.0.1:8000)")
        p.add_argument("--token", help="bearer token (default $LADDER_API_TOKEN)")

    p = sub.add_parser("serve", help="run the REST service")
    p.add_argument("--host", help="listen address (default $LADDER_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default $LADDER_PORT or 8000)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("submit", help="submit a study spec to the service")
    p.add_argument("spec")
    p.add_argument("--wait", action="store_true", help="show progress until it ends, then the frontier")
    p.add_argument("--idempotency-key")
    client_args(p)
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("status", help="a study's status (or all studies)")
    p.add_argument("study_id", nargs="?")
    client_args(p)
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("cancel", help="cancel a running study")
    p.add_argument("study_id")
    client_args(p)
    p.set_defaults(fn=cmd_cancel)
    p = sub.add_parser("quickstart", help="start the service, run the quick-start study through it, print the frontier")
    p.add_argument("--spec", default=str(QUICKSTART))
    p.add_argument("--port", type=int)
    p.add_argument("--keep-serving", action="store_true")
    p.set_defaults(fn=cmd_quickstart)
