"""``/docs`` and ``/redoc`` render in headless Chromium with no network but the service itself."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from service.app import create_app
from studies.render_png import find_chromium
from studies.settings import Settings

pytestmark = pytest.mark.integration
playwright = pytest.importorskip("playwright.sync_api")
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def base_url(tmp_path: Path) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path / "data", registry_url=f"sqlite:///{tmp_path / 'registry.db'}")
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=_free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_docs_and_redoc_show_the_endpoints_with_no_network(base_url: str) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium not installed (apt-get install -y chromium)")
    outside: list[str] = []
    with playwright.sync_playwright() as p:
        # Every host name but the service's address fails to resolve: an air-gapped machine.
        args = ["--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page()
            local = (base_url, f"blob:{base_url}")  # ReDoc runs its search worker from a blob
            page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
            page.goto(f"{base_url}/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=60_000)
            paths = set(page.locator(".opblock-summary-path").all_inner_texts())
            assert {"/studies", "/studies/{study_id}", "/healthz"} <= {p.replace("\u200b", "") for p in paths}

            page.goto(f"{base_url}/redoc")
            page.wait_for_selector("[data-section-id]", timeout=60_000)
            assert "/studies/{study_id}" in page.locator("body").inner_text()
        finally:
            browser.close()
    # ReDoc's bundle links its "powered by" logo from its CDN; offline that small image is
    # missing and nothing else is.
    assert [u for u in outside if u != REDOC_LOGO] == [], f"the docs pages asked for outside resources: {outside}"
