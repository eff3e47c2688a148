"""Real torch.distributed jobs (gloo, CPU) on two agents on loopback, launched
through `client.Cluster` and through `rankd launch`: collectives, `@record`
error files, death by signal, restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.agents import PYTHON, Agent
from helpers.torchjobs import (
    ALL_REDUCE,
    FAIL_THEN_SUCCEED,
    GLOO_ENV,
    RECORD_FAIL,
    SEGFAULT,
    attempt_dirs,
    rankd,
)
from helpers.workers import write

from rankd.client import Cluster, JobFailed, OutputLine
from rankd.v1 import agent_pb2

pytest.importorskip("torch", reason="runs torch jobs; the torch extra (make test) installs it")
pytestmark = pytest.mark.timeout(90)

WORLD = 4  # 2 nodes x 2 ranks
SUM = sum(range(1, WORLD + 1))


def addresses(nodes: list[Agent]) -> list[str]:
    return [a.address for a in nodes]


def launch_args(nodes: list[Agent], run_id: str, *extra: str) -> list[str]:
    return [
        "launch",
        "--nodes",
        ",".join(addresses(nodes)),
        "--nproc-per-node",
        "2",
        "--run-id",
        run_id,
        "--kill-timeout",
        "5",
        *(f"--env={k}={v}" for k, v in GLOO_ENV.items()),
        *extra,
    ]


def launch_failing(nodes: list[Agent], script: str, run_id: str) -> JobFailed:
    with Cluster(addresses(nodes)) as cluster, pytest.raises(JobFailed) as failed:
        cluster.launch(
            [PYTHON, script],
            nproc_per_node=2,
            run_id=run_id,
            env=GLOO_ENV,
            kill_timeout=5,
            on_line=lambda line: None,
            on_event=lambda message: None,
        )
    return failed.value


# -- a job that works ------------------------------------------------------------


def test_gloo_all_reduce_through_cluster(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "all_reduce.py", ALL_REDUCE)
    lines: list[OutputLine] = []
    with Cluster(addresses(nodes)) as cluster:
        result = cluster.launch(
            [PYTHON, script],
            nproc_per_node=2,
            run_id="torch-sum",
            env=GLOO_ENV,
            on_line=lines.append,
            on_event=lambda message: None,
        )
    assert result.world_size == WORLD and result.restart_count == 0
    assert [s.state for s in result.statuses] == [agent_pb2.SUCCEEDED] * 2
    printed = sorted((line.global_rank, line.text) for line in lines if line.stream == "stdout")
    assert printed == [(r, f"rank {r} of {WORLD}: all_reduce sum {SUM}") for r in range(WORLD)]
    hosts = {line.global_rank: line.node_rank for line in lines}
    assert hosts == {0: 0, 1: 0, 2: 1, 3: 1}


def test_gloo_all_reduce_through_cli(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "all_reduce.py", ALL_REDUCE)
    done = rankd(*launch_args(nodes, "torch-sum-cli"), "--", PYTHON, script)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [
        f"[default{r}]:rank {r} of {WORLD}: all_reduce sum {SUM}" for r in range(WORLD)
    ]
    assert "job torch-sum-cli succeeded (attempt 0)" in done.stderr


# -- @record: the root cause comes from torch's error file --------------------------


def test_record_error_file_is_the_root_cause(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "record_fail.py", RECORD_FAIL)
    report = launch_failing(nodes, script, "torch-record").report

    root = report.root_cause
    assert root is not None
    assert (root.global_rank, root.local_rank, root.node_rank) == (3, 1, 1)
    assert root.node == nodes[1].address  # both hosts are 127.0.0.1: named by address
    assert not root.terminated
    assert root.exit_code == 1 and root.signal_name == ""
    assert "ValueError: bad batch 42 on rank 3" in root.message
    assert root.summary() == "exit code 1: ValueError: bad batch 42 on rank 3"
    # The traceback is the one @record wrote into TORCHELASTIC_ERROR_FILE.
    error_file = Path(root.error_file)
    assert error_file == attempt_dirs(nodes[1].log_dir, "torch-record")[0] / "1" / "error.json"
    written = json.loads(error_file.read_text())["message"]
    assert written["message"] == "ValueError: bad batch 42 on rank 3"
    assert root.traceback.strip() == written["extraInfo"]["py_callstack"].strip()
    assert 'record_fail.py", line' in root.traceback and "in check_batch" in root.traceback
    assert root.traceback.rstrip().endswith("ValueError: bad batch 42 on rank 3")

    # Every other rank was stopped by rankd: terminated, never a cause.
    assert report.own_failures == []
    assert sorted(f.global_rank for f in report.terminated) == [0, 1, 2]
    assert all(f.terminated and f.signal_name == "SIGTERM" for f in report.terminated)

    text = report.format()
    assert text.index("Root Cause") < text.index("rank      : 3 (local_rank: 1)")
    assert "<NO_OTHER_FAILURES>" in text
    assert "Terminated by rankd (did not fail on their own):" in text
    assert f"global ranks 0-2 ({nodes[0].address}, {nodes[1].address}): Signal 15" in text


def test_record_report_from_the_cli(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "record_fail.py", RECORD_FAIL)
    done = rankd(*launch_args(nodes, "torch-record-cli"), "--", PYTHON, script)
    assert done.returncode == 1
    report = done.stderr[done.stderr.index("=" * 60) :]
    root, _, rest = report.partition("Other Failures:")
    assert "rankd job torch-record-cli FAILED (attempt 0, 4 ranks on 2 nodes)" in root
    assert f"host      : {nodes[1].address} (node rank 1)" in root
    assert "rank      : 3 (local_rank: 1)" in root
    assert "exitcode  : 1 (pid: " in root
    assert "attempt_0/1/error.json" in root
    assert "  traceback : Traceback (most recent call last):" in root
    assert "in check_batch" in root
    # The traceback ends the root-cause entry with the exception line.
    assert root.rstrip().splitlines()[-2].strip() == "ValueError: bad batch 42 on rank 3"
    assert "<NO_OTHER_FAILURES>" in rest
    assert "Terminated by rankd (did not fail on their own):" in rest
    assert "global ranks 0-2" in rest and "Signal 15 (SIGTERM)" in rest
    assert "ValueError" not in rest


# -- death by signal: no error file, the stderr tail instead -------------------------


def test_segfault_names_the_signal_and_shows_stderr(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "segfault.py", SEGFAULT)
    report = launch_failing(nodes, script, "torch-segv").report

    root = report.root_cause
    assert root is not None
    assert (root.global_rank, root.node) == (1, nodes[0].address)
    assert root.exit_code == -11 and root.signal_name == "SIGSEGV"
    assert root.traceback == ""  # no error file: nothing from @record
    assert f"rank 1 saw all_reduce {WORLD}, crashing now" in root.stderr_tail
    assert sorted(f.global_rank for f in report.terminated) == [0, 2, 3]
    assert report.own_failures == []

    text = report.format()
    assert "exitcode  : -11 (pid: " in text and "(SIGSEGV)" in text
    assert "Signal 11 (SIGSEGV) received by PID" in text
    assert "stderr (last lines):" in text
    assert f"rank 1 saw all_reduce {WORLD}, crashing now" in text


# -- restarts --------------------------------------------------------------------------


def test_max_restarts_recovers_and_keeps_both_attempts(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "flaky.py", FAIL_THEN_SUCCEED)
    done = rankd(*launch_args(nodes, "torch-restart", "--max-restarts", "1"), "--", PYTHON, script)
    assert done.returncode == 0, done.stderr
    assert "attempt 0 failed (global rank 1 on" in done.stderr
    assert "restarting (restart 1 of 1)" in done.stderr
    assert "job torch-restart succeeded (attempt 1)" in done.stderr
    for r in range(WORLD):
        assert f"[default{r}]:rank {r} attempt 1 sum {WORLD}" in done.stdout

    for node_rank, agent in enumerate(nodes):
        first, second = attempt_dirs(agent.log_dir, "torch-restart")
        assert (first.name, second.name) == ("attempt_0", "attempt_1")
        for local_rank in range(2):
            rank = node_rank * 2 + local_rank
            old = (first / str(local_rank) / "stdout.log").read_text()
            new = (second / str(local_rank) / "stdout.log").read_text()
            assert f"rank {rank} attempt 0\n" in old
            assert new.splitlines() == [
                f"rank {rank} attempt 1",
                f"rank {rank} attempt 1 sum {WORLD}",
            ]
    failed_stderr = attempt_dirs(nodes[0].log_dir, "torch-restart")[0] / "1" / "stderr.log"
    assert "rank 1 fails in attempt 0" in failed_stderr.read_text()
