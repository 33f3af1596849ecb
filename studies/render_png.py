"""Render an HTML file to PNG with headless Chromium (Debian's ``chromium`` package).

Usage: ``python -m studies.render_png report.html report.png``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian) or pass chromium=<path>"


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def render_png(
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1280,
    height: int = 4000,
    timeout_s: float = 120.0,
    chromium: str | None = None,
) -> Path:
    """Screenshot ``html_path`` (width x height pixels) into ``png_path``.

    A fresh profile directory is used and removed; networking extras are switched off.

    Returns:
        The PNG path.

    Raises:
        FileNotFoundError: if the HTML file or Chromium is missing.
        RuntimeError: if Chromium fails or writes no PNG.
    """
    html_file = Path(html_path).resolve()
    if not html_file.is_file():
        raise FileNotFoundError(f"no HTML file at {html_file}")
    binary = chromium or find_chromium()
    if not binary:
        raise FileNotFoundError(f"Chromium not found (looked for {', '.join(CHROMIUM_CANDIDATES)}); {INSTALL_HINT}")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="ladder-chromium-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            html_file.as_uri(),
        ]
        log.info("rendering %s -> %s", html_file, png)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"Chromium did not finish rendering {html_file} within {timeout_s} s") from e
    if proc.returncode != 0 or not png.is_file() or png.stat().st_size == 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"Chromium (exit {proc.returncode}) wrote no PNG for {html_file}; its output:\n{tail}")
    return png


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m studies.render_png REPORT.html OUT.png", file=sys.stderr)
        return 2
    print(render_png(args[0], args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
