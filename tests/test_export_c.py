"""The C target: 'cli.py export --target c' (NAME.c + NAME.h + NAME.json), its numerics, and the example C
program (examples/c_loop), all on the real compiler, real MuJoCo and real ONNX Runtime.

Parity is held to the PyTorch reference within 1e-5 over a whole teacher-forced 1000-step Hopper-v5
episode, and the closed-loop return to the ONNX stream graph's for the same seeds. The native backend
that loads the C file is tests/test_runtime_native.py's.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from contract.manifest import manifest_path_for, read_manifest
from contract.tolerances import max_abs
from dmm_train.checkpoint import load_checkpoint, save_model
from export.c_source import c_identifier
from export.parity import ParityConfig, run_parity
from runtime import Policy, load_backend
from runtime.loop import run_episode
from runtime.native_backend import BASE_FLAGS, compile_flags
from runtime.plant import make_plant
from runtime.recording import record_trajectory
from tests.helpers import REPO_ROOT, assert_one_line_error, c_compiler, write_checkpoint

EXAMPLE = REPO_ROOT / "examples" / "c_loop" / "hopper_loop.c"
FP32_TOLERANCE = max_abs("c-vs-torch")  # docs/design.md#tolerances
EPISODE_STEPS = 1000

@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- the export -------------------------------------------------------------------------

def test_export_writes_c99_source_header_and_manifest(c_export, checkpoint_path, tmp_path):
    manifest = read_manifest(manifest_path_for(c_export))
    assert (manifest.mode, manifest.precision, manifest.batch, manifest.engine["target"]) == ("stream", "fp32", 1, "c")
    for path, key in ((c_export, "source_sha256"), (c_export.with_suffix(".h"), "header_sha256")):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.engine[key]
    assert manifest.engine["symbol_prefix"] == "hopper"
    checkpoint = load_checkpoint(checkpoint_path)
    assert manifest.checkpoint_sha256 == hashlib.sha256(Path(checkpoint.path).read_bytes()).hexdigest()
    assert tuple(manifest.state_mean) == tuple(float(v) for v in checkpoint.state_mean)
    assert 0 < manifest.parity["max_abs"] < FP32_TOLERANCE
    source = c_export.read_text()
    assert "immintrin" not in source and "__m256" not in source  # no x86 intrinsics
    # Plain C99 with libm: strict ISO mode, every warning an error.
    obj = tmp_path / "hopper.o"
    result = subprocess.run([c_compiler(), "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2", "-c",
                             str(c_export), "-o", str(obj)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    if shutil.which("nm") and shutil.which("size"):
        # No heap, no writable file-scope data: only libc's memcpy/memset and libm are called.
        undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout.split()
        assert set(undefined) - {"U"} <= {"memcpy", "memset", "sqrtf", "tanhf"}, undefined
        sections = dict(line.split()[:2] for line in subprocess.run(
            ["size", "-A", str(obj)], capture_output=True, text=True, check=True).stdout.splitlines()[2:]
            if len(line.split()) >= 2 and line.split()[1].isdigit())
        assert int(sections.get(".data", 0)) == 0 and int(sections.get(".bss", 0)) == 0, sections

def test_weights_in_the_source_are_the_checkpoints_bits(c_export, checkpoint_path):
    """The hexadecimal float literals read back to exactly the parameters (here: the DSM of layer 0)."""
    model = load_checkpoint(checkpoint_path).model
    source = c_export.read_text()
    body = source.split("static const float dsm_0_lin_weight_T[", 1)[1].split("{", 1)[1].split("}", 1)[0]
    values = np.asarray([float.fromhex(v.strip().rstrip("f")) for v in body.split(",")], dtype=np.float32)
    np.testing.assert_array_equal(values, model.dsm[0].lin.weight.detach().numpy().T.ravel())

def test_api_prefix_is_a_c_identifier():
    assert c_identifier("hopper") == "hopper"
    assert c_identifier("hopper-stream.v2") == "hopper_stream_v2"
    assert c_identifier("2hop") == "policy_2hop"


def test_cli_export_is_deterministic(c_export, checkpoint_path, tmp_path, capsys):
    """'cli.py export --target c' writes the same bytes as the fixture's export of the same checkpoint."""
    out = tmp_path / "hopper-c"
    assert cli.main(["export", "--checkpoint", str(checkpoint_path), "--target", "c", "--out", str(out)]) == 0
    assert "API prefix hopper_" in capsys.readouterr().out
    for suffix in (".c", ".h"):
        assert out.with_suffix(suffix).read_bytes() == c_export.with_suffix(suffix).read_bytes()


