"""The fused CPU selective scan against the loop reference: values and gradients w.r.t.
every input, Mamba's delta_bias / softplus / z-gate options, long sequences, odd
sizes, strided inputs, thread counts, the build cache, and the whole model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contract.errors import DMMError
from dmm_train import fused_scan
from dmm_train.config import ModelConfig, get_preset
from dmm_train.model import DecisionMetaMamba
from dmm_train.scan import selective_scan, selective_scan_loop

REPO_ROOT = Path(__file__).resolve().parent.parent
# float32 tolerances, relative to the largest magnitude of the reference tensor: the
# kernel sums in another order, uses FMA and a polynomial exp (about 1 ulp).
VALUE_RTOL = 1e-5
GRAD_RTOL = 2e-5
MODEL_RTOL = 1e-5
INPUT_NAMES = ("x", "delta", "A_log", "Bm", "Cm", "Dskip")


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    assert fused_scan.is_available(), f"fused scan kernel unavailable: {fused_scan.UNAVAILABLE_REASON}"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = relative_error(got, want)
    print(f"{name}: max |difference| / max |reference| = {error:.2e} (tolerance {rtol:.0e})")
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert error <= rtol, f"{name}: relative error {error:.2e} > {rtol:.0e}"


def realistic_inputs(batch: int, length: int, channels: int, states: int, seed: int = 0) -> dict:
    """Magnitudes as in the model: delta = softplus of N(0, 1)-ish, A = -[1..N], Dskip near 1."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {
        "x": randn(batch, length, channels),  # (B, L, D)
        "delta": F.softplus(randn(batch, length, channels)),  # (B, L, D)
        "A_log": torch.log(torch.arange(1, states + 1, dtype=torch.float32)).repeat(channels, 1)
        + 0.1 * randn(channels, states),  # (D, N)
        "Bm": randn(batch, length, states),  # (B, L, N)
        "Cm": randn(batch, length, states),  # (B, L, N)
        "Dskip": 1.0 + 0.1 * randn(channels),  # (D,)
    }


def run_scan(scan, inputs: dict, grad_out: torch.Tensor | None):
    """y and the gradients w.r.t. every input (A through A = -exp(A_log), as in the model)."""
    leaves = {name: tensor.detach().requires_grad_() for name, tensor in inputs.items()}  # strides kept
    A = -torch.exp(leaves["A_log"])  # (D, N)
    y = scan(leaves["x"], leaves["delta"], A, leaves["Bm"], leaves["Cm"], leaves["Dskip"])  # (B, L, D)
    if grad_out is None:
        return y.detach(), {}
    y.backward(grad_out)
    return y.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def loop_scan(x, delta, A, Bm, Cm, Dskip):
    return selective_scan_loop(x, delta, A, Bm, Cm, Dskip)[0]


@pytest.mark.parametrize(
    "batch, length, channels, states",
    [(3, 24, 64, 16), (2, 300, 16, 16), (2, 7, 10, 4), (1, 1, 1, 1), (5, 24, 33, 16)],
    ids=["hopper-like", "long", "odd-sizes", "single", "remainder-channels"],
)
def test_values_and_gradients_match_loop(batch, length, channels, states):
    inputs = realistic_inputs(batch, length, channels, states)
    grad_out = torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(1))
    want_y, want_grads = run_scan(loop_scan, inputs, grad_out)
    got_y, got_grads = run_scan(fused_scan.fused_selective_scan, inputs, grad_out)
    assert_close("y", got_y, want_y, VALUE_RTOL)
    for name in INPUT_NAMES:
        assert_close(f"d{name}", got_grads[name], want_grads[name], GRAD_RTOL)


def test_values_match_loop_over_3000_tokens():
    inputs = realistic_inputs(2, 3000, 8, 16, seed=3)
    with torch.no_grad():
        want_y, _ = run_scan(loop_scan, inputs, None)
        got_y, _ = run_scan(fused_scan.fused_selective_scan, inputs, None)
    assert_close("y (L=3000)", got_y, want_y, VALUE_RTOL)


