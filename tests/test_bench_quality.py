"""bench/quality.py end to end on a tiny budget: every kind trained with periodic evaluation, the last /
best-checkpoint / official scores read from the runs, the compute-matched DT run, its section written
between the markers (the rest of BENCHMARKS.md kept), one run alone (--run), the commands of a sweep
(--print-commands), several runs at once (--jobs), finished runs reused, the table from the runs
directory (--report-only), other settings refused."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contract.errors import DMMError
from dmm_train.recipes import collect

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET_ID = "test/quality-hopper-v0"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO_ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    """The bench sets torch's thread count (--threads); give the other tests theirs back."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return collect("Hopper-v5", DATASET_ID, policy="random", episodes=8, seed=4,
                   out=tmp_path_factory.mktemp("store"))


def bench_argv(dataset: Path, out: Path, benchmarks: Path, *extra: str) -> list[str]:
    return ["--dataset", str(dataset), "--steps", "4", "--model-steps", "dt=2", "--seeds", "0", "--episodes", "1",
            "--selection-episodes", "1", "--evaluations", "2", "--batch-size", "8", "--checkpoint-every", "2",
            "--out", str(out), "--benchmarks", str(benchmarks), "--quiet", *extra]


def replace_option(argv: list[str], option: str, *values: str) -> list[str]:
    """``argv`` with ``option``'s values replaced (the option takes one value, or several for --seeds)."""
    start = argv.index(option) + 1
    end = start + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return [*argv[:start], *values, *argv[end:]]


def finished_run(kind: str, seed: int, last: float, **fields) -> dict:
    """One finished run's result as the table reads it: 4 steps, best = last unless fields say otherwise."""
    return {"name": f"{kind}-seed{seed}", "kind": kind, "matched": False, "seed": seed, "params": 1,
            "context_len": 1, "steps": 4, "ms_per_step": 1.0, "train_seconds": 1.0, "eval_seconds": 1.0,
            "last": last, "best": last, "official": last, **fields}


