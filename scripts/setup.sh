#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with lb_dist (editable) and the requested extras.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev,bench
# A second run with the same inputs installs nothing (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
VENV="${LB_DIST_VENV:-.venv}"
CONSTRAINTS="${LB_DIST_CONSTRAINTS:-constraints/cpu.txt}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: $PYTHON is missing or older than 3.10; lb_dist needs Python >= 3.10" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian ships venv/ensurepip separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            rm -rf "$VENV"
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            "$PYTHON" -m venv "$VENV"
        else
            echo "setup: '$PYTHON -m venv' failed; install python3-venv" >&2
            exit 1
        fi
    fi
fi

stamp="$VENV/.lb_dist-setup"
want="$(cat pyproject.toml "$CONSTRAINTS" scripts/setup.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
    echo "setup: $VENV is up to date (extras: $EXTRAS)"
    exit 0
fi

echo "setup: installing lb_dist[$EXTRAS] into $VENV (constraints: $CONSTRAINTS)"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
"$VENV/bin/python" -c 'import torch, lb_dist; print(f"setup: torch {torch.__version__}, lb_dist {lb_dist.__version__}")'
echo "$want" >> "$stamp"
