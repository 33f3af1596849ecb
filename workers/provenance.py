"""What every trial and study records about the code that ran it: package versions, git SHA, generator."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "ray", "optuna", "mlflow", "ladder"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def git_sha() -> str:
    if os.environ.get("LADDER_GIT_SHA"):
        return os.environ["LADDER_GIT_SHA"]
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def generator_version() -> str:
    from workers.tasks import GENERATOR_VERSION

    return GENERATOR_VERSION
