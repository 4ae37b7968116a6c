"""bench/quality.py end to end on a tiny budget: every kind trained and evaluated, its section written
between the markers (the rest of BENCHMARKS.md kept), finished runs reused, other settings refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from contract.errors import DMMError
from dmm_train.recipes import collect

REPO_ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
def test_quality_bench_writes_its_section_and_continues_where_it_stopped(tmp_path, restore_threads):
    bench = load_bench()
    dataset = collect("Hopper-v5", "test/quality-hopper-v0", policy="random", episodes=8, seed=4,
                      out=tmp_path / "store")
    benchmarks = tmp_path / "BENCHMARKS.md"
    begin, end, label = bench.section_markers("test/quality-hopper-v0", "dmm-deploy/hopper-medium-v0")
    assert (begin, label) == ("<!-- quality:begin test/quality-hopper-v0 -->", "quality on test/quality-hopper-v0")
    # The default dataset's section (plain markers, the file's one quality: line) is another bench's.
    default_section = f"{bench.BEGIN}\nquality: DMM=1.0\n{bench.END}\n"
    before, after = f"# Benchmarks\n\nintro kept\n\n{default_section}\n", "\n## other bench\n\nkept too\n"
    benchmarks.write_text(f"{before}{begin}\nstale table\n{end}\n{after}")
    argv = ["--dataset", str(dataset), "--steps", "4", "--seeds", "0", "--episodes", "1", "--batch-size", "8",
            "--checkpoint-every", "2", "--out", str(tmp_path / "bench"), "--benchmarks", str(benchmarks),
            "--quiet"]
    line = bench.main(argv)
    assert torch.get_num_threads() == 1  # --threads default
    assert line.startswith("quality: DMM=") and [part.split("=")[0] for part in line.split()[1:]] == [
        "DMM", "DMamba", "DT", "BC"]

    text = benchmarks.read_text()
    assert text.startswith(before) and text.endswith(after) and "stale table" not in text
    section = text[text.index(begin): text.index(end)]
    assert section.rstrip().splitlines()[-1] == line.replace("quality:", f"{label}:")
    assert "| DT | 726,019 | 20 | 4 |" in section and "| DMamba | 50,691 | 8 | 4 |" in section
    assert "smaller budget than the official 100,000" in section and "best over targets" in section

    runs = tmp_path / "bench"
    result = json.loads((runs / "dt-seed0" / "result.json").read_text())
    assert [r["target_return"] for r in result["per_target"]] == [3600.0, 7200.0, 36000.0, 72000.0]
    assert result["last_first_target"] == result["per_target"][0]["normalized_mean"]
    assert result["best_over_targets"] == max(r["normalized_mean"] for r in result["per_target"])

    # Started again with the same settings: nothing is retrained, the same line comes back.
    stamps = {path: path.stat().st_mtime_ns for path in runs.glob("*/model.pt")}
    assert len(stamps) == 4
    assert bench.main(argv) == line
    assert stamps == {path: path.stat().st_mtime_ns for path in runs.glob("*/model.pt")}

    # --report-only with a seed never trained: nothing is trained, the table keeps the finished
    # runs and says it is partial.
    report_argv = [*argv[:argv.index("--seeds") + 1], "0", "1", *argv[argv.index("--seeds") + 2:], "--report-only"]
    assert bench.main(report_argv) == line
    assert not any(runs.glob("*-seed1"))
    assert "partial: 4 of 8 runs finished" in benchmarks.read_text()
    empty = [*argv[:argv.index("--out") + 1], str(tmp_path / "empty"), *argv[argv.index("--out") + 2:],
             "--report-only"]
    with pytest.raises(DMMError, match="no finished run"):
        bench.main(empty)

    changed = [*argv[:argv.index("--steps") + 1], "5", *argv[argv.index("--steps") + 2:]]
    with pytest.raises(DMMError, match="steps=4"):
        bench.main(changed)