# -- parity -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parity_report(checkpoint_path, c_export, engines):
    return run_parity(ParityConfig(checkpoint_path, (engines["stream"], c_export), steps=EPISODE_STEPS))

def test_native_equals_torch_teacher_forced_over_a_whole_episode(parity_report):
    trajectory = parity_report.trajectory
    assert (trajectory.steps, trajectory.episodes) == (EPISODE_STEPS, 1)
    print(parity_report.table())
    labels = [pair.candidate.split(" (")[0] for pair in parity_report.pairs]
    assert labels == ["ort/stream hopper-stream.onnx", "native/stream hopper-c.c"]  # told apart by file
    native = parity_report.pairs[1]
    assert native.reference == "torch/stream"
    assert [b.label for b in native.bins] == ["1", "2-10", "11-100", "101-1000"]
    assert native.max_abs < FP32_TOLERANCE and all(b.max_abs < FP32_TOLERANCE for b in native.bins)
    both = np.abs(parity_report.actions["native/stream hopper-c.c"]
                  - parity_report.actions["ort/stream hopper-stream.onnx"]).max()
    assert both < 2 * FP32_TOLERANCE

def test_closed_loop_return_equals_the_onnx_stream_graph(c_export, engines):
    plant = make_plant("Hopper-v5")
    results = {}
    try:
        with load_backend(engines["stream"]) as ort, load_backend(c_export) as native:
            for backend in (ort, native):
                policy = Policy(backend)
                results[backend.name] = [run_episode(policy, plant, seed=seed) for seed in (0, 1, 2)]
    finally:
        plant.close()
    for ort_episode, native_episode in zip(results["ort"], results["native"], strict=True):
        assert native_episode.length == ort_episode.length
        assert native_episode.episode_return == pytest.approx(ort_episode.episode_return, rel=1e-6)

def spread_checkpoint(directory: Path) -> Path:
    """The fixture checkpoint with trained-looking spreads: stack weights x5, dt biases in [-4, 2], A_log
    moved off its init, so that delta, exp(delta A) and the state cover a wide range."""
    path = write_checkpoint(directory, seed=7)
    loaded = load_checkpoint(path)
    model = loaded.model
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in model.ssm:
            for linear in (block.in_proj, block.x_proj, block.dt_proj, block.out_proj):
                linear.weight.mul_(5.0)
            block.dt_proj.bias.copy_(torch.rand(block.dt_proj.bias.shape, generator=generator) * 6 - 4)
            block.A_log.add_(torch.randn(block.A_log.shape, generator=generator) * 0.5)
        for mixer in model.dsm:
            mixer.lin.weight.mul_(5.0)
    return save_model(directory, model, loaded.metadata)

def test_export_parity_with_wide_activations(tmp_path):
    c_compiler()
    checkpoint = spread_checkpoint(tmp_path / "run")
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--target", "c", "--out", str(tmp_path / "wide")]) == 0
    parity = read_manifest(tmp_path / "wide.json").parity
    print(parity)
    assert parity["max_abs"] < FP32_TOLERANCE


# -- the elementary functions ----------------------------------------------------------

