#!/usr/bin/env bash
# Set up, then take the whole path on the embedded Hopper dataset (generated offline on first use, once: its
# 1M steps take about 100 s of CPU time, longer in wall time on a busy machine): train DMM, export the fp16
# graph and the C step, run each in the control loop and print a summary.
# Extra arguments go to 'cli.py tour', e.g. --steps 5000 for a first look in a few minutes.
# Run it again after a Ctrl-C: it continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python cli.py tour "$@"
