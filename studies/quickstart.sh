#!/usr/bin/env bash
# Quick start: install Ladder, start the service, submit studies/quickstart.yaml over REST,
# show progress and print the capacity frontier. Extra arguments go to `ladder quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/ladder quickstart "$@"