@pytest.mark.slow
def test_quality_bench_reports_last_best_and_official_and_continues_where_it_stopped(
        tmp_path, dataset, restore_threads, capsys):
    bench = load_bench()
    benchmarks = tmp_path / "BENCHMARKS.md"
    begin, end = bench.section_markers(DATASET_ID, 4)
    assert begin == f"<!-- quality:begin {DATASET_ID} @ 4 -->"
    before, after = "# Benchmarks\n\nintro kept\n\n", "\n## other bench\n\nkept too\n"
    benchmarks.write_text(f"{before}{begin}\nstale table\n{end}\n{after}")
    runs = tmp_path / "bench"
    argv = bench_argv(dataset, runs, benchmarks)

    # One run alone, as a scheduler's job runs it: its result, no table.
    assert bench.main([*argv, "--run", "bc-seed0"]) is None
    assert sorted(path.name for path in runs.iterdir()) == ["bc-seed0", "bench.json"]
    assert "stale table" in benchmarks.read_text()
    bc_stamp = (runs / "bc-seed0" / "model.pt").stat().st_mtime_ns

    # Where each run stands, training nothing: the finished one with its scores, the others not started.
    capsys.readouterr()
    assert bench.main([*argv, "--status"]) is None
    status = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert status["bc-seed0"].startswith("finished: 4 steps, last ")
    assert status["dmm-seed0"] == "not started (4 steps)" and status["dt-seed0"] == "not started (2 steps)"
    assert status["dt-matched-seed0"] == "not started (DMM's wall time of steps)"

    line = bench.main(argv)
    assert torch.get_num_threads() == 1  # --threads default
    assert re.fullmatch(rf"quality on {re.escape(DATASET_ID)} @ 4 steps \(last checkpoint, 1 seed\): "
                        r"DMM=\S+ DMamba=\S+ BC=\S+ DT@2=\S+", line), line
    assert (runs / "bc-seed0" / "model.pt").stat().st_mtime_ns == bc_stamp  # reused, not retrained

    text = benchmarks.read_text()
    assert text.startswith(before) and text.endswith(after) and "stale table" not in text
    section = text[text.index(begin): text.index(end)]
    assert section.rstrip().splitlines()[-1] == line
    assert "| DT | 726,019 | 20 | 2 | 1 |" in section and "| DMamba | 50,691 | 8 | 4 | 1 |" in section
    assert "| DT (DMM's wall time) | 726,019 | 20 |" in section
    assert "below the official 100,000" in section and "env seeds 10000 + i" in section
    assert "env seeds 20000 + i" in section
    # Every run trained here, on this CPU: it is named once, as the machine, and recorded with each run.
    assert f"- Machine: {bench.cpu_model()}, " in section and "- Machines:" not in section

    result = json.loads((runs / "dt-seed0" / "result.json").read_text())
    evaluations = result["evaluations"]
    assert [e["step"] for e in evaluations] == [1, 2]  # every steps / 2, the last at the final step
    assert [t["target_return"] for t in evaluations[-1]["report"]] == [3600.0, 7200.0, 36000.0, 72000.0]
    assert result["last"] == evaluations[-1]["report"][0]["normalized_mean"]
    assert result["official"] == max(t["normalized_mean"] for e in evaluations for t in e["report"])
    best_step = json.loads((runs / "dt-seed0" / "best.json").read_text())["step"]
    assert result["best_step"] == best_step
    assert result["best"] == next(e for e in evaluations if e["step"] == best_step)["report"][0]["normalized_mean"]
    assert result["last"] <= result["official"] and result["best"] <= result["official"]
    assert result["cpus"] == [bench.cpu_model()]
    assert json.loads((runs / "dt-seed0" / "devices.json").read_text()) == [
        {"device": "cpu", "gpu": None, "cpu": bench.cpu_model()}]

    # The compute-matched DT trained for DMM's training seconds at DT's measured seconds per step.
    dmm = json.loads((runs / "dmm-seed0" / "result.json").read_text())
    matched = json.loads((runs / "dt-matched-seed0" / "result.json").read_text())
    assert matched["steps"] == max(1, round(dmm["train_seconds"] / (result["train_seconds"] / result["steps"])))
    assert json.loads((runs / "dt-matched-seed0" / "model.json").read_text())["step"] == matched["steps"]

    # Started again with the same settings: nothing is retrained, the same line comes back.
    stamps = {path: path.stat().st_mtime_ns for path in runs.glob("*/model.pt")}
    assert len(stamps) == 5
    capsys.readouterr()
    assert bench.main(argv) == line
    # Its summary on stdout: one seed shows no spread (a "± 0.0" would read as a measured one).
    summary = {row.split("  ")[0].strip(): row for row in capsys.readouterr().out.splitlines() if " ms/step " in row}
    assert set(summary) == {"DMM", "DMamba", "BC", "DT", "DT (DMM's wall time)"}
    assert "last " in summary["DT"] and "(one seed)" in summary["DT"] and "±" not in summary["DT"]
    assert stamps == {path: path.stat().st_mtime_ns for path in runs.glob("*/model.pt")}

    # --report-only with a seed never trained: the table keeps the finished runs and names the others.
    assert bench.main([*replace_option(argv, "--seeds", "0", "1"), "--report-only"]) == line
    assert not any(runs.glob("*-seed1"))
    assert "Partial: not finished and left out: dmm-seed1, dmamba-seed1, bc-seed1, dt-seed1" in benchmarks.read_text()
    with pytest.raises(DMMError, match="no finished run"):
        bench.main([*replace_option(argv, "--out", str(tmp_path / "empty")), "--report-only"])
    with pytest.raises(DMMError, match="steps=4"):
        bench.main(replace_option(argv, "--steps", "5"))


