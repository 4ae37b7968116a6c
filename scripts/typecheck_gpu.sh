#!/usr/bin/env bash
# Static check of the GPU layer: the TensorRT, pycuda and cuda-python code type-checked by basedpyright
# against NVIDIA TensorRT's type stubs (the tensorrt-stubs package), with no GPU and no TensorRT.
#
# What it catches: a TensorRT API that is removed, renamed or misspelled (execute_async_v2,
# get_binding_shape, a BuilderFlag that does not exist), wrong argument types and counts, a method
# called on the wrong object, and Optional results used unchecked in the project's own code.
# What it cannot cover:
# - only the TensorRT releases the stubs describe (10.8 - 10.13): not JetPack 6's 10.3 (an API added
#   after 10.3 would pass here and fail there) and not 11.x (an API 11.x removed, such as
#   BuilderFlag.FP16, still passes; the code looks those up with hasattr, docs/deployment.md);
# - pycuda (source-only, no type information) and cuda-python (compiled bindings without stubs):
#   their imports resolve to unknown types and calls on them are not checked;
# - anything that happens at run time (a plan that fails to build, wrong numbers).
#
# It needs its own environment (.venv-lint): tensorrt-stubs pins the TensorRT bindings it describes,
# so it is installed with --no-deps, and never beside a real TensorRT. A probe file with the two
# removed 8.x calls must be flagged, which proves the stubs are in use and not silently missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LINT_ENV=.venv-lint
REQUIREMENTS="basedpyright>=1.20,<2 numpy>=1.26 pytest>=8"
STUBS="tensorrt-stubs>=10.8,<10.14"
STAMP="$LINT_ENV/.installed $REQUIREMENTS $STUBS"
if [ ! -x "$LINT_ENV/bin/python" ]; then
    "$PYTHON" -m venv "$LINT_ENV"
fi
if [ ! -f "$LINT_ENV/.installed" ] || [ "$(cat "$LINT_ENV/.installed")" != "$STAMP" ]; then
    # shellcheck disable=SC2086  # the requirement lists are word-split on purpose
    "$LINT_ENV/bin/python" -m pip install -q $REQUIREMENTS
    "$LINT_ENV/bin/python" -m pip install -q --no-deps "$STUBS"
    echo "$STAMP" > "$LINT_ENV/.installed"
fi

"$LINT_ENV/bin/basedpyright" -p scripts/typecheck_gpu.json --pythonpath "$LINT_ENV/bin/python"

probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
cat > "$probe_dir/probe_removed_api.py" <<'PROBE'
import tensorrt as trt


def removed_in_10(engine: trt.ICudaEngine, context: trt.IExecutionContext) -> None:
    engine.get_binding_shape(0)
    context.execute_async_v2([], 0)
PROBE
set +e
probe=$(cd "$probe_dir" && "$OLDPWD/$LINT_ENV/bin/basedpyright" --pythonpath "$OLDPWD/$LINT_ENV/bin/python" \
    probe_removed_api.py 2>&1)
set -e
if ! grep -q '"get_binding_shape"' <<<"$probe" || ! grep -q '"execute_async_v2"' <<<"$probe"; then
    echo "typecheck_gpu: the probe's removed TensorRT calls were not flagged: the TensorRT stubs are not in use" >&2
    echo "$probe" >&2
    exit 1
fi
echo "typecheck_gpu: the GPU layer type-checks against tensorrt-stubs $("$LINT_ENV/bin/python" -c \
    'import importlib.metadata as m; print(m.version("tensorrt-stubs"))'); the probe's removed calls are flagged"
