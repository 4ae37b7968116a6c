#!/usr/bin/env bash
# Set up, then train DMM on the embedded Hopper dataset (generated offline on first use: its 1M steps
# take about 2.5 minutes on a 2-core CPU, once).
# Extra arguments go to 'cli.py train', e.g. --steps 2000 --out runs/quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python cli.py train "$@"
