#!/bin/sh
# Entry point of the Ladder image: prepare the shared directories, refuse a Ray node whose
# token auth is switched on without a token, then run the command (ladder / ray / mlflow).
set -eu

# A fresh volume may hide the directories made at build time; create them again if we can.
for d in "${LADDER_DATA_DIR:-}" "${LADDER_STORAGE_PATH:-}"; do
    case "$d" in
        /*) mkdir -p "$d" 2>/dev/null || echo "ladder-entrypoint: warning: cannot create $d (volume permissions?)" >&2 ;;
    esac
done

# With RAY_AUTH_MODE=token and no token, `ray start --head` invents one that no worker or
# client knows, and a worker cannot join: fail here with the fix instead.
if [ "${1:-}" = "ray" ] && [ "${RAY_AUTH_MODE:-}" = "token" ] \
    && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] \
    && [ ! -s "${HOME:-/home/ladder}/.ray/auth_token" ]; then
    echo "ladder-entrypoint: RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN (the same on every node" \
        "and client) or RAY_AUTH_TOKEN_PATH; generate one with: ray get-auth-token --generate" >&2
    exit 64
fi

exec "$@"
