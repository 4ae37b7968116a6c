"""The runtime installs without torch: the base install in a fresh venv runs an exported .onnx."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import venv

import numpy as np
import pytest

from runtime import Policy, load_backend
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    """A fresh venv with `pip install .` of the project: its base dependencies only."""
    root = tmp_path_factory.mktemp("runtime-venv")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    # A copy of the source tree: setuptools builds in place, and the checkout stays clean.
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__", "*.onnx", "*.plan"))
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(source)], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    return python


def test_base_install_runs_an_onnx_policy_without_torch(runtime_venv, engines, tmp_path):
    observation = np.linspace(-1.0, 1.0, 11)
    expected = {}
    for mode, path in engines.items():
        with load_backend(path) as backend:
            policy = Policy(backend)
            expected[mode] = [policy.act(observation, 1.0).tolist() for _ in range(5)]
    script = textwrap.dedent(f"""
        import importlib.util, json
        import numpy as np
        missing = [name for name in ("torch", "onnx", "gymnasium", "minari")
                   if importlib.util.find_spec(name) is not None]
        assert not missing, f"the base install pulled {{missing}}"
        import cli  # the CLI imports without the training stack
        from runtime import Policy, load_backend
        actions = {{}}
        for mode, path in {json.dumps({m: str(p) for m, p in engines.items()})}.items():
            with load_backend(path) as backend:
                policy = Policy(backend)
                actions[mode] = [policy.act(np.linspace(-1.0, 1.0, 11), 1.0).tolist() for _ in range(5)]
        print(json.dumps(actions))
    """)
    # Run outside the checkout, so that only the installed package can be imported.
    result = subprocess.run([str(runtime_venv), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-2000:]
    actions = json.loads(result.stdout.strip().splitlines()[-1])
    for mode in engines:
        np.testing.assert_allclose(actions[mode], expected[mode], atol=1e-6)
