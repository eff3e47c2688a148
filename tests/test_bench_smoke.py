"""`python -m bench.run --quick` runs end to end. Asserts only that it runs: timings are
the benchmark's business (`make bench`), never a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "start_true",
    "start_python",
    "full_run",
    "full_run_tee",
    "kill",
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
