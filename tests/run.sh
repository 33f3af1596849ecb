#!/usr/bin/env bash
# Install Ladder and run lint, types and tests. `--slow` adds the slow tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh
# Headless Chromium renders the HTML report to PNG in the report tests (Debian package).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_USAGE_STATS=1 DO_NOT_TRACK=1
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy
marker="not slow"
if [ "${1:-}" = "--slow" ]; then marker="slow"; shift; fi
# pytest exits 5 when it collected no test: that fails this script, as it should.
.venv/bin/python -m pytest -m "$marker" "$@"