ELEMENTARY_CHECK = r"""
#include "@NAME@.c"
#include <stdio.h>
/* The inlined elementary functions against libm in double, over a sweep and the special values. */
static double ulp(float x) { return (double)nextafterf(fabsf(x), HUGE_VALF) - fabsf(x); }
int main(void) {
    int bad = 0;
    double worst_exp = 0, worst_softplus = 0, worst_scan = 0;
    for (double v = -110.0; v <= 92.0; v += 0.001953125) {
        float x = (float)v;
        double want = exp((double)x);
        float got = exp_f(x);
        if (want < 1.1754943508222875e-38) continue; /* subnormal results: checked separately below */
        if (want > 3.4028234663852886e38) { bad |= got != HUGE_VALF; continue; }
        double e = fabs(got - want) / ulp((float)want);
        if (e > worst_exp) worst_exp = e;
        if (x <= 0.0f && x >= EXP_MIN) {
            double s = fabs(exp_nonpositive(x) - want) / ulp((float)want);
            if (s > worst_scan) worst_scan = s;
        }
    }
    for (double v = -30.0; v <= 30.0; v += 0.0009765625) {
        float x = (float)v;
        double want = x > 20.0f ? x : log1p(exp((double)x));
        double e = fabs(softplus_f(x) - want) / ulp((float)want);
        if (e > worst_softplus) worst_softplus = e;
    }
    bad |= !isnan(exp_f(NAN)) || exp_f(HUGE_VALF) != HUGE_VALF || exp_f(-HUGE_VALF) != 0.0f;
    bad |= exp_f(89.0f) != HUGE_VALF || exp_f(-104.0f) != 0.0f || exp_f(0.0f) != 1.0f;
    bad |= !(exp_f(-100.0f) > 0.0f && exp_f(-100.0f) < 1e-43f); /* subnormal, not flushed */
    bad |= !isnan(softplus_f(NAN)) || softplus_f(HUGE_VALF) != HUGE_VALF || softplus_f(-HUGE_VALF) != 0.0f;
    bad |= exp_nonpositive(-HUGE_VALF) != 0.0f || exp_nonpositive(-90.0f) != 0.0f;
    bad |= !isnan(silu_f(NAN)) || silu_f(HUGE_VALF) != HUGE_VALF || silu_f(-200.0f) != -0.0f;
    printf("%g %g %g %d\n", worst_exp, worst_scan, worst_softplus, bad);
    return 0;
}
"""

