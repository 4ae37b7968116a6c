#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, type-check the GPU layer against TensorRT's stubs
# (scripts/typecheck_gpu.sh, its own environment), and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
bash scripts/typecheck_gpu.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
