#!/usr/bin/env bash
# What runs on a machine with an NVIDIA GPU but no TensorRT, in one command (about 5 minutes, under 8):
#   1. training speed with 'train --device cuda' for DMM and the baselines, against the CPU;
#   2. the PyTorch backend's step latency on the GPU without and with CUDA-graph replay, against the CPU
#      (bench/gpu_check.py does 1 and 2);
#   3. pycuda built from source against this machine's CUDA toolkit (it is source-only on PyPI), then the
#      runtime's buffer code on the GPU with it (tests/test_runtime_cuda.py: double-buffered caches,
#      stream-ordered zeroing, the context made current on another thread; no TensorRT needed).
# The figures are written in BENCHMARKS.md's form to OUT (default runs/gpu_check.md).
#
#   PYTHON=/path/to/venv/bin/python bash bench/gpu_check.sh [OUT.md]
#
# PYTHON: an environment with the project and a CUDA build of torch (PyPI's Linux torch wheel is one; the
# CPU build scripts/setup.sh installs is not). Step 3 installs pycuda into that environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/gpu_check.md}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: bench/gpu_check.sh needs an NVIDIA GPU with its driver, and nvidia-smi lists none here; run it" \
         "on the GPU machine" >&2
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    found=$("$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1 \
        | tail -1 || true)
    echo "error: $PYTHON has no torch that sees the GPU ($found); install a CUDA build of torch there (PyPI's" \
         "Linux wheel) and pass it as PYTHON=" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p "$(dirname "$OUT")"

# 1 and 2: training speed and the PyTorch backend's latency.
HF_HUB_OFFLINE=1 timeout 330 "$PYTHON" bench/gpu_check.py --out "$OUT"

# 3: pycuda from source, then the runtime's buffer code on the GPU.
{
    echo
    echo "pycuda built from source here, running the runtime's buffer code (\`tests/test_runtime_cuda.py\`):"
    echo
} >> "$OUT"
if ! command -v nvcc >/dev/null 2>&1; then
    echo "- not built: nvcc (the CUDA toolkit) is not on PATH; pycuda compiles against it" | tee -a "$OUT"
    exit 0
fi
toolkit=$(nvcc --version | tail -1)
started=$(date +%s)
mkdir -p runs
if ! timeout 300 "$PYTHON" -m pip install -q --no-binary pycuda pycuda > runs/gpu_check_pycuda_build.log 2>&1; then
    echo "- pycuda did not build against $toolkit (runs/gpu_check_pycuda_build.log)" | tee -a "$OUT"
    exit 1
fi
built=$(( $(date +%s) - started ))
version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('pycuda'))")
set +e
HF_HUB_OFFLINE=1 timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_runtime_cuda.py \
    > runs/gpu_check_pycuda_tests.log 2>&1
status=$?
set -e
summary=$(tail -1 runs/gpu_check_pycuda_tests.log)
echo "- pycuda $version built in ${built} s against $toolkit; tests/test_runtime_cuda.py: $summary" | tee -a "$OUT"
exit $status
