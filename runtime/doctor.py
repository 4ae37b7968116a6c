"""``cli.py doctor``: what this machine can run, and how an engine fares on it; a record for a bug report.

Torch-free and safe on any machine: every probe catches its own failure and reports it with the
one thing to install. Without an engine it lists Python, numpy, onnxruntime and its providers,
TensorRT, pycuda and cuda-python (installed, usable, why not), the CUDA driver and runtime
versions, and the GPUs. With an engine it also says which backends load it (a .plan: TensorRT,
and ONNX Runtime on the ONNX it was built from; a .onnx: each ONNX Runtime provider, and a
.plan beside it), compares every other backend with ONNX Runtime on the CPU teacher-forced
along one recorded closed-loop trajectory of the engine's plant (max / mean |action
difference|), and times ``Policy.act`` on each backend along it, for a plan with and without
CUDA graphs.

    report = diagnose(engine="hopper.plan")      # a plain dict, JSON-ready
    print(report_text(report))
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from runtime.cuda_support import (
    CudaUnavailable,
    cuda_python_version,
    cudart_call,
    distribution_version,
    first_line,
    import_cudart,
    import_pycuda,
)
from runtime.latency import LatencyStats
from runtime.limits import ActuatorLimits
from runtime.loading import ENGINE_SUFFIXES, load_backend
from runtime.plant import check_plant, make_plant
from runtime.policy import Policy
from runtime.recording import record_trajectory
from runtime.tensorrt_support import import_tensorrt

DEFAULT_STEPS = 300  # recorded plant steps for the comparison and the latency figures
JETSON_RELEASE = Path("/etc/nv_tegra_release")


class _NoDriver(CudaUnavailable):
    """cuda-python answers, and says there is no CUDA driver."""


def _is_jetson() -> bool:
    return JETSON_RELEASE.is_file()


def install_hints(driver_cuda_major: int | None = None) -> dict[str, str]:
    """The one thing to install for each component, for this kind of machine."""
    cuda_python = (f"pip install 'cuda-python>={driver_cuda_major},<{driver_cuda_major + 1}'"
                   if driver_cuda_major else "pip install 'cuda-python>=12,<13' (its major must match the "
                                             "driver's CUDA: 13.x for CUDA 13)")
    if _is_jetson():
        tensorrt = ("JetPack's TensorRT: sudo apt install python3-libnvinfer, in a venv made with "
                    "--system-site-packages (docs/jetson.md)")
    else:
        tensorrt = ("pip install -e '.[gpu]' in the checkout (TensorRT 11.x for a CUDA 13 driver; "
                    "tensorrt-cu12==10.* for CUDA 12)")
    return {
        "numpy": "pip install numpy",
        "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu for the CUDA / TensorRT providers, in its place)",
        "tensorrt": tensorrt,
        "pycuda": ("with the CUDA toolkit on PATH and CPATH (CUDA_ROOT set): pip install pycuda (docs/jetson.md)"),
        "cuda-python": cuda_python,
        "torch": "pip install torch (only for a model.pt; the runtime needs none)",
        "gymnasium": "pip install 'gymnasium[mujoco]' (the simulated plant; not needed in your own loop)",
        "gpu": "an NVIDIA GPU with its driver (nvidia-smi lists it)",
    }


def _component(installed: str | None, usable: bool, detail: str, install: str | None = None) -> dict:
    return {"installed": installed, "usable": usable, "detail": detail,
            **({"install": install} if not usable and install else {})}


def _decode_cuda_version(number: int) -> str:
    """12060 -> '12.6'."""
    return f"{number // 1000}.{number % 1000 // 10}"


def probe_environment() -> dict:
    """What is installed and usable here (see the module docstring); never raises."""
    record: dict = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "machine": platform.machine(), "dmm_deploy": distribution_version("dmm-deploy"),
        "jetson": JETSON_RELEASE.read_text(errors="replace").splitlines()[0][:120] if _is_jetson() else None,
    }
    components: dict = {}
    driver: dict = {"driver_cuda": None, "runtime_cuda": None, "pycuda_built_for": None}
    gpus: list[dict] = []
    no_driver = False

    components["numpy"] = _component(np.__version__, True, "imports")

    try:
        import onnxruntime as ort  # pyright: ignore[reportMissingImports]  (not in the type-check environment)

        providers = list(ort.get_available_providers())
        components["onnxruntime"] = _component(ort.__version__, True, "providers: " + ", ".join(providers))
        components["onnxruntime"]["providers"] = providers
    except ImportError as error:
        components["onnxruntime"] = _component(None, False, f"does not import ({first_line(error)})")

    try:
        trt = import_tensorrt("running or building a plan")
        components["tensorrt"] = _component(str(trt.__version__), True, "imports")
    except DMMError as error:
        components["tensorrt"] = _component(distribution_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13",
                                                                 "tensorrt_cu12_bindings"),
                                            False, error.received)

    try:
        cuda = import_pycuda()
        driver_number = int(cuda.get_driver_version())
        driver["driver_cuda"] = _decode_cuda_version(driver_number) if driver_number > 0 else None
        built_for = cuda.get_version()  # (major, minor, patch) of the CUDA pycuda was compiled against
        driver["pycuda_built_for"] = ".".join(str(part) for part in built_for[:2])
        for index in range(cuda.Device.count()):
            device = cuda.Device(index)
            major, minor = device.compute_capability()
            gpus.append({"index": index, "name": device.name().strip(), "compute_capability": f"{major}.{minor}",
                         "memory_mib": int(device.total_memory()) >> 20, "via": "pycuda"})
        components["pycuda"] = _component(distribution_version("pycuda"), True,
                                          f"built for CUDA {driver['pycuda_built_for']}")
    except CudaUnavailable as why:
        components["pycuda"] = _component(distribution_version("pycuda"), False, str(why))
    except Exception as error:  # a pycuda error while listing devices
        components["pycuda"] = _component(distribution_version("pycuda"), False,
                                          f"{type(error).__name__}: {first_line(error)}")

    try:
        cudart = import_cudart()
        driver_number = int(cudart_call(cudart, "cudaDriverGetVersion"))
        if driver_number <= 0:  # what the runtime answers when no driver is installed, not a driver "0.0"
            raise _NoDriver("cuda-python imports, but no CUDA driver is installed (cudaDriverGetVersion gives 0)")
        driver["driver_cuda"] = driver["driver_cuda"] or _decode_cuda_version(driver_number)
        driver["runtime_cuda"] = _decode_cuda_version(int(cudart_call(cudart, "cudaRuntimeGetVersion")))
        count = int(cudart_call(cudart, "cudaGetDeviceCount"))
        if not gpus:
            for index in range(count):
                props = cudart_call(cudart, "cudaGetDeviceProperties", index)
                name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
                gpus.append({"index": index, "name": name.rstrip("\x00").strip(),
                             "compute_capability": f"{props.major}.{props.minor}",
                             "memory_mib": int(props.totalGlobalMem) >> 20, "via": "cuda-python"})
        components["cuda-python"] = _component(cuda_python_version(), True,
                                               f"runtime bindings for CUDA {driver['runtime_cuda']}")
    except _NoDriver as why:
        components["cuda-python"] = _component(cuda_python_version(), False, str(why))
        no_driver = True
    except CudaUnavailable as why:
        components["cuda-python"] = _component(cuda_python_version(), False, str(why))

    components["torch"] = _component(distribution_version("torch"), distribution_version("torch") is not None,
                                     "installed (not imported)" if distribution_version("torch") else "not installed")
    components["gymnasium"] = _component(distribution_version("gymnasium"),
                                         distribution_version("gymnasium") is not None,
                                         "installed" if distribution_version("gymnasium") else "not installed")
    major = int(driver["driver_cuda"].split(".")[0]) if driver["driver_cuda"] else None
    hints = install_hints(major)
    if no_driver:  # the bindings are fine: the driver is what is missing
        hints["cuda-python"] = hints["gpu"]
    for name, component in components.items():
        if not component["usable"] and name in hints:
            component["install"] = hints[name]
    record.update(components=components, cuda=driver, gpus=gpus)
    if not gpus:
        record["gpu_install"] = hints["gpu"]
    return record


# -- an engine ------------------------------------------------------------------------------------


def _candidates(engine: Path) -> list[tuple[str, Path, dict]]:
    """(label, path, load_backend options) of every backend that could run this engine or its twin: every
    engine kind `runtime.loading.load_backend` (what 'cli.py run' uses) opens."""
    if engine.is_dir() and (engine / "model.pt").is_file():
        engine = engine / "model.pt"  # a training run directory, as 'cli.py run' accepts
    suffix = engine.suffix.lower()
    if suffix not in ENGINE_SUFFIXES:
        raise DMMError(f"--engine {str(engine)!r}: unknown engine kind {engine.suffix or '(none)'!r}",
                       f"one of {', '.join(ENGINE_SUFFIXES)} (what 'cli.py run' runs) or a training run directory",
                       "pass --engine one of those files or a training run directory")
    found: list[tuple[str, Path, dict]] = []
    if suffix == ".plan":
        found.append(("trt", engine, {}))
        found.append(("trt (CUDA graph)", engine, {"cuda_graph": True}))
        onnx = engine.with_suffix(".onnx")
        if onnx.is_file():
            found += [(f"ort {provider}", onnx, {"provider": provider}) for provider in ("cpu", "cuda", "tensorrt")]
    elif suffix == ".onnx":
        found += [(f"ort {provider}", engine, {"provider": provider}) for provider in ("cpu", "cuda", "tensorrt")]
        plan = engine.with_suffix(".plan")
        found.append(("trt", plan, {}))
        if plan.is_file():
            found.append(("trt (CUDA graph)", plan, {"cuda_graph": True}))
    elif suffix == ".pt":
        found.append(("torch", engine, {}))
    elif suffix == ".c":
        found.append(("c", engine, {}))
    return found


def _load(path: Path, options: dict):
    if not path.exists():
        raise DMMError(f"{path.name} does not exist", f"a {path.suffix} built here",
                       f"build it on the target GPU: python cli.py build {path.with_suffix('.onnx')}")
    return load_backend(path, **options)


def timed_teacher_forced(policy, trajectory) -> tuple[np.ndarray, np.ndarray]:
    """Actions (T, Adim) along the trajectory (executed actions written back) and each step's ns."""
    actions = np.empty_like(trajectory.actions)  # (T, Adim)
    elapsed = np.empty(trajectory.steps, dtype=np.int64)  # (T,)
    for t in range(trajectory.steps):
        if trajectory.starts[t]:
            policy.reset()
        reward = 0.0 if trajectory.starts[t] else trajectory.rewards[t - 1]
        start = time.perf_counter_ns()
        actions[t] = policy.act(trajectory.observations[t], reward)
        elapsed[t] = time.perf_counter_ns() - start
        policy.override_action(trajectory.actions[t])
    return actions, elapsed