def test_elementary_functions_are_accurate_and_keep_nan_and_inf(c_export, tmp_path):
    """exp, the scan's exp and softplus within a few ulp of libm in double; NaN and inf as libm has them."""
    check = tmp_path / "check.c"
    check.write_text(ELEMENTARY_CHECK.replace("@NAME@", c_export.stem))
    binary = tmp_path / "check"
    flags = [flag for flag in compile_flags() if flag != "-fPIC"]
    result = subprocess.run([c_compiler(), *flags, f"-I{c_export.parent}", str(check), "-o", str(binary), "-lm"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    worst_exp, worst_scan, worst_softplus, bad = subprocess.run(
        [str(binary)], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    print(f"max error in ulp: exp {worst_exp}, scan exp {worst_scan}, softplus {worst_softplus}")
    assert int(bad) == 0
    assert float(worst_exp) <= 2 and float(worst_scan) <= 2 and float(worst_softplus) <= 4


# -- the example C program -------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded_steps(c_export, tmp_path_factory):
    """Two-plus real Hopper-v5 episodes of the Python runtime's Policy on the C backend, as the example
    program's input file (start, reward, observation per line), with the actions the Policy returned."""
    plant = make_plant("Hopper-v5")
    try:
        with load_backend(c_export) as backend:
            trajectory = record_trajectory(Policy(backend), plant, steps=60, seed=11)
    finally:
        plant.close()
    assert trajectory.episodes >= 2  # the untrained policy falls: resets inside the file
    lines = []
    for t in range(trajectory.steps):
        reward = 0.0 if trajectory.starts[t] else trajectory.rewards[t - 1]
        observation = (repr(float(o)) for o in trajectory.observations[t])
        lines.append(" ".join([str(int(trajectory.starts[t])), repr(float(reward)), *observation]))
    steps_file = tmp_path_factory.mktemp("example") / "steps.txt"
    steps_file.write_text("\n".join(lines) + "\n")
    return steps_file, trajectory.actions

def run_example(command: list[str], steps_file: Path, expected: np.ndarray, label: str) -> None:
    actions_file = steps_file.with_name(f"actions-{label}.txt")
    run = subprocess.run([*command, str(steps_file), str(actions_file)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    actions = np.loadtxt(actions_file, dtype=np.float64).astype(np.float32)
    assert actions.shape == expected.shape
    difference = float(np.abs(actions - expected).max())
    print(f"C example ({label}) vs Python Policy over {len(expected)} steps: max |diff| {difference:.2e}")
    assert difference <= 1e-6

def test_example_c_program_matches_the_python_runtime(c_export, recorded_steps, tmp_path):
    """examples/c_loop/hopper_loop.c, linked with hopper-c.c, reads the recorded observations and rewards and
    writes the actions the Python runtime's Policy returned for them."""
    binary = tmp_path / "hopper_loop"
    flags = [flag for flag in compile_flags() if flag != "-fPIC"]
    result = subprocess.run([c_compiler(), *flags, "-Wall", "-Wextra", f"-I{c_export.parent}", str(EXAMPLE),
                             str(c_export), "-o", str(binary), "-lm"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run_example([str(binary)], *recorded_steps, label="native")

def test_example_builds_for_aarch64_and_matches_under_emulation(c_export, recorded_steps, tmp_path):
    """Cross-compiled for aarch64 (NEON vectors) and run by qemu-user: the same actions within float rounding."""
    cross, emulator = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cross and emulator):
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    binary = tmp_path / "hopper_loop.aarch64"
    flags = [flag for flag in BASE_FLAGS if flag != "-fPIC"]
    result = subprocess.run([cross, *flags, "-Wall", "-Wextra", "-pedantic", "-static",
                             f"-I{c_export.parent}", str(EXAMPLE), str(c_export), "-o", str(binary), "-lm"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run_example([emulator, str(binary)], *recorded_steps, label="aarch64")

def test_example_reports_a_bad_line(c_export, tmp_path):
    binary = tmp_path / "hopper_loop"
    flags = [flag for flag in compile_flags() if flag != "-fPIC"]
    subprocess.run([c_compiler(), *flags, f"-I{c_export.parent}", str(EXAMPLE), str(c_export), "-o", str(binary),
                    "-lm"], check=True, timeout=300)
    steps_file = tmp_path / "steps.txt"
    steps_file.write_text("1 0.0 " + " ".join(["0.1"] * 11) + "\n0 1.0 nan" + " 0.1" * 10 + "\n")
    run = subprocess.run([str(binary), str(steps_file), str(tmp_path / "actions.txt")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1 and "line 2" in run.stderr and "non-finite" in run.stderr, run.stderr


def test_export_errors_are_one_line(capsys, checkpoint_path, engines, tmp_path):
    out = str(tmp_path / "policy")
    for flags, fragment in ((["--fp16"], "--fp16"), (["--mode", "window"], "--mode window"),
                            (["--batch", "2"], "--batch"), (["--int8", "--calibration", "minmax"], "--int8")):
        code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--target", "c", "--out", out, *flags])
        assert_one_line_error(capsys, code, fragment, "--target c")
    onnx_name = str(engines["stream"].with_suffix(""))
    code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--target", "c", "--out", onnx_name])
    assert_one_line_error(capsys, code, "is the manifest of", "another --out")
    baseline = write_checkpoint(tmp_path / "bc", model_kind="bc")
    code = cli.main(["export", "--checkpoint", str(baseline), "--target", "c", "--out", out])
    assert_one_line_error(capsys, code, "baseline")
    assert not list(tmp_path.glob("policy.*"))  # nothing written by a refused export
