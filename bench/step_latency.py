"""Per-step policy latency on one CPU thread: eager PyTorch window recompute against ONNX Runtime and C.

Three ways to compute one env step's action from the same checkpoint, side by side:

- (a) eager:  the official-style evaluation step in eager PyTorch (docs/model.md#evaluation-protocol):
              the new observation and a zero placeholder action are appended to the episode's
              history (torch.cat), the whole history is normalised, the last K steps are
              zero-left-padded and `DecisionMetaMamba.forward` runs over the window with the
              loop selective scan (``set_scan_impl("loop")``, the reference) under torch.no_grad;
              the action is the prediction at the last state token;
- (b) window: the exported window graph (`export.lowering`) through the runtime's ONNX Runtime
              backend (`OrtBackend.infer`: input checks, IO binding), fed the same window built
              in preallocated arrays (slide by one step, write the new one);
- (c) stream: the exported stream graph through the same backend: one step's tokens plus the
              caches the previous call returned (copied into the bound input arrays);
- (d) native: the same stream step exported as C ('cli.py export --target c'), compiled by the
              runtime's native backend and called through ctypes at its env-step API (one PREFIX_step
              call: normalisation, return-to-go, clipping and the caches all inside C, as a C control
              loop makes it); the executed a_{t-1} is handed over by PREFIX_override_action after the
              timed call, as for the Policy rows;
- (e) C infer: the same C step at the graph level through the runtime's native backend
              (`NativeBackend.infer`: input checks, caches in and out), fed as (c): what
              `Policy.act` on (d) calls, so the Policy's own cost is its row minus this one.

What is timed, for every path alike: from the raw observation o_t (with r_{t-1} and the executed
a_{t-1}) to the action a_t as a numpy array: normalisation, the return-to-go update, the feeds
that path needs and the backend call. All paths replay one recorded Hopper-v5 trajectory
(teacher-forced: the recorded executed actions enter every history), in alternating blocks of
steps so that a change in the machine's load hits every path alike. Informational rows time
`runtime.Policy.act` on (b), (c) and (d): the runtime's input checks and clipping on top; the line
``Policy.act over its backend`` gives what each adds to the backend's own row ((b), (c), (e)). torch runs
with one thread, each ONNX Runtime session with one intra-op thread, the C step on one thread.

Limits at the actuator and the step record, on and off side by side (issue: their cost on the C
stream step): (d) again with the manifest's limits compiled into the C step, and ``Policy.act``
on (d) with limits, then with limits and a step record (`Policy(record=)`, into the scratch
directory; its chunks written by the recorder's thread while the bench runs). The limits are a
rate limit of 2 per step (the whole action range: it never bites, so every path still computes
the same actions, and it is computed on every step, which is what costs); a ramp costs the same
on its first N steps and nothing after. The line ``limits + record`` gives the p50 added.

It then runs the window and the stream Policy closed loop on Hopper-v5 for a few episodes:
stream mode is a different policy by design (its state sees the whole episode,
docs/design.md#stream-mode), so its return is reported beside window mode's.

Without --checkpoint it trains a tiny real checkpoint first (a small random-policy Hopper-v5
dataset written by Minari's DataCollector, a few hundred official training steps, in a
temporary directory): its weights matter little for latency; pass a real run for the returns.

The last line is ``speedup window: <a/b>x stream: <a/c>x native vs ORT stream: <c/d>x`` (ratios of
the p50s).

    python bench/step_latency.py [--checkpoint runs/hopper-seed0/model.pt] [--steps 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from contract.errors import DMMError  # noqa: E402
from contract.tolerances import max_abs  # noqa: E402

PRESET = "hopper"
FEED_CHECK_CALLS = 2000  # check_feeds calls per timing of the per-call feed check
ROUNDS = 10  # alternating blocks per path
WARMUP_STEPS = 20
TRAIN_EPISODES = 30  # random-policy episodes of the default tiny checkpoint's dataset
SEED = 0
EAGER = "(a) eager torch window, loop scan"
# Largest |action - eager action| over the warm-up steps: the fp32 window graph agrees to about
# 1e-6; the stream is another policy from the first step (no zero-padded window: its state sees
# the episode's true history), so it is not compared.
PATH_AGREEMENT = {EAGER: max_abs("step-vs-sequence"), "(b) ORT window": max_abs("export-gate"),
                  "(c) ORT stream": float("inf"), "(d) native C stream": float("inf"),
                  "(e) native C backend.infer": float("inf"),
                  "    Policy.act on (b)": max_abs("export-gate"), "    Policy.act on (c)": float("inf"),
                  "    Policy.act on (d)": float("inf"), "(d) native C stream + limits": float("inf"),
                  "    Policy.act on (d) + limits": float("inf"),
                  "    Policy.act on (d) + limits + record": float("inf")}
# Limits that are computed on every step and never change an action (see the module docstring).
BENCH_RATE_LIMIT = "2"
# The stream paths are held to each other instead: the C step against (c), both fp32.
STREAM_AGREEMENT = max_abs("c-vs-torch")


class EagerWindow:
    """(a): the official evaluation's per-step work on torch tensors (history by torch.cat)."""

    def __init__(self, checkpoint):
        self.model = checkpoint.model.eval()
        self.model.set_scan_impl("loop")
        config = self.model.config
        self.K, self.S, self.Adim = config.context_len, config.state_dim, config.act_dim
        self.mean = torch.as_tensor(checkpoint.state_mean, dtype=torch.float32)  # (S,)
        self.std = torch.as_tensor(checkpoint.state_std, dtype=torch.float32)  # (S,)
        self.scale = float(checkpoint.rtg_scale)
        self.target = float(checkpoint.target_returns[0])
        self.reset()

    def reset(self) -> None:
        self.states = torch.zeros(0, self.S)  # (t, S) raw observations
        self.actions = torch.zeros(0, self.Adim)  # (t, Adim)
        self.rtg = torch.zeros(0, 1)  # (t, 1), already divided by the scale
        self.t = 0

    @torch.no_grad()
    def step(self, observation: np.ndarray, reward: float, previous_action: np.ndarray) -> np.ndarray:
        if self.t == 0:
            rtg = torch.full((1, 1), self.target / self.scale)  # (1, 1)
        else:
            self.actions[-1] = torch.from_numpy(previous_action)  # the executed a_{t-1}
            rtg = self.rtg[-1:] - reward / self.scale  # (1, 1)
        self.states = torch.cat([self.states, torch.from_numpy(observation).float()[None]])  # (t+1, S)
        self.actions = torch.cat([self.actions, torch.zeros(1, self.Adim)])  # (t+1, Adim): placeholder a_t
        self.rtg = torch.cat([self.rtg, rtg])  # (t+1, 1)
        self.t += 1
        states = (self.states - self.mean) / self.std  # (t+1, S): the official code normalises it all
        width = min(self.t, self.K)
        pad = self.K - width

        def window(history: torch.Tensor) -> torch.Tensor:
            last = history[-width:]  # (width, *)
            return torch.cat([torch.zeros(pad, history.shape[1]), last])[None]  # (1, K, *), zeros on the left

        predicted = self.model(window(states), window(self.actions), window(self.rtg))  # (1, K, Adim)
        return predicted[0, -1].numpy()  # (Adim,), at the last state token


