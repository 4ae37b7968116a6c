#!/usr/bin/env bash
# What runs on a machine with an NVIDIA GPU but no TensorRT and no network, in one command, under 540 s:
#
#   bash bench/gpu_check.sh --python PY --out DIR [--wheels DIR] [--dry-run]
#
#   --python PY   the Python to run with: PyTorch (a CUDA build for the GPU figures) and numpy are all it needs
#   --out DIR     where everything goes: summary.json and summary.md (BENCHMARKS.md's form), one record per
#                 step under steps/, the logs under logs/, what the installs put under site/
#   --wheels DIR  scripts/download_gpu_wheels.sh's folder: pycuda's sdist and build requirements, pytest,
#                 cuda-python; installed offline into DIR's site/ (PY's own environment is left as it is)
#   --dry-run     check the script end to end on any machine: without a GPU every GPU step says "no GPU" and
#                 the run still ends 0; with one, every step runs at its smallest size
#
# The steps, each under its own time budget, each one run whatever happened to the others; the untested GPU
# code first, then the measurements:
#   env          nvidia-smi, the CUDA driver (libcuda), torch and its CUDA, nvcc
#   wheels       the wheel folder holds what the offline installs need
#   pycuda       built offline from its sdist against nvcc's toolkit (CUDA_ROOT from nvcc, curand off)
#   cuda-python  the release whose major version matches the driver's CUDA (CUDA graphs)
#   cuda-tests   tests/test_runtime_cuda.py: pycuda against the real driver (buffers, contexts on other threads)
#                and CUDA-graph capture and replay on a pycuda stream, the failed-capture fallback included
#   doctor       cli.py doctor's environment record
#   training     ms per training step with --device cuda against the CPU, DMM and the baselines
#   latency      the PyTorch backend's GPU latency without and with CUDA graphs, against the CPU
# Exit 0 when no step failed (in a dry run "no GPU" is not a failure), 1 when one did, 2 for a usage error.
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL_BUDGET=540
RESERVE=15 # kept for the summary at the end
# Step budgets (s); they add up to 525, and a step never gets more than what is left of TOTAL_BUDGET.
declare -A BUDGET=([env]=20 [wheels]=10 [pycuda]=200 [cuda-python]=30 [cuda-tests]=75 [doctor]=30 [training]=105
                   [latency]=55)
ORDER=(env wheels pycuda cuda-python cuda-tests doctor training latency)

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}
fail_usage() {
    echo "error: $1; usage: bash bench/gpu_check.sh --python PY --out DIR [--wheels DIR] [--dry-run] (see --help)" >&2
    exit 2
}