def test_print_commands_lists_one_resumable_command_per_run(tmp_path, dataset, capsys, restore_threads):
    bench = load_bench()
    argv = bench_argv(dataset, tmp_path / "bench", tmp_path / "BENCHMARKS.md", "--model-seeds", "dt=0")
    argv = replace_option(argv, "--seeds", "0", "1")
    assert bench.main([*argv, "--print-commands"]) is None
    lines = capsys.readouterr().out.splitlines()
    names = [shlex.split(line)[-1] for line in lines]
    assert names == ["dmm-seed0", "dmm-seed1", "dmamba-seed0", "dmamba-seed1", "bc-seed0", "bc-seed1", "dt-seed0",
                     "dt-matched-seed0"]  # the dt-matched one last: it reads the others
    command = shlex.split(lines[0])
    assert command[:2] == ["python", "bench/quality.py"] and command[-2] == "--run"
    for option, value in (("--steps", "4"), ("--model-steps", "dt=2"), ("--model-seeds", "dt=0"),
                          ("--out", str(tmp_path / "bench")), ("--threads", "1"), ("--dataset", str(dataset))):
        assert command[command.index(option) + 1] == value, option
    assert not (tmp_path / "bench").exists()  # printing trains nothing

    assert bench.main([*argv, "--print-commands", "matched"]) is None
    assert [shlex.split(line)[-1] for line in capsys.readouterr().out.splitlines()] == ["dt-matched-seed0"]
    # A dt-matched run started before the DMM runs finished is refused with what to do.
    with pytest.raises(DMMError, match="DMM runs dmm-seed0, dmm-seed1 are not finished"):
        bench.main([*argv, "--run", "dt-matched-seed0"])
    with pytest.raises(DMMError, match="expected runs of this bench"):
        bench.main([*argv, "--run", "dmm-seed7"])


def test_a_kind_can_train_on_another_device_and_the_table_says_so(tmp_path, dataset, capsys, restore_threads):
    bench = load_bench()
    argv = bench_argv(dataset, tmp_path / "bench", tmp_path / "BENCHMARKS.md", "--model-device", "dt=cuda")
    assert bench.main([*argv, "--print-commands"]) is None
    for line in capsys.readouterr().out.splitlines():
        command = shlex.split(line)
        assert command[command.index("--model-device") + 1] == "dt=cuda"
    with pytest.raises(DMMError, match="--model-device dt=gpu0; expected cpu, cuda or cuda:N"):
        bench.main(replace_option(argv, "--model-device", "dt=gpu0"))
    with pytest.raises(DMMError, match="--model-device tpu=cuda; expected KIND=VALUE"):
        bench.main(replace_option(argv, "--model-device", "tpu=cuda"))
    # A wall time on the CPU is no budget on a GPU: the compute-matched DT needs both on one device.
    with pytest.raises(DMMError, match="DMM and DT train on cpu and cuda here"):
        bench.main([*argv, "--run", "dt-matched-seed0"])

    # The table names a row's devices (and the GPU), and keeps the quality line's plain names.
    results = [finished_run("dt", 0, 50.0, context_len=20, official=60.0, devices=["cpu", "cuda"],
                            gpus=["NVIDIA H200"]),
               finished_run("bc", 0, 40.0, official=45.0)]
    rows = bench.summarize(results, ["bc", "dt"])
    assert [row["name"] for row in rows] == ["BC", "DT [cpu + cuda: NVIDIA H200]"]
    assert bench.quality_line(rows, DATASET_ID, 4).endswith("(last checkpoint, 1 seed): BC=40.0 DT=50.0")


def test_the_quality_line_counts_the_seeds_every_compared_model_has():
    bench = load_bench()
    # BC has three seeds, DMM one so far, DT one by design: the line claims one seed, not three.
    results = [finished_run("bc", seed, 40.0 + seed) for seed in range(3)]
    results += [finished_run("dmm", 0, 60.0), finished_run("dt", 0, 50.0)]
    rows = bench.summarize(results, ["dmm", "bc", "dt"])
    assert bench.quality_line(rows, DATASET_ID, 4).endswith("(last checkpoint, 1 seed): DMM=60.0 BC=41.0 DT=50.0")
    # Once DMM has its three seeds, DT's single seed does not lower N.
    results += [finished_run("dmm", seed, 60.0) for seed in (1, 2)]
    rows = bench.summarize(results, ["dmm", "bc", "dt"])
    assert bench.quality_line(rows, DATASET_ID, 4).endswith("(last checkpoint, 3 seeds): DMM=60.0 BC=41.0 DT=50.0")