class OrtWindow:
    """(b): the window graph's feeds kept in place, slid by one step per call."""

    def __init__(self, backend, manifest):
        self.backend = backend
        self.feeds = {spec.name: np.zeros(spec.shape, dtype=np.float32) for spec in manifest.inputs}
        self.states = self.feeds["states"][0]  # (K, S) views into the feeds
        self.actions = self.feeds["actions"][0]  # (K, Adim)
        self.rtgs = self.feeds["rtg"][0, :, 0]  # (K,)
        self.mean = np.asarray(manifest.state_mean)  # (S,) float64
        self.std = np.asarray(manifest.state_std)  # (S,)
        self.scale = float(manifest.rtg_scale)
        self.target = float(manifest.target_return)
        self.reset()

    def reset(self) -> None:
        for array in self.feeds.values():
            array.fill(0.0)
        self.rtg = np.float32(self.target / self.scale)
        self.t = 0

    def step(self, observation: np.ndarray, reward: float, previous_action: np.ndarray) -> np.ndarray:
        if self.t > 0:
            self.actions[-1] = previous_action
            self.rtg = np.float32(float(self.rtg) - reward / self.scale)
            self.states[:-1] = self.states[1:]  # (K-1, S): slide; the zero padding stays on the left
            self.actions[:-1] = self.actions[1:]  # (K-1, Adim)
            self.rtgs[:-1] = self.rtgs[1:]  # (K-1,)
        self.states[-1] = (observation - self.mean) / self.std  # (S,)
        self.actions[-1] = 0.0  # placeholder for a_t
        self.rtgs[-1] = self.rtg
        self.t += 1
        return self.backend.infer(self.feeds)["action"][0].copy()  # (Adim,); the backend reuses its buffer


