"""Torch-free runtime: backends, Policy, control loop, latency statistics.

Needs numpy and one backend (onnxruntime, or tensorrt + pycuda); torch is needed only
for the PyTorch reference backend (a .pt) and gymnasium only for the simulated plant.

    from runtime import Policy, load_backend

    with load_backend("hopper.onnx") as backend:        # .plan -> TensorRT, .onnx -> ORT, .pt -> PyTorch
        policy = Policy(backend)                        # target return: the manifest's default
        observation, reward = plant.reset(), 0.0
        policy.reset()
        while running:
            action = policy.act(observation, reward)    # (Adim,) float32, clipped to the bounds
            observation, reward = plant.step(action)

On a robot: ``Policy(backend, on_fault="hold")`` returns the last good action instead of
raising on a bad observation or engine result (`runtime.policy`), and `ControlLoop` runs
``act`` on a fixed-rate clock and times it (`runtime.clock`, with `realtime` for core
pinning, SCHED_FIFO and a paused garbage collector).
"""

from contract.manifest import Manifest, manifest_path_for, read_manifest
from runtime.backend import Backend, check_feeds
from runtime.clock import ControlLoop, RealtimeOptions, realtime
from runtime.latency import LatencyStats
from runtime.loading import load_backend
from runtime.loop import RunConfig, RunReport, run_engine, run_episode
from runtime.policy import Policy

__all__ = [
    "Backend", "ControlLoop", "LatencyStats", "Manifest", "Policy", "RealtimeOptions", "RunConfig", "RunReport",
    "check_feeds", "load_backend", "manifest_path_for", "read_manifest", "realtime", "run_engine", "run_episode",
]