def test_extreme_steps_stay_finite_and_match():
    """delta from 0 to 40: decays from 1 down to exp(-640), far below float range."""
    inputs = realistic_inputs(2, 24, 16, 16, seed=4)
    inputs["delta"] = torch.linspace(0.0, 40.0, 2 * 24 * 16).reshape(2, 24, 16)
    grad_out = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(5))
    want_y, want_grads = run_scan(loop_scan, inputs, grad_out)
    got_y, got_grads = run_scan(fused_scan.fused_selective_scan, inputs, grad_out)
    assert_close("y", got_y, want_y, VALUE_RTOL)
    for name in INPUT_NAMES:
        assert_close(f"d{name}", got_grads[name], want_grads[name], GRAD_RTOL)


def test_mamba_options_match_torch_composition():
    """delta_bias, delta_softplus and the z gate inside the kernel == torch ops around the loop."""
    batch, length, channels, states = 3, 24, 32, 16
    generator = torch.Generator().manual_seed(6)
    inputs = realistic_inputs(batch, length, channels, states, seed=6)
    inputs["delta"] = torch.randn(batch, length, channels, generator=generator)  # pre-activation
    inputs["z"] = torch.randn(batch, length, channels, generator=generator)
    inputs["delta_bias"] = 0.5 * torch.randn(channels, generator=generator)
    grad_out = torch.randn(batch, length, channels, generator=generator)
    results = {}
    for impl in ("loop", "fused"):
        leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
        A = -torch.exp(leaves["A_log"])  # (D, N)
        out = selective_scan(
            leaves["x"], leaves["delta"], A, leaves["Bm"], leaves["Cm"], leaves["Dskip"], impl=impl,
            z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True,
        )  # (B, L, D)
        out.backward(grad_out)
        results[impl] = (out.detach(), {name: leaf.grad for name, leaf in leaves.items()})
    assert_close("out", results["fused"][0], results["loop"][0], VALUE_RTOL)
    for name in inputs:
        assert_close(f"d{name}", results["fused"][1][name], results["loop"][1][name], GRAD_RTOL)


def test_strided_inputs_give_the_same_result():
    batch, length, channels, states = 2, 24, 16, 8
    inputs = realistic_inputs(batch, length, channels, states, seed=7)
    contiguous_y, contiguous_grads = run_scan(fused_scan.fused_selective_scan, inputs, torch.ones(2, 24, 16))
    strided = {
        # every (B, L, .) input as a view into a wider or transposed buffer
        name: (torch.cat([tensor, torch.zeros_like(tensor)], dim=-1)[..., : tensor.shape[-1]]
               if tensor.dim() == 3 else tensor.t().contiguous().t())
        for name, tensor in inputs.items()
    }
    assert not strided["x"].is_contiguous() and not strided["Bm"].is_contiguous()
    strided_y, strided_grads = run_scan(fused_scan.fused_selective_scan, strided, torch.ones(2, 24, 16))
    assert torch.equal(strided_y, contiguous_y)
    for name in INPUT_NAMES:
        assert torch.equal(strided_grads[name], contiguous_grads[name]), name


def test_results_do_not_depend_on_the_thread_count():
    """Batch sums are added per fixed work item in item order: bitwise equal for any thread count."""
    inputs = realistic_inputs(19, 24, 16, 16, seed=8)
    grad_out = torch.randn(19, 24, 16, generator=torch.Generator().manual_seed(9))
    outcomes = []
    try:
        for threads in (1, 2, 3):
            fused_scan.set_num_threads(threads)
            outcomes.append(run_scan(fused_scan.fused_selective_scan, inputs, grad_out))
    finally:
        fused_scan.set_num_threads(None)
    for y, grads in outcomes[1:]:
        assert torch.equal(y, outcomes[0][0])
        for name in INPUT_NAMES:
            assert torch.equal(grads[name], outcomes[0][1][name]), name


def test_back_to_back_pooled_calls_of_changing_sizes_agree():
    """Stress for the kernel's thread pool: calls of different item counts in quick succession."""
    cases = [realistic_inputs(batch, 24, 16, 8, seed=batch) for batch in (64, 5, 33)]
    grads_out = [torch.ones(case["x"].shape) for case in cases]
    fused_scan.set_num_threads(1)
    try:
        scan = fused_scan.fused_selective_scan
        expected = [run_scan(scan, case, g) for case, g in zip(cases, grads_out, strict=True)]
        fused_scan.set_num_threads(3)
        for round_index in range(30):
            index = round_index % len(cases)
            y, grads = run_scan(fused_scan.fused_selective_scan, cases[index], grads_out[index])
            assert torch.equal(y, expected[index][0])
            for name in INPUT_NAMES:
                assert torch.equal(grads[name], expected[index][1][name]), (round_index, name)
    finally:
        fused_scan.set_num_threads(None)