def test_a_table_of_runs_from_several_machines_names_each_runs_cpu():
    """A bench carried between machines: its costs are figures of each run's own machine, so the table names
    the CPU of every run (runs recorded before CPUs were, as such) instead of the machine that wrote it."""
    bench = load_bench()
    results = [finished_run("dmm", 0, 80.0, cpus=["Old CPU"]), finished_run("dmm", 1, 82.0),
               finished_run("bc", 0, 40.0, cpus=["New CPU"]), finished_run("dmm", 2, 81.0, cpus=["New CPU"])]
    line = bench.machines_line(results, "This CPU, 2 CPUs")
    assert line == ("- Machines: each run's ms/step and hours were measured on the machine it trained on (a row "
                    "whose runs trained on different CPUs mixes them): Old CPU: dmm-seed0; "
                    f"{bench.UNRECORDED_CPU}: dmm-seed1; New CPU: bc-seed0, dmm-seed2. "
                    "Table written on: This CPU, 2 CPUs")
    here = [finished_run("bc", 0, 40.0, cpus=[bench.cpu_model()])]
    assert bench.machines_line(here, "This CPU, 2 CPUs") == "- Machine: This CPU, 2 CPUs"


def test_the_compute_matched_dt_takes_dmms_wall_time_on_dts_machine(tmp_path, dataset, restore_threads):
    """DMM's seconds for the dt-matched run come from the DMM runs that trained on DT's CPU where there are
    such runs (a wall time on one machine is no budget on another), else from every DMM run."""
    bench = load_bench()
    out = tmp_path / "bench"
    runs = bench.plan_runs(bench.parse_args(bench_argv(dataset, out, tmp_path / "BENCHMARKS.md")))
    runs = [*runs, {**next(run for run in runs if run["name"] == "dmm-seed0"), "name": "dmm-seed1", "seed": 1}]
    for name, seconds, cpu in (("dmm-seed0", 600.0, "Slow CPU"), ("dmm-seed1", 200.0, "Fast CPU")):
        (out / name).mkdir(parents=True)
        (out / name / "result.json").write_text(json.dumps({"train_seconds": seconds, "cpus": [cpu]}))
    dt = out / "dt-seed0"
    dt.mkdir()
    (dt / "metrics.jsonl").write_text(json.dumps({"step": 100, "train_seconds": 50.0}) + "\n")  # 0.5 s/step
    (dt / "devices.json").write_text(json.dumps([{"device": "cpu", "gpu": None, "cpu": "Fast CPU"}]))
    assert bench.matched_steps(out, runs) == 400  # dmm-seed1's 200 s at DT's 0.5 s/step, on the same CPU
    (dt / "devices.json").write_text(json.dumps([{"device": "cpu", "gpu": None, "cpu": "Third CPU"}]))
    assert bench.matched_steps(out, runs) == 800  # no DMM run on DT's CPU: the mean of all, 400 s


@pytest.mark.slow
def test_jobs_run_several_commands_at_once_and_build_the_table(tmp_path, dataset, restore_threads):
    bench = load_bench()
    benchmarks = tmp_path / "BENCHMARKS.md"
    argv = replace_option(bench_argv(dataset, tmp_path / "bench", benchmarks, "--jobs", "2"), "--seeds", "0", "1")
    # Chosen runs with --jobs go as child commands too (each writes its own log), and no table yet.
    assert bench.main([*argv, "--models", "bc", "--run", "bc-seed0", "--run", "bc-seed1"]) is None
    assert not benchmarks.exists() and len(list((tmp_path / "bench").glob("bc-seed*/bench.log"))) == 2
    stamps = {path: path.stat().st_mtime_ns for path in (tmp_path / "bench").glob("bc-seed*/model.pt")}
    assert len(stamps) == 2
    line = bench.main([*argv, "--models", "bc"])
    assert stamps == {path: path.stat().st_mtime_ns for path in stamps}  # reused, not retrained
    assert "(last checkpoint, 2 seeds): BC=" in line
    for seed in (0, 1):
        run = tmp_path / "bench" / f"bc-seed{seed}"
        assert json.loads((run / "result.json").read_text())["seed"] == seed
        assert "bc-seed" in (run / "bench.log").read_text()  # each child's output in its own log
    assert "up to 2 run(s) at once" in benchmarks.read_text()