PYTHON="" OUT="" WHEELS="" DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) [ $# -ge 2 ] || fail_usage "--python needs a Python"; PYTHON=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || fail_usage "--out needs a folder"; OUT=$2; shift 2 ;;
        --wheels) [ $# -ge 2 ] || fail_usage "--wheels needs a folder"; WHEELS=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail_usage "unknown argument $1" ;;
    esac
done
[ -n "$PYTHON" ] || fail_usage "no --python given"
[ -n "$OUT" ] || fail_usage "no --out given"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    fail_usage "--python $PYTHON is not an executable"
fi
PYTHON=$(command -v "$PYTHON")
if ! "$PYTHON" -c "import numpy" >/dev/null 2>&1; then
    fail_usage "--python $PYTHON cannot import numpy; expected the Python with PyTorch and numpy"
fi
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || fail_usage "--wheels $WHEELS is not a folder"
    WHEELS=$(cd "$WHEELS" && pwd)
fi
mkdir -p "$OUT" || fail_usage "cannot create --out $OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/steps" "$OUT/logs" "$OUT/site" # a record left from an earlier run must not be reported as this one's
mkdir -p "$OUT/steps" "$OUT/logs" "$OUT/site"
COMMAND="bash bench/gpu_check.sh --python $PYTHON --out $OUT${WHEELS:+ --wheels $WHEELS}$([ $DRY_RUN = 1 ] && echo ' --dry-run')"
# What the installs put under site/ is seen by every later step (and by nothing outside this run).
export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
STARTED=$(date +%s)
HAVE_GPU=0

left() { echo $((TOTAL_BUDGET - RESERVE - ($(date +%s) - STARTED))); }
budget_of() { # the step's budget, cut to what is left
    local want=${BUDGET[$1]} rest
    rest=$(left)
    [ "$rest" -lt "$want" ] && want=$rest
    [ "$want" -lt 1 ] && want=1
    echo "$want"
}
record() { # record STEP STATUS DETAIL SECONDS BUDGET [LOG]
    "$PYTHON" bench/gpu_check.py record --out "$OUT" --step "$1" --status "$2" --detail "$3" --seconds "$4" \
        --budget "$5" ${6:+--log "$6"} >/dev/null 2>>"$OUT/logs/record.log" \
        || echo "gpu_check: could not write the record of step $1 (logs/record.log)" >&2
    printf '%-12s %-9s %s\n' "$1" "$2" "$3"
}
last_line() { # the last non-empty line of a log, trimmed
    grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -1 | cut -c1-300
}
# A Python step of bench/gpu_check.py: its own record on success / "no GPU" / a failure it reported; the
# shell's record when it timed out or died without one.
python_step() { # python_step NAME ARGS...
    local name=$1 budget started rc seconds log
    shift
    budget=$(budget_of "$name")
    log="$OUT/logs/$name.log"
    started=$(date +%s)
    rm -f "$OUT/steps/$name.json"
    timeout --kill-after=5 "$budget" "$PYTHON" bench/gpu_check.py "$name" --out "$OUT" "$@" >"$log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - started))
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        record "$name" "timed out" "did not finish in its $budget s budget (logs/$name.log)" "$seconds" "$budget" "$log"
    elif [ -f "$OUT/steps/$name.json" ]; then # its own record: add the time and the log
        local status detail
        status=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' "$OUT/steps/$name.json")
        detail=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["detail"])' "$OUT/steps/$name.json")
        "$PYTHON" - "$OUT/steps/$name.json" "$seconds" "$budget" "$log" <<'PY' 2>>"$OUT/logs/record.log"
import json, sys
sys.path.insert(0, ".")
from contract.files import atomic_write_json
path, seconds, budget, log = sys.argv[1:]
record = json.load(open(path))
record.update(seconds=float(seconds), budget_s=int(budget), log=log)
atomic_write_json(record, path)
PY
        printf '%-12s %-9s %s\n' "$name" "$status" "$detail"
    else
        record "$name" failed "exit $rc: $(last_line "$log") (logs/$name.log)" "$seconds" "$budget" "$log"
    fi
    return 0
}
skip() { # skip STEP STATUS DETAIL
    record "$1" "$2" "$3" 0 "${BUDGET[$1]}"
}

# 1. env: decides whether the GPU steps run.
python_step env
if "$PYTHON" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["has_gpu"] else 1)' \
        "$OUT/machine.json" 2>/dev/null; then
    HAVE_GPU=1
fi
NO_GPU_WHY=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["detail"])' "$OUT/steps/env.json" \
    2>/dev/null || echo "no GPU")
if [ $HAVE_GPU = 0 ] && [ $DRY_RUN = 0 ]; then
    echo "error: bench/gpu_check.sh needs an NVIDIA GPU that torch sees ($NO_GPU_WHY); run it on the GPU machine," \
         "or pass --dry-run to check the script here" >&2
    exit 2
fi
NVCC=$(command -v nvcc || true)

# 2. wheels
if [ -z "$WHEELS" ]; then
    skip wheels skipped "no --wheels folder: pycuda and cuda-python cannot be installed offline (make one with scripts/download_gpu_wheels.sh)"
else
    python_step wheels --dir "$WHEELS"
fi
WHEELS_OK=0
[ -n "$WHEELS" ] && grep -q '"status": "ok"' "$OUT/steps/wheels.json" 2>/dev/null && WHEELS_OK=1

