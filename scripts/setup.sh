#!/usr/bin/env bash
# Create .venv (if missing) and install dmm-deploy with its test tools.
# torch is pinned to 2.13.0: it installs a CPU build; an open range can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[train,test,robot]"