@pytest.mark.slow
def test_jobs_continue_a_carried_run_before_starting_fresh_ones(tmp_path, dataset, capsys, restore_threads):
    """A sweep restarted with a run half done (as after a session ends) finishes that run first,
    ahead of the longest fresh one (DT); the fresh ones then go longest first."""
    bench = load_bench()
    runs = tmp_path / "bench"
    argv = replace_option(replace_option(bench_argv(dataset, runs, tmp_path / "BENCHMARKS.md"), "--steps", "400"),
                          "--model-steps", "dt=400")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "bench/quality.py", *argv, "--run", "bc-seed0"], cwd=REPO_ROOT,
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record_file = runs / "bc-seed0" / "model.json"  # the last file of a resume point
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if record_file.exists() and json.loads(record_file.read_text())["step"] >= 2:
            break
        time.sleep(0.05)
    capsys.readouterr()
    bench.main([*argv, "--status"])  # while it trains: said to be running, in that process
    status = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert status["bc-seed0"].startswith(f"running now (process {process.pid}), at step ")
    assert status["dmm-seed0"] == "not started (400 steps)"
    bench.main([*argv, "--status"])  # killed: carried, continued from its resume point
    status = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    carried = r"at step \d+ of 400 steps(, about .* left at its speed so far)?; continues from resume.pt"
    assert re.match(carried, status["bc-seed0"]), status["bc-seed0"]

    planned = bench.plan_runs(bench.parse_args(argv))
    order = [run["name"] for run in bench.start_order(planned, runs)]
    assert order[0] == "bc-seed0"  # carried: first, although BC is the cheapest kind
    assert order[1] == "dt-seed0" and order.index("bc-seed0") < order.index("dmm-seed0")
    fresh = [run["name"] for run in bench.start_order(planned, tmp_path / "nothing")]
    assert fresh[0] == "dt-seed0" and fresh.index("bc-seed0") > fresh.index("dmamba-seed0")


def test_each_preset_benches_its_own_medium_dataset_in_a_folder_per_budget(
        tmp_path, monkeypatch, capsys, restore_threads):
    """Without --dataset, --preset walker2d benches walker2d-medium (not Hopper's data), and the default
    runs folder names the budget, so benches of one dataset at two budgets never share runs."""
    bench = load_bench()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    from dmm_train.recipes import RECIPES, collect_recipe

    collect_recipe("walker2d-medium", steps=300, progress=False, workers=1)  # a small stand-in under the real id
    assert bench.main(["--preset", "walker2d", "--steps", "4", "--seeds", "0", "--models", "bc",
                       "--print-commands"]) is None
    command = shlex.split(capsys.readouterr().out.splitlines()[0])
    assert command[command.index("--dataset") + 1] == RECIPES["walker2d-medium"].dataset_id
    assert command[command.index("--preset") + 1] == "walker2d"
    expected_out = f"runs/quality/{RECIPES['walker2d-medium'].dataset_id.replace('/', '--')}-4steps"
    assert command[command.index("--out") + 1] == expected_out


def test_each_comparison_carries_its_interval_and_the_word_follows_from_it():
    bench = load_bench()
    # Welch by hand: difference -3, each side's variance of the mean 1/3, df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4,
    # t(0.975, 4) = 2.7764, half-width 2.7764 * sqrt(2/3).
    interval = bench.difference_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert interval["df"] == pytest.approx(4.0)
    assert (interval["low"], interval["high"]) == pytest.approx((-3 - 2.7764 * (2 / 3) ** 0.5,
                                                                 -3 + 2.7764 * (2 / 3) ** 0.5), abs=1e-3)
    assert interval["word"] == "behind"
    # The same means with a spread that covers zero are level, whatever the means say.
    assert bench.difference_interval([0.0, 2.0, 7.0], [4.0, 5.0, 6.0])["word"] == "level"
    assert bench.difference_interval([9.0, 10.0, 11.0], [4.0, 5.0, 6.0])["word"] == "ahead"
    # One seed on one side: it is taken to spread as the other side, on that side's n - 1 degrees of freedom.
    single = bench.difference_interval([1.0, 2.0, 3.0], [10.0])
    assert single["df"] == 2
    assert single["high"] - single["difference"] == pytest.approx(4.3027 * (4 / 3) ** 0.5, abs=1e-3)
    assert bench.difference_interval([1.0], [2.0]) is None  # no spread on either side: no interval, no word
    # Welch's df is fractional: its quantile lies between those of the whole numbers around it.
    uneven = bench.difference_interval([1.0, 2.0, 3.0], [0.0, 10.0, 20.0])
    assert 2 < uneven["df"] < 3
    half = uneven["high"] - uneven["difference"]
    assert 3.182 * (1 / 3 + 100 / 3) ** 0.5 < half < 4.303 * (1 / 3 + 100 / 3) ** 0.5


