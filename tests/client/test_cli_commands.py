"""`rankd status`, `rankd logs`, `rankd kill` (in-process `main`), node sources."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers.agents import PYTHON, Agent, closed_port
from helpers.wait import wait_until
from helpers.workers import write

from rankd.client import Cluster, JobFailed
from rankd.client.cli import main

# Every rank prints, then rank 2 fails once the others have printed (so that no
# rank is stopped before its lines are out).
FAIL_RANK_2 = """\
import os, pathlib, sys, time
rank, marks = os.environ["RANK"], pathlib.Path(sys.argv[1])
print("hello from", rank, flush=True)
print("warn from", rank, file=sys.stderr, flush=True)
(marks / rank).touch()
if rank == "2":
    deadline = time.monotonic() + 30
    while len(list(marks.iterdir())) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    sys.exit(3)
"""

CHATTY_SLEEPER = """\
import os, sys, time
print("ready", os.environ["RANK"], flush=True)
while True:
    time.sleep(0.05)
"""


def node_list(nodes: list[Agent]) -> str:
    return ",".join(a.address for a in nodes)


@pytest.fixture
def failed_job(nodes: list[Agent], tmp_path: Path) -> str:
    script = write(tmp_path, "fail.py", FAIL_RANK_2)
    with Cluster([a.address for a in nodes]) as cluster, pytest.raises(JobFailed):
        (tmp_path / "marks").mkdir()
        cluster.launch(
            [PYTHON, script, str(tmp_path / "marks")],
            nproc_per_node=2,
            run_id="done-job",
            kill_timeout=5,
            on_line=lambda line: None,
        )
    return "done-job"


def test_status_shows_every_node_rank_and_the_report(
    nodes: list[Agent], failed_job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--nodes", node_list(nodes), failed_job], environ={}) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {failed_job}: FAILED, attempt 0, 4 ranks on 2 nodes")
    assert f"node {nodes[1].address} (node rank 1, global ranks 2-3): FAILED" in out
    assert "rank 2 (local 0): FAILED" in out and "exit 3" in out
    assert "Root Cause (first observed failure):" in out
    assert "rank      : 2 (local_rank: 0)" in out

    assert main(["status", "--nodes", node_list(nodes)], environ={}) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:5] == ["JOB", "STATE", "ATTEMPT", "NODES", "RANKS"]
    assert listing[1].split()[:5] == [failed_job, "FAILED", "0", "2", "4"]


def test_logs_by_global_rank_and_stream(
    nodes: list[Agent], failed_job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["logs", "--nodes", node_list(nodes), failed_job]
    assert main([*argv, "--ranks", "1-2"], environ={}) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == [
        "[default1]:hello from 1",
        "[default1]:warn from 1",
        "[default2]:hello from 2",
        "[default2]:warn from 2",
    ]
    assert main([*argv, "--stderr", "--grep", "from 3"], environ={}) == 0
    assert capsys.readouterr().out.splitlines() == ["[default3]:warn from 3"]
    assert main([*argv, "-f", "--stdout", "--attempt", "0"], environ={}) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == [
        f"[default{r}]:hello from {r}" for r in range(4)
    ]


def test_unknown_job_and_dead_nodes_exit_2(
    nodes: list[Agent], capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("status", "logs", "kill"):
        assert main([command, "--nodes", node_list(nodes), "nope"], environ={}) == 2
        err = capsys.readouterr().err
        assert err == "rankd: error: job nope not found on any of the 2 nodes\n"
    dead = f"127.0.0.1:{closed_port()}"
    assert main(["status", "--nodes", dead, "--timeout", "3", "x"], environ={}) == 2
    err = capsys.readouterr().err
    assert dead in err and "unreachable" in err and err.count("\n") == 1


@pytest.mark.timeout(60)
def test_kill_and_follow_a_running_job(
    nodes: list[Agent], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write(tmp_path, "sleep.py", CHATTY_SLEEPER)
    ready: list[int] = []
    outcome: list[BaseException] = []
    with Cluster([a.address for a in nodes]) as cluster:

        def run() -> None:
            try:
                cluster.launch(
                    [PYTHON, script],
                    nproc_per_node=2,
                    run_id="live",
                    kill_timeout=2,
                    on_line=lambda line: ready.append(line.global_rank),
                )
            except BaseException as err:  # the thread's outcome, checked below
                outcome.append(err)

        launcher = threading.Thread(target=run)
        launcher.start()
        try:
            wait_until(lambda: len(ready) == 4, timeout=30, what="4 ranks ready")
            argv = ["--nodes", node_list(nodes), "live"]
            assert main(["logs", *argv], environ={}) == 0
            assert sorted(capsys.readouterr().out.splitlines()) == [
                f"[default{r}]:ready {r}" for r in range(4)
            ]
            assert main(["kill", *argv, "--signal", "SIGUSR2", "--no-escalate"], environ={}) == 0
            # Each node answers with the state right after the signal went out: its ranks
            # still run, unless the launch already saw the other node fail and stopped it
            # (its watch reports a failure within a millisecond or so).
            out = capsys.readouterr().out
            states = [
                s for s in ("RUNNING", "FAILED", "KILLED") for _ in range(out.count(f": {s} ("))
            ]
            assert len(states) == 2 and "RUNNING" in states, out
            # SIGUSR2's default action ends the ranks: that is a failure, the
            # launch stops everything and reports it.
            launcher.join(timeout=30)
            assert not launcher.is_alive()
            assert isinstance(outcome[0], JobFailed)
            assert outcome[0].report.root_cause is not None
            assert outcome[0].report.root_cause.signal_name == "SIGUSR2"
            assert main(["kill", *argv, "--kill-timeout", "1"], environ={}) == 0
            out = capsys.readouterr().out
            assert out.count(": FAILED (2 ranks)") + out.count(": KILLED (2 ranks)") == 2
        finally:
            cluster.kill("live", timeout=1)
            launcher.join(timeout=30)


def test_slurm_nodelist_and_hostfile_sources(
    nodes: list[Agent], failed_job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"SLURM_JOB_NODELIST": "127.0.0.[1]"}
    assert main(["status", "--port", str(nodes[0].port), failed_job], environ=env) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("attempt 0, 2 ranks on 1 node")
    assert "global ranks 0-1" in out

    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"# two agents\n{nodes[0].address}\n\n{nodes[1].address} slots=2\n")
    assert main(["status", "--hostfile", str(hostfile), failed_job], environ={}) == 0
    assert "4 ranks on 2 nodes" in capsys.readouterr().out

    assert main(["status", failed_job], environ={}) == 2
    assert "no nodes given" in capsys.readouterr().err
