"""`python -m bench.run --quick` runs end to end. Asserts only that it runs: timings are
the benchmark's business (`make bench`), never a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS = {
    "start_true",
    "start_python",
    "full_run",
    "full_run_tee",
    "kill",
    "kill_bin",
    "exit_to_poll",
    "exit_floor",
    "line_latency_p50",
    "line_latency_p99",
    "throughput",
    "throughput_vs_bare_grpc",
    "poll_fanout",
    "poll_fanout_futures",
    "idle_cpu",
    "idle_rss",
}


@pytest.mark.timeout(300)
def test_quick_bench_runs_and_reports_every_scenario(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the benchmark compares with torch: make bench installs it")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert {row["id"] for row in report["rows"]} >= ROWS
    assert set(report["scenarios"]) >= {
        "start_true",
        "start_python",
        "full_run",
        "full_run_tee",
        "kill",
        "exit_to_poll",
        "line_latency",
        "throughput",
        "poll_fanout",
        "idle",
    }
    assert len(list(tmp_path.glob("2*.json"))) == 1


def test_bootstrap_interval_brackets_the_figure_and_follows_the_noise() -> None:
    from bench.harness import _STATS, bootstrap_interval

    median = _STATS["median"]
    steady = [1.0] * 9
    assert bootstrap_interval(steady, median, steady) == (1.0, 1.0)
    assert bootstrap_interval([1.0, 2.0], median, steady) is None  # too few to say
    noisy = [1.8, 2.0, 2.2, 1.9, 2.1, 2.05, 1.95, 2.4, 1.6]
    low, high = bootstrap_interval(noisy, median, steady) or (0.0, 0.0)
    assert 1.6 <= low <= 2.0 <= high <= 2.4  # around the ratio 2.0, within the samples
    assert bootstrap_interval(noisy, median, steady) == (low, high)  # seeded: repeatable
    own = bootstrap_interval(noisy, median)
    assert own is not None and own[0] <= median(noisy) <= own[1]
    wider = [0.5, 3.5, 2.0, 1.0, 3.0, 2.0, 0.8, 3.2, 2.0]
    wlow, whigh = bootstrap_interval(wider, median, steady) or (0.0, 0.0)
    assert whigh - wlow > high - low  # more noise, wider interval
    assert bootstrap_interval(noisy, median, [0.0] * 9) is None  # no ratio to a zero


def test_rows_carry_the_interval_and_the_table_shows_it() -> None:
    from bench.harness import RowSpec, Target, _evaluate
    from bench.run import render

    samples = {
        "rankd": {"t": [2.0, 2.1, 1.9, 2.2, 1.8, 2.0, 2.05]},
        "torch": {"t": [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0]},
    }
    ratio_row = _evaluate(
        RowSpec(id="r", title="r", unit="ms", metrics=("t",), target=Target("ratio_max", 1.2)),
        samples,
        True,
    )
    assert ratio_row.ratio is not None and ratio_row.ratio_low is not None
    assert ratio_row.ratio_high is not None
    assert ratio_row.ratio_low <= ratio_row.ratio <= ratio_row.ratio_high
    assert ratio_row.value_low is None  # the target is on the ratio
    own_row = _evaluate(
        RowSpec(id="o", title="o", unit="ms", metrics=("t",), target=Target("max", 5.0)),
        samples,
        True,
    )
    assert own_row.value_low is not None and own_row.value_high is not None
    assert own_row.value_low <= 2.0 <= own_row.value_high
    table = render([ratio_row, own_row])
    assert (
        f"{ratio_row.ratio:.2f}x ({ratio_row.ratio_low:.2f} to {ratio_row.ratio_high:.2f})" in table
    )
    assert "over bootstrap resamples" in table