def diagnose_engine(engine: Path, *, steps: int = DEFAULT_STEPS, seed: int = 0) -> dict:
    """Which backends load ``engine``, their actions against ONNX Runtime CPU, their latency."""
    engine = Path(engine)
    if not engine.exists():
        raise DMMError(f"--engine {str(engine)!r} does not exist", "a .plan, .onnx, .c (export --target c) or model.pt",
                       "pass --engine the path of an exported engine or a checkpoint")
    report: dict = {"engine": str(engine), "backends": [], "comparison": None, "trajectory": None}
    loaded = {}
    for label, path, options in _candidates(engine):
        try:
            backend = _load(path, options)
        except Exception as error:  # one backend's failure, whatever its kind, must not hide the others
            detail = str(error) if isinstance(error, DMMError) else f"{type(error).__name__}: {first_line(error)}"
            report["backends"].append({"backend": label, "path": str(path), "loads": False, "detail": detail})
            continue
        loaded[label] = backend
        report["backends"].append({"backend": label, "path": str(path), "loads": True,
                                   "detail": backend.provider, "mode": backend.manifest.mode,
                                   "precision": backend.manifest.precision,
                                   "warnings": list(getattr(backend, "warnings", []))})
    try:
        if not loaded:
            report["comparison"] = "no backend loads this engine here (see backends)"
            return report
        reference_label = next((label for label in loaded if label == "ort cpu"), None)
        first = loaded[reference_label or next(iter(loaded))]
        manifest = first.manifest
        report["limits"] = ActuatorLimits.from_manifest(manifest).summary()  # what a Policy applies at the actuator
        try:
            plant = make_plant(manifest.env_id)
            try:
                check_plant(plant, manifest, manifest.env_id)
                trajectory = record_trajectory(Policy(first), plant, steps=steps, seed=seed)
            finally:
                plant.close()
            report["trajectory"] = {"env_id": manifest.env_id, "steps": trajectory.steps,
                                    "episodes": trajectory.episodes, "seed": seed,
                                    "recorded_with": reference_label or next(iter(loaded))}
        except DMMError as error:
            report["comparison"] = f"not compared: {error}"
            return report
        actions = {}
        for label, backend in loaded.items():
            predicted, elapsed = timed_teacher_forced(Policy(backend), trajectory)
            actions[label] = predicted
            stats = LatencyStats.from_ns(elapsed)
            entry = next(item for item in report["backends"] if item["backend"] == label)
            entry["latency_ms"] = {"p50": stats.p50, "p99": stats.p99, "max": stats.max, "mean": stats.mean,
                                   "steps": stats.count}
            if hasattr(backend, "graph_launches"):
                entry["cuda_graph_launches"] = backend.graph_launches
                entry["warnings"] = list(backend.warnings)
        if reference_label is None and len(loaded) == 1:
            report["comparison"] = (f"only the {next(iter(loaded))} backend runs a {engine.suffix or 'run directory'}"
                                    " engine: nothing to compare with (doctor the .onnx exported from it to compare "
                                    "backends)")
        elif reference_label is None:
            report["comparison"] = "not compared: ONNX Runtime on the CPU does not load this engine's ONNX here"
        else:
            reference = actions[reference_label].astype(np.float64)
            report["comparison"] = {
                label: {"against": reference_label, "max_abs": float(np.abs(values - reference).max()),
                        "mean_abs": float(np.abs(values - reference).mean())}
                for label, values in actions.items() if label != reference_label}
            if not report["comparison"]:
                report["comparison"] = "only ONNX Runtime on the CPU loads it here: nothing to compare with"
    finally:
        for backend in loaded.values():
            backend.close()
    return report