# 3. pycuda, built offline from its sdist against this machine's toolkit.
pycuda_step() {
    local budget started log src rc seconds cause
    budget=$(budget_of pycuda)
    log="$OUT/logs/pycuda.log"
    started=$(date +%s)
    src=$(mktemp -d)
    # siteconf.py beside setup.py is what pycuda's configuration reads: the toolkit nvcc belongs to, and
    # curand off (its library is often absent from a minimal toolkit, and nothing here uses it).
    if ! tar xzf "$(ls "$WHEELS"/pycuda-*.tar.gz | tail -1)" -C "$src" >"$log" 2>&1; then
        record pycuda failed "the pycuda sdist in $WHEELS does not unpack (logs/pycuda.log)" 0 "$budget" "$log"
        rm -rf "$src"; return
    fi
    local tree
    tree=$(ls -d "$src"/pycuda-*/)
    printf 'CUDA_ROOT = %s\nCUDA_ENABLE_CURAND = False\n' "'$CUDA_ROOT'" > "$tree/siteconf.py"
    timeout --kill-after=5 "$budget" "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --target "$OUT/site" \
        "$tree" >>"$log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - started))
    rm -rf "$src"
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        record pycuda "timed out" "the build did not finish in its $budget s budget (logs/pycuda.log)" "$seconds" \
            "$budget" "$log"
        return
    fi
    if [ $rc != 0 ]; then
        # Name the cause the log shows; "did not build against the toolkit" only when it is that.
        if grep -q "No matching distribution found" "$log"; then
            cause="the wheel folder lacks $(grep -o 'No matching distribution found for [^ ]*' "$log" | head -1 | sed 's/.* for //'); re-run scripts/download_gpu_wheels.sh"
        elif grep -q "cuda.h: No such file" "$log"; then
            cause="cuda.h is not under $CUDA_ROOT/include: the toolkit beside nvcc has no headers"
        elif grep -qE "cannot find -l(cuda|curand)" "$log"; then
            cause="the linker $(grep -oE 'cannot find -l[a-z]+' "$log" | head -1) under $CUDA_ROOT (lib64, lib64/stubs)"
        elif grep -qE "error: command .*(g\+\+|gcc|c\+\+).* failed|unable to execute" "$log"; then
            cause="the C++ compile failed against $TOOLKIT: $(grep -m1 -E 'error' "$log" | cut -c1-200)"
        else
            cause="pip exit $rc: $(last_line "$log")"
        fi
        record pycuda failed "$cause (logs/pycuda.log)" "$seconds" "$budget" "$log"
        return
    fi
    local answer
    if answer=$("$PYTHON" -c 'from runtime.cuda_support import distribution_version, import_pycuda
cuda = import_pycuda()
version = distribution_version("pycuda")
print(f"pycuda {version}, built for CUDA {cuda.get_version()}, driver {cuda.get_driver_version()}, "
      f"{cuda.Device.count()} device(s)")' 2>>"$log"); then
        record pycuda ok "built in $seconds s against $TOOLKIT; $answer" "$seconds" "$budget" "$log"
    else
        record pycuda failed "built in $seconds s but does not work: $(last_line "$log")" "$seconds" "$budget" "$log"
    fi
}
TOOLKIT=$([ -n "$NVCC" ] && "$NVCC" --version | tail -1)
CUDA_ROOT=$([ -n "$NVCC" ] && cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)
if [ $HAVE_GPU = 0 ]; then
    skip pycuda "no GPU" "$NO_GPU_WHY: pycuda not built"
elif [ $WHEELS_OK = 0 ]; then
    skip pycuda skipped "no usable --wheels folder: pycuda is source-only and there is no network"
elif [ -z "$NVCC" ]; then
    skip pycuda failed "nvcc is not on PATH: pycuda compiles against the CUDA toolkit; put its bin/ on PATH"
else
    pycuda_step
fi