def test_the_table_shows_the_mean_of_the_last_evaluations_and_the_comparisons():
    bench = load_bench()

    def evaluations(*scores):
        return [{"step": i, "report": [{"target_return": 3600.0, "normalized_mean": s}]} for i, s in enumerate(scores)]

    results = [finished_run("dmm", seed, 80.0 + seed, evaluations=evaluations(10.0, 70.0, 80.0, 80.0 + seed))
               for seed in range(3)]
    results += [finished_run("bc", seed, 40.0 + seed) for seed in range(3)]
    rows = bench.summarize(results, ["dmm", "bc"])
    assert rows[0]["last3"][0] == pytest.approx((70 + 80 + 81) / 3)  # the last three evaluations, not the first
    assert rows[1]["last3"][0] == pytest.approx(41.0)  # a result without evaluations: its last checkpoint
    lines = bench.comparison_lines(rows)
    assert len(lines) == 1 and lines[0].startswith("- DMM − BC (3 against 3 seeds): last checkpoint +40.0 (95% "
                                                   "interval +37.7 .. +42.3): **ahead**; mean of the last 3 ")


def test_report_only_writes_the_table_from_the_records_without_the_dataset(tmp_path, monkeypatch, restore_threads):
    """A bench carried to another machine: its table is rewritten from bench.json and the runs' records alone,
    with the dataset nowhere in the store (regenerating a 1M-step dataset just to print a table is not needed)."""
    bench = load_bench()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty-store"))
    out, benchmarks = tmp_path / "bench", tmp_path / "BENCHMARKS.md"
    settings = {"preset": "hopper", "dataset_id": "test/not-in-any-store-v0", "dataset_hash": "ab" * 32,
                "dataset_spec": "test/not-in-any-store-v0", "dataset_episodes": 3, "dataset_steps": 30, "steps": 4,
                "batch_size": 8, "episodes": 1, "selection_episodes": 1, "evaluations": 2,
                "report_seed": bench.REPORT_EVAL_SEED, "selection_seed": bench.SELECTION_EVAL_SEED,
                "checkpoint_every": 2}
    for seed in (0, 1):
        (out / f"bc-seed{seed}").mkdir(parents=True)
        result = {**finished_run("bc", seed, 40.0 + seed), "format": bench.RESULT_FORMAT}
        (out / f"bc-seed{seed}" / "result.json").write_text(json.dumps(result))
    (out / "bench.json").write_text(json.dumps(settings))
    line = bench.main(["--dataset", "test/not-in-any-store-v0", "--models", "bc", "--seeds", "0", "1", "--steps",
                       "4", "--episodes", "1", "--selection-episodes", "1", "--evaluations", "2", "--batch-size",
                       "8", "--checkpoint-every", "2", "--out", str(out), "--benchmarks", str(benchmarks),
                       "--report-only"])
    assert line == "quality on test/not-in-any-store-v0 @ 4 steps (last checkpoint, 2 seeds): BC=40.5"
    assert "content hash abababababab" in benchmarks.read_text()
    # Other options than the recorded ones are still refused, as for a bench that trains.
    with pytest.raises(DMMError, match="batch_size=8"):
        bench.main(["--dataset", "test/not-in-any-store-v0", "--models", "bc", "--seeds", "0", "1", "--steps", "4",
                    "--episodes", "1", "--selection-episodes", "1", "--evaluations", "2", "--batch-size", "16",
                    "--checkpoint-every", "2", "--out", str(out), "--benchmarks", str(benchmarks), "--report-only"])
