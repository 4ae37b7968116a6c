#!/usr/bin/env bash
# Download what bench/gpu_check.sh installs on a GPU machine that has no network: the pycuda sdist
# (pycuda is source-only on PyPI and compiles against the machine's CUDA toolkit), the wheels its
# isolated build needs (setuptools, wheel, numpy), its runtime requirements, pytest (to run
# tests/test_runtime_cuda.py there) and cuda-python for CUDA 12 and 13 (its major version must match the
# driver's; bench/gpu_check.sh picks the one that does). Everything is for CPython 3.12 on x86-64 Linux
# by default, whatever Python runs this; the folder stays under 60 MB.
#
#   bash scripts/download_gpu_wheels.sh DIR [--python-version 3.12] [--pycuda VERSION] [--cuda-python 12|13|both|none]
#
# Then copy DIR to the GPU machine and pass it as: bash bench/gpu_check.sh --python PY --out OUT --wheels DIR
set -euo pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

DIR=""
PY_VERSION=3.12
# 2025.1.2 is the first release that compiles against CUDA 13; it builds against CUDA 12 too.
PYCUDA_VERSION=2025.1.2
CUDA_PYTHON=both
LIMIT_MB=60
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) PY_VERSION=${2:?--python-version needs a value like 3.12}; shift 2 ;;
        --pycuda) PYCUDA_VERSION=${2:?--pycuda needs a version}; shift 2 ;;
        --cuda-python) CUDA_PYTHON=${2:?--cuda-python needs 12, 13, both or none}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1; expected --python-version, --pycuda, --cuda-python or --help" >&2
            exit 2 ;;
        *) if [ -n "$DIR" ]; then
               echo "error: two folders given ($DIR, $1); expected one DIR to download into" >&2; exit 2
           fi
           DIR=$1; shift ;;
    esac
done
if [ -z "$DIR" ]; then
    echo "error: no folder given; expected: bash scripts/download_gpu_wheels.sh DIR (see --help)" >&2
    exit 2
fi
case "$CUDA_PYTHON" in
    12) CUDA_MAJORS=(12) ;; 13) CUDA_MAJORS=(13) ;; both) CUDA_MAJORS=(12 13) ;; none) CUDA_MAJORS=() ;;
    *) echo "error: --cuda-python $CUDA_PYTHON; expected 12, 13, both or none" >&2; exit 2 ;;
esac
if ! [[ "$PY_VERSION" =~ ^3\.[0-9]+$ ]]; then
    echo "error: --python-version $PY_VERSION; expected MAJOR.MINOR such as 3.12" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "error: $PYTHON has no pip; set PYTHON to a Python with pip (any version: the downloads are for" \
         "$PY_VERSION)" >&2
    exit 2
fi
mkdir -p "$DIR"
abi="cp${PY_VERSION/./}"
# Binary wheels for the target interpreter and platform, not this one's.
TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "$abi" --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform linux_x86_64)
pip_download() {
    "$PYTHON" -m pip download --disable-pip-version-check -q -d "$DIR" "$@"
}

echo "pycuda $PYCUDA_VERSION sdist"
pip_download --no-deps --no-binary pycuda "pycuda==$PYCUDA_VERSION"
echo "its build requirements (setuptools, wheel, numpy) and runtime requirements (pytools, platformdirs, mako)"
pip_download "${TARGET[@]}" setuptools wheel "numpy>=1.24" "pytools>=2011.2" "platformdirs>=2.2.0" mako
echo "pytest, to run tests/test_runtime_cuda.py on the GPU machine"
pip_download "${TARGET[@]}" "pytest>=8"
for major in "${CUDA_MAJORS[@]}"; do
    echo "cuda-python $major.x (CUDA graphs; for a CUDA $major driver)"
    pip_download "${TARGET[@]}" "cuda-python>=$major,<$((major + 1))"
done

total=$(du -sb "$DIR" | cut -f1)
echo "downloaded into $DIR: $(find "$DIR" -maxdepth 1 -type f | wc -l) files, $((total / 1024 / 1024)) MB"
if [ "$total" -gt $((LIMIT_MB * 1024 * 1024)) ]; then
    echo "error: $DIR holds $((total / 1024 / 1024)) MB; expected under $LIMIT_MB MB; pass --cuda-python 12 or 13" \
         "(the driver's CUDA major) instead of both" >&2
    exit 1
fi