def diagnose(engine: str | Path | None = None, *, steps: int = DEFAULT_STEPS, seed: int = 0) -> dict:
    report = {"kind": "dmm-deploy-doctor", "format_version": 1, "environment": probe_environment()}
    if engine is not None:
        report["engine"] = diagnose_engine(Path(engine), steps=steps, seed=seed)
    return report


def report_text(report: dict) -> str:
    """The report as text, one fact per line."""
    environment = report["environment"]
    lines = [f"python       {environment['python']} ({environment['platform']})"
             + (f"; Jetson: {environment['jetson']}" if environment["jetson"] else "")]
    for name, component in environment["components"].items():
        state = component["installed"] or "not installed"
        line = f"{name:<12} {state}: {'usable' if component['usable'] else 'not usable'}, {component['detail']}"
        if component.get("install"):
            line += f"  -> install: {component['install']}"
        lines.append(line)
    cuda = environment["cuda"]
    lines.append(f"cuda         driver {cuda['driver_cuda'] or 'none found'}, runtime bindings "
                 f"{cuda['runtime_cuda'] or 'unknown'}, pycuda built for {cuda['pycuda_built_for'] or 'unknown'}")
    if environment["gpus"]:
        lines += [f"gpu {gpu['index']}        {gpu['name']} (compute capability {gpu['compute_capability']}, "
                  f"{gpu['memory_mib']} MiB)" for gpu in environment["gpus"]]
    else:
        lines.append(f"gpu          none found  -> {environment.get('gpu_install', '')}")
    engine = report.get("engine")
    if engine:
        lines.append(f"engine       {engine['engine']}" + (f"; {engine['limits']}" if engine.get("limits") else ""))
        for item in engine["backends"]:
            text = f"  {item['backend']:<18} " + ("loads: " + item["detail"] if item["loads"] else
                                                 "does not load: " + item["detail"])
            if "latency_ms" in item:
                latency = item["latency_ms"]
                text += (f"; Policy.act p50 {latency['p50']:.3f} ms, p99 {latency['p99']:.3f} ms, max "
                         f"{latency['max']:.3f} ms over {latency['steps']} steps")
            lines.append(text)
            lines += [f"    warning: {warning}" for warning in item.get("warnings", [])]
        if engine["trajectory"]:
            trajectory = engine["trajectory"]
            lines.append(f"  trajectory: {trajectory['steps']} steps of {trajectory['env_id']} "
                         f"({trajectory['episodes']} episode(s), seed {trajectory['seed']}), teacher-forced")
        comparison = engine["comparison"]
        if isinstance(comparison, dict):
            lines += [f"  {label} vs {value['against']}: max |action difference| {value['max_abs']:.2e}, mean "
                      f"{value['mean_abs']:.2e}" for label, value in comparison.items()]
        elif comparison:
            lines.append(f"  {comparison}")
    return "\n".join(lines)