# 4. cuda-python, the major version of the driver's CUDA.
DRIVER_MAJOR=$("$PYTHON" -c 'import json,sys; v=json.load(open(sys.argv[1]))["driver_cuda"]; print(v.split(".")[0] if v else "")' \
    "$OUT/machine.json" 2>/dev/null)
if [ $HAVE_GPU = 0 ]; then
    skip cuda-python "no GPU" "$NO_GPU_WHY: cuda-python not installed"
elif [ $WHEELS_OK = 0 ]; then
    skip cuda-python skipped "no usable --wheels folder"
else
    budget=$(budget_of cuda-python)
    started=$(date +%s)
    log="$OUT/logs/cuda-python.log"
    timeout --kill-after=5 "$budget" "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --target "$OUT/site" \
        --upgrade "cuda-python>=$DRIVER_MAJOR,<$((DRIVER_MAJOR + 1))" >"$log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - started))
    if [ $rc = 0 ]; then
        record cuda-python ok "cuda-python $DRIVER_MAJOR.x for the CUDA $DRIVER_MAJOR driver" "$seconds" "$budget" "$log"
    else
        record cuda-python failed "no cuda-python $DRIVER_MAJOR.x installed from the wheel folder: $(last_line "$log")" \
            "$seconds" "$budget" "$log"
    fi
fi

# 5. tests/test_runtime_cuda.py: the GPU tests skip (with their reason) where pycuda or the driver is missing.
cuda_tests() {
    local budget started log rc seconds line status
    budget=$(budget_of cuda-tests)
    log="$OUT/logs/cuda-tests.log"
    started=$(date +%s)
    if ! "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
        if [ $WHEELS_OK = 1 ]; then
            "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --target "$OUT/site" pytest >"$log" 2>&1
        fi
        if ! "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
            record cuda-tests skipped "pytest is not installed in $PYTHON and no wheel folder supplies it" 0 "$budget"
            return
        fi
    fi
    # --noconftest: the suite's fixtures need the training stack; this file needs none of them.
    timeout --kill-after=5 "$budget" "$PYTHON" -m pytest -q -rs -p no:cacheprovider --noconftest \
        tests/test_runtime_cuda.py >>"$log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - started))
    line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        status="timed out"; line="did not finish in its $budget s budget"
    elif [ $rc != 0 ]; then
        status=failed
    elif [ $HAVE_GPU = 0 ]; then
        status="no GPU"; line="$NO_GPU_WHY: the GPU tests skipped; ${line:-no summary}"
    else
        status=ok
    fi
    record cuda-tests "$status" "${line:-pytest exit $rc} (logs/cuda-tests.log)" "$seconds" "$budget" "$log"
}
cuda_tests

# 6. doctor
if [ $HAVE_GPU = 1 ]; then python_step doctor --expect-gpu; else python_step doctor; fi

# 7, 8: the measurements (a dry run: their smallest sizes).
if [ $DRY_RUN = 1 ]; then
    python_step training --steps 5 --cpu-steps 3
    python_step latency --steps 50
else
    python_step training --steps 100 --cpu-steps 10
    python_step latency --steps 1000
fi

ELAPSED=$(($(date +%s) - STARTED))
"$PYTHON" bench/gpu_check.py summary --out "$OUT" --seconds "$ELAPSED" --budget "$TOTAL_BUDGET" \
    --run-command "$COMMAND" --order "$(IFS=,; echo "${ORDER[*]}")" $([ $DRY_RUN = 1 ] && echo --dry-run) \
    >"$OUT/logs/summary.log" 2>&1
status=$?
if [ ! -f "$OUT/summary.json" ]; then
    echo "error: the summary was not written ($(last_line "$OUT/logs/summary.log")); the step records are in" \
         "$OUT/steps" >&2
    exit 1
fi
echo "gpu_check: $ELAPSED s; summary in $OUT/summary.md and $OUT/summary.json"
# In a dry run without a GPU, "no GPU" steps are expected; only failures and timeouts count (the summary's exit).
exit $status