def test_bad_inputs_are_refused_with_a_clear_message():
    inputs = realistic_inputs(2, 4, 8, 4)
    A = -torch.exp(inputs["A_log"])  # (D, N)
    with pytest.raises(DMMError, match=r"input Bm \(2, 4, 5\) .*; expected \(2, 4, 4\)"):
        fused_scan.fused_selective_scan(
            inputs["x"], inputs["delta"], A, torch.zeros(2, 4, 5), inputs["Cm"], inputs["Dskip"]
        )
    with pytest.raises(DMMError, match="torch.float32"):
        fused_scan.fused_selective_scan(inputs["x"].double(), inputs["delta"], A, inputs["Bm"], inputs["Cm"],
                                        inputs["Dskip"])
    with pytest.raises(DMMError, match="scan impl"):
        selective_scan(
            inputs["x"], inputs["delta"], A, inputs["Bm"], inputs["Cm"], inputs["Dskip"], impl="fast"
        )


def test_loading_the_kernel_keeps_denormals():
    """The library is not linked with -ffast-math, whose crtfastmath.o sets flush-to-zero process-wide."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dmm_model_fused_equals_loop(mode):
    """Whole model, hopper preset: outputs and every parameter gradient, fused vs loop scan
    (in train mode with the same dropout masks)."""
    torch.manual_seed(0)
    model = DecisionMetaMamba(ModelConfig.from_preset(get_preset("hopper"))).train(mode == "train")
    generator = torch.Generator().manual_seed(10)
    states = torch.randn(4, 8, 11, generator=generator)  # (B, T, S)
    actions = torch.rand(4, 8, 3, generator=generator) * 2 - 1  # (B, T, Adim)
    rtg = torch.rand(4, 8, 1, generator=generator) * 3.6  # (B, T, 1)
    grad_out = torch.randn(4, 8, 3, generator=generator)  # (B, T, Adim)
    results = {}
    for impl in ("loop", "fused"):
        model.zero_grad(set_to_none=True)
        model.set_scan_impl(impl)
        torch.manual_seed(11)  # the same dropout masks for both
        predicted = model(states, actions, rtg)  # (B, T, Adim)
        predicted.backward(grad_out)
        results[impl] = (predicted.detach(), {name: p.grad.clone() for name, p in model.named_parameters()})
    assert_close("predicted actions", results["fused"][0], results["loop"][0], MODEL_RTOL)
    for name, grad in results["loop"][1].items():
        assert_close(f"grad {name}", results["fused"][1][name], grad, MODEL_RTOL)


def _run_python(code: str, **environment) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, **environment},
        capture_output=True, text=True, timeout=300,
    )


def test_kernel_is_built_once_into_the_cache(tmp_path):
    code = "from dmm_train import fused_scan; assert fused_scan.is_available(), fused_scan.UNAVAILABLE_REASON"
    for _ in range(2):
        result = _run_python(code, DMM_CACHE_DIR=str(tmp_path))
        assert result.returncode == 0, result.stderr
    libraries = list(tmp_path.rglob(fused_scan.LIBRARY_NAME))
    assert len(libraries) == 1, libraries
    assert not list(tmp_path.rglob(".build-*")), "a temporary build folder was left behind"


def test_portable_baseline_build_matches_loop(tmp_path):
    """The SSE2 build (no -march level), as on a machine without AVX: same numbers."""
    code = (
        "import torch\n"
        "from dmm_train import fused_scan\n"
        "from dmm_train.scan import selective_scan_loop\n"
        "assert fused_scan.build_flags() == fused_scan.COMPILE_FLAGS\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, d = torch.randn(2, 30, 24, generator=g), torch.rand(2, 30, 24, generator=g) * 2\n"
        "A = -torch.arange(1, 17.0).repeat(24, 1); Bm, Cm = torch.randn(2, 2, 30, 16, generator=g)\n"
        "D = torch.ones(24)\n"
        "want = selective_scan_loop(x, d, A, Bm, Cm, D)[0]\n"
        "got = fused_scan.fused_selective_scan(x, d, A, Bm, Cm, D)\n"
        "error = ((got - want).abs().max() / want.abs().max()).item()\n"
        "print(f'baseline build: relative error {error:.2e}')\n"
        "assert error < 1e-5, error\n"
    )
    result = _run_python(code, DMM_CACHE_DIR=str(tmp_path), DMM_SCAN_ISA="baseline")
    print(result.stdout)
    assert result.returncode == 0, result.stderr


def test_missing_compiler_is_reported_and_auto_falls_back(tmp_path):
    code = (
        "import torch\n"
        "from dmm_train import fused_scan\n"
        "from contract.errors import DMMError\n"
        "from dmm_train.scan import selective_scan\n"
        "assert not fused_scan.is_available()\n"
        "assert 'no-such-compiler' in fused_scan.UNAVAILABLE_REASON, fused_scan.UNAVAILABLE_REASON\n"
        "x = torch.randn(1, 3, 4); A = -torch.ones(4, 2); B = torch.randn(1, 3, 2)\n"
        "y = selective_scan(x, x.abs(), A, B, B, torch.ones(4), impl='auto')\n"
        "assert y.shape == (1, 3, 4)\n"
        "try:\n"
        "    selective_scan(x, x.abs(), A, B, B, torch.ones(4), impl='fused')\n"
        "except DMMError as error:\n"
        "    assert 'unavailable' in str(error) and 'loop' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('impl=fused without a kernel did not raise')\n"
    )
    result = _run_python(code, DMM_CACHE_DIR=str(tmp_path), CC="/no-such-compiler")
    assert result.returncode == 0, result.stderr


class _WindowForward(torch.nn.Module):
    """The window contract as a plain module: (states, actions, rtg) -> action at the last state token."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, states, actions, rtg):
        return self.model(states, actions, rtg)[:, -1]  # (B, Adim)