class OrtStream:
    """(c): the stream graph; the caches it returns are copied into the next call's inputs."""

    def __init__(self, backend, manifest):
        self.backend = backend
        self.shapes = {spec.name: spec.shape for spec in manifest.inputs}
        self.mean = np.asarray(manifest.state_mean)  # (S,) float64
        self.std = np.asarray(manifest.state_std)  # (S,)
        self.scale = float(manifest.rtg_scale)
        self.target = float(manifest.target_return)
        self.reset()

    def reset(self) -> None:
        self.feeds = {name: np.zeros(shape, dtype=np.float32) for name, shape in self.shapes.items()}
        self.rtg = np.float32(self.target / self.scale)
        self.t = 0

    def step(self, observation: np.ndarray, reward: float, previous_action: np.ndarray) -> np.ndarray:
        feeds = self.feeds
        if self.t > 0:
            self.rtg = np.float32(float(self.rtg) - reward / self.scale)
            feeds["prev_action"][0] = previous_action  # (Adim,)
            feeds["prev_action_valid"][0, 0] = 1.0  # a_{t-1} is a token from the second step on
        feeds["state"][0] = (observation - self.mean) / self.std  # (S,)
        feeds["rtg"][0, 0] = self.rtg
        outputs = self.backend.infer(feeds)
        np.copyto(feeds["dsm_cache"], outputs["dsm_cache_next"])  # (nl, 1, W-1, D)
        np.copyto(feeds["ssm_state"], outputs["ssm_state_next"])  # (nl, 1, D, N)
        self.t += 1
        return outputs["action"][0].copy()  # (Adim,)


class NativeStream:
    """(d): the C file's env-step API through ctypes (`runtime.native_backend.NativeLibrary`)."""

    def __init__(self, library, manifest):
        self.library = library
        self.target = float(manifest.target_return)
        self.reset()

    def reset(self) -> None:
        self.library.reset(self.target)

    def step(self, observation: np.ndarray, reward: float, previous_action: np.ndarray) -> np.ndarray:
        return self.library.step(observation, reward).copy()  # (Adim,); the library reuses its buffer

    def executed(self, action: np.ndarray) -> None:
        self.library.override_action(action)  # untimed: teacher forcing, as for the Policy rows


class PolicyPath:
    """Informational: `runtime.Policy.act` (checks, normalisation, clipping) on an ORT backend."""

    def __init__(self, policy):
        self.policy = policy

    def reset(self) -> None:
        self.policy.reset()

    def step(self, observation: np.ndarray, reward: float, previous_action: np.ndarray) -> np.ndarray:
        return self.policy.act(observation, reward)

    def executed(self, action: np.ndarray) -> None:
        self.policy.override_action(action)  # untimed: teacher forcing, as for the other paths


def tiny_checkpoint(directory: Path, train_steps: int) -> Path:
    """A real model.pt: official training for ``train_steps`` steps on a small random-policy dataset."""
    from dmm_train.config import TrainConfig, get_preset
    from dmm_train.recipes import collect
    from dmm_train.train import train

    dataset = collect(get_preset(PRESET).env_id, "bench/step-latency-random-v0", policy="random",
                      episodes=TRAIN_EPISODES, seed=SEED, out=directory / "datasets")
    config = TrainConfig(preset=PRESET, dataset=str(dataset), steps=train_steps, seed=SEED, eval_episodes=0,
                         checkpoint_every=max(train_steps, 1))
    return train(config, directory / "run", progress=False)


def run_block(path, trajectory, cursor: int, count: int, wall: list[int], cpu: list[int],
              actions: list[np.ndarray] | None = None) -> int:
    """Steps ``cursor`` .. ``cursor + count`` of ``trajectory`` (wrapping) through ``path``; returns the cursor.

    Appends each step's wall-clock and thread CPU time (ns): on a machine shared with other
    jobs the CPU time leaves out the time the step was preempted.
    """
    for _ in range(count):
        t = cursor % trajectory.steps
        if trajectory.starts[t]:
            path.reset()
            reward, previous = 0.0, trajectory.actions[t]  # unused at an episode start
        else:
            reward, previous = float(trajectory.rewards[t - 1]), trajectory.actions[t - 1]
        observation = trajectory.observations[t]
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        action = path.step(observation, reward, previous)
        cpu.append(time.thread_time_ns() - start_cpu)
        wall.append(time.perf_counter_ns() - start)
        if actions is not None:
            actions.append(np.array(action))
        if isinstance(path, (PolicyPath, NativeStream)):
            path.executed(trajectory.actions[t])
        cursor += 1
    return cursor


