#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
