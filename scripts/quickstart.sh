#!/usr/bin/env bash
# Set up, then train DMM on the embedded Hopper dataset (generated offline on first use, once: its 1M
# steps take about 100 s of CPU time, longer in wall time on a busy machine).
# Extra arguments go to 'cli.py train', e.g. --steps 2000 --out runs/quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python cli.py train "$@"