@pytest.mark.skipif(not fused_scan.is_available(), reason=f"fused kernel unavailable: {fused_scan.UNAVAILABLE_REASON}")
def test_torch_onnx_export_of_the_default_scan_gives_the_right_graph(tmp_path):
    import numpy as np

    from runtime.ort_backend import cpu_session

    torch.manual_seed(0)
    model = DecisionMetaMamba(ModelConfig.from_preset(get_preset("hopper"))).eval()  # scan "auto": fused on CPU
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 8, 11, generator=generator), torch.tanh(torch.randn(2, 8, 3, generator=generator)),
              torch.rand(2, 8, 1, generator=generator) * 3.6)
    path = tmp_path / "traced.onnx"
    wrapper = _WindowForward(model).eval()  # export restores the wrapper's mode, recursively: keep it eval
    torch.onnx.export(wrapper, inputs, str(path), dynamo=False, opset_version=17,
                      input_names=["states", "actions", "rtg"], output_names=["action"])
    other = tuple(torch.randn_like(t, generator=generator) for t in inputs)  # inputs the trace never saw
    feeds = dict(zip(["states", "actions", "rtg"], (t.numpy() for t in other), strict=True))
    (onnx_action,) = cpu_session(path.read_bytes()).run(["action"], feeds)
    assert not model.training
    with torch.no_grad():
        expected = wrapper(*other).numpy()
    difference = float(np.abs(onnx_action - expected).max())
    assert difference < 1e-5, f"traced graph vs PyTorch max abs {difference:.2e}"


def test_fused_scan_refuses_to_be_traced():
    torch.manual_seed(0)
    model = DecisionMetaMamba(ModelConfig.from_preset(get_preset("hopper"))).eval()
    model.set_scan_impl("fused")
    inputs = (torch.zeros(1, 8, 11), torch.zeros(1, 8, 3), torch.zeros(1, 8, 1))
    with pytest.raises(DMMError, match="scan impl 'fused' while tracing"):
        torch.jit.trace(_WindowForward(model), inputs, check_trace=False)