def closed_loop(backend, env_id: str, episodes: int, seed: int):
    from runtime import Policy
    from runtime.loop import run_episode
    from runtime.plant import make_plant

    plant = make_plant(env_id)
    try:
        policy = Policy(backend)
        return [run_episode(policy, plant, seed=seed + index) for index in range(episodes)]
    finally:
        plant.close()


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model.pt or its run directory (default: train a "
                                                           "tiny one in a temporary directory)")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per path (default 1000)")
    parser.add_argument("--episodes", type=int, default=5, help="closed-loop episodes per mode (default 5)")
    parser.add_argument("--train-steps", type=int, default=300,
                        help="training steps of the default tiny checkpoint (default 300)")
    args = parser.parse_args(argv)
    if args.steps < ROUNDS or args.episodes < 1 or args.train_steps < 1:
        raise DMMError(f"--steps {args.steps}, --episodes {args.episodes}, --train-steps {args.train_steps}",
                       f">= {ROUNDS}, >= 1 and >= 1", f"pass --steps {ROUNDS} or more and the others 1 or more")

    from contract.manifest import read_manifest
    from dmm_train.checkpoint import load_checkpoint
    from export.c_source import export_c_checkpoint
    from export.onnx_export import export_checkpoint
    from runtime import Policy, load_backend
    from runtime.latency import LatencyStats
    from runtime.limits import LimitsOptions
    from runtime.native_backend import NativeLibrary, compile_flags
    from runtime.plant import make_plant
    from runtime.recording import record_trajectory
    from runtime.step_record import read_record

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dmm-step-latency-") as scratch:
        scratch = Path(scratch)
        if args.checkpoint is None:
            checkpoint_path = tiny_checkpoint(scratch, args.train_steps)
            origin = f"tiny checkpoint trained here ({args.train_steps} steps on {TRAIN_EPISODES} random episodes)"
        else:
            checkpoint_path = Path(args.checkpoint)
            origin = str(checkpoint_path)
        checkpoint = load_checkpoint(checkpoint_path)
        graphs, manifests = {}, {}
        for mode in ("window", "stream"):
            graphs[mode], manifest_path = export_checkpoint(checkpoint.path, mode=mode, out=scratch / mode)
            manifests[mode] = read_manifest(manifest_path)
        c_path, _, c_manifest_path = export_c_checkpoint(checkpoint.path, out=scratch / "native")
        manifests["native"] = read_manifest(c_manifest_path)
        limit_options = LimitsOptions(action_rate_limit=BENCH_RATE_LIMIT)
        c_limited_path = export_c_checkpoint(checkpoint.path, out=scratch / "native-limited", limits=limit_options)[0]
        limits = limit_options.resolve(manifests["native"])
        backends = {mode: load_backend(graphs[mode], threads=1) for mode in graphs}
        backends["native"] = load_backend(c_path)
        backends["native limited"] = load_backend(c_limited_path)
        # The limited and recording Policy rows get backends of their own, as every Policy row does.
        backends["native 2"], backends["native 3"] = load_backend(c_path), load_backend(c_path)
        # (b) and (c) get backends of their own: a Policy's feeds must not share their bound inputs.
        timed = {mode: load_backend(graphs[mode], threads=1) for mode in graphs}
        timed["native"] = load_backend(c_path).load()
        for backend in backends.values():
            backend.load()
        try:
            plant = make_plant(checkpoint.env_id)
            try:
                # Closed loop under the window policy; episode i is seeded SEED + i.
                trajectory = record_trajectory(Policy(backends["window"]), plant, steps=args.steps, seed=SEED)
            finally:
                plant.close()
            paths = {
                EAGER: EagerWindow(checkpoint),
                "(b) ORT window": OrtWindow(timed["window"], manifests["window"]),
                "(c) ORT stream": OrtStream(timed["stream"], manifests["stream"]),
                # A library state of its own: the Policy row below drives the backend's.
                "(d) native C stream": NativeStream(
                    NativeLibrary(backends["native"].library.path, backends["native"].library.prefix),
                    manifests["native"]),
                "(e) native C backend.infer": OrtStream(timed["native"], manifests["native"]),
                "    Policy.act on (b)": PolicyPath(Policy(backends["window"])),
                "    Policy.act on (c)": PolicyPath(Policy(backends["stream"])),
                "    Policy.act on (d)": PolicyPath(Policy(backends["native"])),
                "(d) native C stream + limits": NativeStream(backends["native limited"].library, manifests["native"]),
                "    Policy.act on (d) + limits": PolicyPath(Policy(backends["native 2"], limits=limits)),
                "    Policy.act on (d) + limits + record": PolicyPath(
                    Policy(backends["native 3"], limits=limits, record=scratch / "record")),
            }
            # Warm-up, and a check that the paths compute the same policy on the same inputs.
            warm = {}
            for name, path in paths.items():
                warm[name] = []
                run_block(path, trajectory, 0, WARMUP_STEPS, [], [], warm[name])
                path.reset()
            for name, actions in warm.items():
                difference = float(np.abs(np.asarray(actions) - np.asarray(warm[EAGER])).max())
                if not difference < PATH_AGREEMENT[name]:
                    raise DMMError(f"{name.strip()}: differs from {EAGER} by {difference:.2e} over the first "
                                   f"{WARMUP_STEPS} steps", f"below {PATH_AGREEMENT[name]:g} (the same computation)",
                                   "find which path changed before timing them")
            for name in ("(d) native C stream", "(e) native C backend.infer", "    Policy.act on (d)",
                         "(d) native C stream + limits", "    Policy.act on (d) + limits",
                         "    Policy.act on (d) + limits + record"):
                difference = float(np.abs(np.asarray(warm[name]) - np.asarray(warm["(c) ORT stream"])).max())
                if not difference < STREAM_AGREEMENT:
                    raise DMMError(f"{name.strip()}: differs from (c) ORT stream by {difference:.2e} over the "
                                   f"first {WARMUP_STEPS} steps", f"below {STREAM_AGREEMENT:g} (the same computation)",
                                   "find which path changed before timing them")
            cursors = dict.fromkeys(paths, 0)
            wall, cpu = ({name: [] for name in paths} for _ in range(2))
            block = args.steps // ROUNDS
            for _ in range(ROUNDS):
                for name, path in paths.items():
                    cursors[name] = run_block(path, trajectory, cursors[name], block, wall[name], cpu[name])
            stats = {name: LatencyStats.from_ns(values) for name, values in wall.items()}
            cpu_p50 = {name: float(np.percentile(values, 50)) / 1e3 for name, values in cpu.items()}  # us

            returns = {mode: closed_loop(backends[mode], checkpoint.env_id, args.episodes, SEED)
                       for mode in ("window", "stream", "native")}
            recording = paths["    Policy.act on (d) + limits + record"].policy
            recording.close()
            recorded_rows = read_record(scratch / "record").rows
        finally:
            for backend in (*backends.values(), *timed.values()):
                backend.close()

    config = checkpoint.model.config
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"DMM per-step latency, {PRESET} ({checkpoint.env_id}): K={config.context_len}, D={config.d_model}, "
          f"{config.n_layer} layers; checkpoint: {origin}, step {checkpoint.step}")
    print(f"threads: torch {torch.get_num_threads()}, ONNX Runtime intra-op 1, C step 1; {cpus} CPUs, load "
          f"average {os.getloadavg()[0]:.2f}")
    print(f"C step: {c_path.name} built with {' '.join(compile_flags())}")
    nodes = {mode: (m.exporter.get("graph_nodes"), m.exporter.get("graph_nodes_ort_optimized"))
             for mode, m in manifests.items()}
    print(f"graphs: window {nodes['window'][0]} nodes ({nodes['window'][1]} after ONNX Runtime's "
          f"optimisation), stream {nodes['stream'][0]} ({nodes['stream'][1]})")
    print(f"timed: observation -> action per step (feeds + backend call), {trajectory.steps} recorded "
          f"Hopper steps ({trajectory.episodes} episodes) per path, {ROUNDS} alternating blocks of {block}")
    print(f"{'path':<38}{'p50 us':>10}{'p99 us':>10}{'max us':>10}{'x (a) p50':>11}{'cpu p50 us':>12}")
    reference = stats[EAGER].p50
    for name, stat in stats.items():
        print(f"{name:<38}{stat.p50 * 1e3:>10.1f}{stat.p99 * 1e3:>10.1f}{stat.max * 1e3:>10.1f}"
              f"{reference / stat.p50:>10.1f}x{cpu_p50[name]:>12.1f}")
    print(f"wall clock per step; 'cpu': the thread's CPU time (preemption left out): speedup by cpu p50 "
          f"window {cpu_p50[EAGER] / cpu_p50['(b) ORT window']:.1f}x stream "
          f"{cpu_p50[EAGER] / cpu_p50['(c) ORT stream']:.1f}x")
    episodes = args.episodes
    print(f"closed loop on {checkpoint.env_id}, target {manifests['window'].target_return:g}, {episodes} "
          f"episodes (seeds {SEED}..{SEED + episodes - 1}), ONNX Runtime and the C step; the modes differ by "
          "design, stream and native (the same stream step) should not:")
    for mode, results in returns.items():
        values = np.asarray([r.episode_return for r in results])
        manifest = manifests[mode]
        score = 100 * (values.mean() - manifest.ref_min_score) / (manifest.ref_max_score - manifest.ref_min_score)
        print(f"  {mode:<7} return {values.mean():8.1f} ± {values.std():6.1f}  normalised {score:6.1f}  "
              f"lengths {[r.length for r in results]}")
    window_speedup = reference / stats["(b) ORT window"].p50
    stream_speedup = reference / stats["(c) ORT stream"].p50
    native_speedup = stats["(c) ORT stream"].p50 / stats["(d) native C stream"].p50
    def added(base: str, row: str) -> tuple[float, float]:
        """(wall p50, cpu p50) that ``row`` adds to ``base``, in us."""
        return (stats[row].p50 - stats[base].p50) * 1e3, cpu_p50[row] - cpu_p50[base]

    c_limits = added("(d) native C stream", "(d) native C stream + limits")
    policy_limits = added("    Policy.act on (d)", "    Policy.act on (d) + limits")
    policy_both = added("    Policy.act on (d)", "    Policy.act on (d) + limits + record")
    over_backend = {label: added(base, row) for label, base, row in (
        ("window (b)", "(b) ORT window", "    Policy.act on (b)"),
        ("stream (c)", "(c) ORT stream", "    Policy.act on (c)"),
        ("C (e)", "(e) native C backend.infer", "    Policy.act on (d)"))}
    print("Policy.act over its backend, p50 added (wall / cpu us): " + ", ".join(
        f"{label} {wall:+.1f} / {cpu:+.1f}" for label, (wall, cpu) in over_backend.items()))
    # The backend rows call Backend.infer, which checks its feeds on every call; the Policy checks its
    # own feeds once and calls infer_prechecked. Over the bare graph call it adds that check's time too.
    feed_check = {label: feed_check_us(manifests[mode]) for label, mode in (
        ("window (b)", "window"), ("stream (c)", "stream"), ("C (e)", "native"))}
    print("Policy.act over the bare graph call (the row above plus the per-call feed check the backend row "
          "pays and the Policy does not; wall us): " + ", ".join(
              f"{label} {over_backend[label][0] + feed_check[label]:+.1f} (check {feed_check[label]:.1f})"
              for label in over_backend))
    print(f"limits + record, p50 added to the C stream step (wall / cpu us): C env-step API with limits "
          f"{c_limits[0]:+.2f} / {c_limits[1]:+.2f}; Policy.act on (d) with limits {policy_limits[0]:+.1f} / "
          f"{policy_limits[1]:+.1f}, with limits + record {policy_both[0]:+.1f} / {policy_both[1]:+.1f} "
          f"({recorded_rows} rows recorded)")
    print(f"speedup window: {window_speedup:.1f}x stream: {stream_speedup:.1f}x native vs ORT stream: "
          f"{native_speedup:.1f}x")
    return window_speedup, stream_speedup


def feed_check_us(manifest) -> float:
    """Median wall time of one `check_feeds` call on ``manifest``'s zero feeds, in us (5 timings)."""
    from runtime.backend import check_feeds, zero_feeds

    feeds = zero_feeds(manifest)
    timings = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(FEED_CHECK_CALLS):
            check_feeds(manifest, feeds)
        timings.append((time.perf_counter_ns() - start) / FEED_CHECK_CALLS / 1e3)
    return float(np.median(timings))


if __name__ == "__main__":
    try:
        main()
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
