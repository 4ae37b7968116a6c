"""The C target: 'cli.py export --target c' (NAME.c + NAME.h + NAME.json), the native backend that compiles
and runs it, and the example C program, all on the real compiler, real MuJoCo and real ONNX Runtime.

Parity is held to the PyTorch reference within 1e-5 over a whole teacher-forced 1000-step Hopper-v5
episode, and the closed-loop return to the ONNX stream graph's for the same seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from dmm_train.checkpoint import load_checkpoint, save_model
from dmm_train.errors import DMMError
from export.c_source import c_identifier
from runtime import Policy, load_backend
from runtime.loop import make_plant, run_episode
from runtime.manifest import manifest_path_for, read_manifest
from runtime.native_backend import BASE_FLAGS, NativeLibrary, build_policy_library, compile_flags
from runtime.native_build import build_shared_library
from runtime.parity import ParityConfig, record_trajectory, run_parity
from tests.conftest import write_checkpoint
from tests.test_runtime import assert_one_line_error, export_engines

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "c_loop" / "hopper_loop.c"
FP32_TOLERANCE = 1e-5  # the C step against PyTorch, fp32 (as ONNX Runtime is held)
EPISODE_STEPS = 1000


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if not found:
        pytest.skip("no C compiler on this machine (the C target compiles on first use)")
    return found


@pytest.fixture(scope="module")
def c_export(checkpoint_path, tmp_path_factory):
    """hopper.c, hopper.h, hopper.json of the fixture checkpoint, written by the CLI."""
    compiler()
    out = tmp_path_factory.mktemp("c-export") / "hopper"
    assert cli.main(["export", "--checkpoint", str(checkpoint_path), "--target", "c", "--out", str(out)]) == 0
    return out.with_suffix(".c")


@pytest.fixture(scope="module")
def onnx_engines(checkpoint_path, tmp_path_factory):
    return export_engines(checkpoint_path, tmp_path_factory.mktemp("engines"))


def copy_export(c_path: Path, directory: Path) -> Path:
    for suffix in (".c", ".h", ".json"):
        shutil.copy(c_path.with_suffix(suffix), directory / c_path.with_suffix(suffix).name)
    return directory / c_path.name


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
    result = subprocess.run([compiler(), "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2", "-c",
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


# -- parity -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parity_report(checkpoint_path, c_export, onnx_engines):
    return run_parity(ParityConfig(checkpoint_path, (onnx_engines["stream"], c_export), steps=EPISODE_STEPS))


def test_native_equals_torch_teacher_forced_over_a_whole_episode(parity_report):
    trajectory = parity_report.trajectory
    assert (trajectory.steps, trajectory.episodes) == (EPISODE_STEPS, 1)
    print(parity_report.table())
    labels = [pair.candidate.split(" ")[0] for pair in parity_report.pairs]
    assert labels == ["ort/stream#0", "native/stream#1"]
    native = parity_report.pairs[1]
    assert native.reference == "torch/stream"
    assert [b.label for b in native.bins] == ["1", "2-10", "11-100", "101-1000"]
    assert native.max_abs < FP32_TOLERANCE and all(b.max_abs < FP32_TOLERANCE for b in native.bins)
    both = np.abs(parity_report.actions["native/stream#1"] - parity_report.actions["ort/stream#0"]).max()
    assert both < 2 * FP32_TOLERANCE


def test_closed_loop_return_equals_the_onnx_stream_graph(c_export, onnx_engines):
    plant = make_plant("Hopper-v5")
    results = {}
    try:
        with load_backend(onnx_engines["stream"]) as ort, load_backend(c_export) as native:
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
    compiler()
    checkpoint = spread_checkpoint(tmp_path / "run")
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--target", "c", "--out", str(tmp_path / "wide")]) == 0
    parity = read_manifest(tmp_path / "wide.json").parity
    print(parity)
    assert parity["max_abs"] < FP32_TOLERANCE


# -- the C API ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library(c_export):
    return NativeLibrary(build_policy_library(c_export, c_export.with_suffix(".h")), "hopper")


def test_env_step_api_matches_the_python_policy(library, c_export):
    """hopper_step (normalisation, rtg, clipping in C) == runtime.Policy on the graph-level API, bitwise."""
    rng = np.random.default_rng(5)
    observations = rng.normal(size=(40, 11)) * 2
    rewards = rng.uniform(0, 4, size=40)
    with load_backend(c_export) as backend:
        policy = Policy(backend, target_return=1800.0)
        expected = np.asarray([policy.act(o, r) for o, r in zip(observations, rewards, strict=True)])
    library.reset(1800.0)
    actions = np.asarray([library.step(o, r).copy() for o, r in zip(observations, rewards, strict=True)])
    np.testing.assert_array_equal(actions, expected)


def test_portable_baseline_build_agrees_with_this_machines_level(library, c_export, monkeypatch):
    """The build for the x86-64 baseline (SSE2: 4-wide vectors, no FMA), as on a CPU without AVX, gives the
    same actions within float rounding: the sums are taken in the same order, only contraction differs."""
    monkeypatch.setenv("DMM_NATIVE_ISA", "baseline")
    assert not any(flag.startswith("-march") for flag in compile_flags())
    baseline = NativeLibrary(build_policy_library(c_export, c_export.with_suffix(".h")), "hopper")
    assert baseline.path != library.path
    observations = np.random.default_rng(8).normal(size=(200, 11))
    actions = {}
    for name, built in (("native", library), ("baseline", baseline)):
        built.reset(3600.0)
        actions[name] = np.asarray([built.step(o, 1.0).copy() for o in observations])
    difference = float(np.abs(actions["native"] - actions["baseline"]).max())
    print(f"baseline vs {library.path.parent.name} build over 200 steps: max |diff| {difference:.2e}")
    assert difference < 1e-6


def test_non_finite_inputs_are_refused_and_leave_the_state_as_it_was(library):
    observations = np.random.default_rng(6).normal(size=(6, 11))

    def run(bad_step: np.ndarray | None) -> np.ndarray:
        library.reset(3600.0)
        actions = []
        for index, observation in enumerate(observations):
            if index == 3 and bad_step is not None:
                with pytest.raises(DMMError, match="non-finite"):
                    library.step(bad_step, 1.0)
            actions.append(library.step(observation, 1.0).copy())
        return np.asarray(actions)

    clean = run(None)
    for bad in (np.full(11, np.nan), np.r_[np.inf, np.zeros(10)], np.full(11, 1e300)):  # 1e300 overflows float
        np.testing.assert_array_equal(run(bad), clean)
    library.reset(3600.0)
    library.step(observations[0], 1.0)
    with pytest.raises(DMMError, match="non-finite"):
        library.step(observations[1], float("nan"))
    with pytest.raises(DMMError, match="target return"):
        library.reset(float("inf"))


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
    check.write_text(ELEMENTARY_CHECK.replace("@NAME@", "hopper"))
    binary = tmp_path / "check"
    flags = [flag for flag in compile_flags() if flag != "-fPIC"]
    result = subprocess.run([compiler(), *flags, f"-I{c_export.parent}", str(check), "-o", str(binary), "-lm"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    worst_exp, worst_scan, worst_softplus, bad = subprocess.run(
        [str(binary)], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    print(f"max error in ulp: exp {worst_exp}, scan exp {worst_scan}, softplus {worst_softplus}")
    assert int(bad) == 0
    assert float(worst_exp) <= 2 and float(worst_scan) <= 2 and float(worst_softplus) <= 4


# -- the example C program ----------------------------------------------------------------


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
    """examples/c_loop/hopper_loop.c, linked with hopper.c, reads the recorded observations and rewards and
    writes the actions the Python runtime's Policy returned for them."""
    binary = tmp_path / "hopper_loop"
    flags = [flag for flag in compile_flags() if flag != "-fPIC"]
    result = subprocess.run([compiler(), *flags, "-Wall", "-Wextra", f"-I{c_export.parent}", str(EXAMPLE),
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
    subprocess.run([compiler(), *flags, f"-I{c_export.parent}", str(EXAMPLE), str(c_export), "-o", str(binary),
                    "-lm"], check=True, timeout=300)
    steps_file = tmp_path / "steps.txt"
    steps_file.write_text("1 0.0 " + " ".join(["0.1"] * 11) + "\n0 1.0 nan" + " 0.1" * 10 + "\n")
    run = subprocess.run([str(binary), str(steps_file), str(tmp_path / "actions.txt")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1 and "line 2" in run.stderr and "non-finite" in run.stderr, run.stderr


# -- the backend's checks and errors ------------------------------------------------------


def test_backend_runs_without_torch(c_export):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from runtime import Policy, load_backend
        with load_backend({str(c_export)!r}) as backend:
            policy = Policy(backend)
            print(policy.act(np.zeros(11), 0.0).tolist())
        assert "dmm_train.model" not in sys.modules and "onnxruntime" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout.strip().splitlines()[-1])) == 3


def test_library_is_built_once_per_content(c_export, tmp_path, monkeypatch):
    monkeypatch.setenv("DMM_CACHE_DIR", str(tmp_path / "cache"))
    header = c_export.with_suffix(".h")
    first = build_policy_library(c_export, header)
    assert build_policy_library(c_export, header) == first
    assert not list((tmp_path / "cache").rglob(".build-*"))
    other = tmp_path / "other"
    other.mkdir()
    copy = copy_export(c_export, other)
    copy.with_suffix(".h").write_text(header.read_text() + "\n/* changed */\n")
    assert build_policy_library(copy, copy.with_suffix(".h")) != first  # the header is part of the key
    with pytest.raises(DMMError, match="failed"):
        broken = tmp_path / "broken.c"
        broken.write_text("int f(void) { return }\n")
        build_shared_library([broken], library_name="libbroken.so", subdir="test", flags=BASE_FLAGS)


def test_run_and_parity_errors_are_one_line(capsys, c_export, checkpoint_path, onnx_engines, tmp_path):
    tampered = copy_export(c_export, tmp_path)
    tampered.write_text(tampered.read_text().replace("0x", "-0x", 1))
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(tampered)]), "sha256 of hopper.c", "re-export")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(tmp_path / "none.c")]), "does not exist")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(c_export, foreign / "hopper.c")
    shutil.copy(c_export.with_suffix(".h"), foreign / "hopper.h")
    shutil.copy(manifest_path_for(onnx_engines["stream"]), foreign / "hopper.json")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(foreign / "hopper.c")]), "expected one of target c")
    # No compiler: $CC pointing nowhere, or none on PATH; an empty cache, so that a build is needed.
    script = f"import cli, sys; sys.exit(cli.main(['run', '--engine', {str(c_export)!r}, '--episodes', '1']))"
    environment = {key: value for key, value in os.environ.items() if key != "CC"}
    environment["DMM_CACHE_DIR"] = str(tmp_path / "empty-cache")
    (tmp_path / "no-bin").mkdir()
    for extra, fragment in (({"CC": "/no-such-compiler"}, "/no-such-compiler"),
                            ({"PATH": str(tmp_path / "no-bin")}, "no C compiler found")):
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=120, env={**environment, **extra})
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "compiled on first use" in result.stderr and fragment in result.stderr, result.stderr
    other = write_checkpoint(tmp_path / "other", seed=1)
    code = cli.main(["parity", "--checkpoint", str(other), "--onnx", str(c_export), "--steps", "3"])
    assert_one_line_error(capsys, code, "exported from another checkpoint")


def test_export_errors_are_one_line(capsys, checkpoint_path, onnx_engines, tmp_path):
    out = str(tmp_path / "policy")
    for flags, fragment in ((["--fp16"], "--fp16"), (["--mode", "window"], "--mode window"),
                            (["--batch", "2"], "--batch"), (["--int8", "--calibration", "minmax"], "--int8")):
        code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--target", "c", "--out", out, *flags])
        assert_one_line_error(capsys, code, fragment, "--target c")
    onnx_name = str(onnx_engines["stream"].with_suffix(""))
    code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--target", "c", "--out", onnx_name])
    assert_one_line_error(capsys, code, "is the manifest of", "another --out")
    baseline = write_checkpoint(tmp_path / "bc", model_kind="bc")
    code = cli.main(["export", "--checkpoint", str(baseline), "--target", "c", "--out", out])
    assert_one_line_error(capsys, code, "baseline")
    assert not list(tmp_path.glob("policy.*"))  # nothing written by a refused export
