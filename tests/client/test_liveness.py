"""Lost nodes (issue 18): a silent agent (SIGSTOP) and a dead one (SIGKILL) end a launch
within the bound, the report names the node, the healthy nodes' ranks are stopped, and a
node resumed after the launch gave up stops its own ranks (its lease lapsed). Real agents,
real `rankd launch` subprocesses, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers.agents import Agent, start_launch
from helpers.wait import wait_until

from rankd.client import AgentClient, Cluster, NodeLostError
from rankd.client.cli_jobs import EXIT_NODE_LOST
from rankd.client.liveness import REFUSED_GRACE, Liveness
from rankd.client.report import NodeLost, NodeView, build_report
from rankd.v1 import agent_pb2

NODE_TIMEOUT = 2.0
KILL_TIMEOUT = 2.0
LEASE = 3.0
# the launch's own start-up and shutdown on a loaded 2-core machine
SLACK = 2.0

SLEEPER = """\
import time
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "sleeper.py"
    path.write_text(SLEEPER)
    yield str(path)
    for proc in psutil.process_iter():  # a SIGKILLed agent's ranks are not ours to leave
        with contextlib.suppress(psutil.Error):
            if str(path) in " ".join(proc.cmdline()):
                proc.kill()


def launch(nodes: list[Agent], script: str, run_id: str) -> subprocess.Popen[str]:
    """`rankd launch` of 2 sleeping ranks per node, returned once all 4 said ready."""
    return start_launch(
        nodes,
        script,
        run_id,
        *("--node-timeout", str(NODE_TIMEOUT), "--lease", str(LEASE)),
        *("--kill-timeout", str(KILL_TIMEOUT)),
    )


@pytest.mark.timeout(90)
def test_a_silent_node_is_lost_in_time_and_stops_its_ranks_when_it_resumes(
    nodes: list[Agent], sleeper: str
) -> None:
    proc = launch(nodes, sleeper, "silent")
    silent = nodes[1]
    os.kill(silent.pid, signal.SIGSTOP)  # TCP open, nothing answers
    began = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - began
        assert took < NODE_TIMEOUT + KILL_TIMEOUT + SLACK, (took, err)
        assert took >= NODE_TIMEOUT - 0.5, took  # not before the node timeout
        assert proc.returncode == EXIT_NODE_LOST, err
        assert f"FAILED (attempt 0, 4 ranks on 2 nodes): node {silent.address} lost" in err
        assert "Root Cause (first observed failure): a lost node" in err
        assert f"host      : {silent.address} (node rank 1)" in err
        assert "ranks     : 2-3 (global" in err
        assert "no answer for 2 s" in err or "keepalive" in err
        assert "Terminated by rankd" in err and "global ranks 0-1" in err
        assert not nodes[0].workers(sleeper)  # the healthy node's ranks are gone
        assert len(silent.workers(sleeper)) == 2  # ... the silent node's ran on
    finally:
        os.kill(silent.pid, signal.SIGCONT)
    resumed = time.monotonic()
    wait_until(lambda: not silent.workers(sleeper), LEASE + KILL_TIMEOUT + SLACK, "lease stop")
    print(f"launch ended {took:.2f}s after SIGSTOP; ranks gone {time.monotonic() - resumed:.2f}s")
    with Cluster([silent.address]) as cluster:
        status = cluster.poll("silent", fresh=True)[0].unwrap()
    assert status.state == agent_pb2.KILLED
    assert status.reason == f"lease expired: no client for {LEASE:g} s"


@pytest.mark.timeout(90)
def test_a_dead_node_is_lost_within_moments(nodes: list[Agent], sleeper: str) -> None:
    proc = launch(nodes, sleeper, "dead")
    os.kill(nodes[1].pid, signal.SIGKILL)  # connections refused from now on
    began = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - began
    print(f"launch ended {took:.2f}s after SIGKILL")
    assert took < REFUSED_GRACE + 1.0 + KILL_TIMEOUT, (took, err)
    assert proc.returncode == EXIT_NODE_LOST, err
    assert f"node {nodes[1].address} lost: connection refused" in err
    assert "Root Cause (first observed failure): a lost node" in err
    assert not nodes[0].workers(sleeper)


@pytest.mark.timeout(90)
def test_cluster_wait_gives_up_on_a_silent_node_with_the_loss_as_data(
    nodes: list[Agent],
) -> None:
    for i, (agent, seconds) in enumerate(zip(nodes, ("1", "60"), strict=True)):
        with AgentClient(agent.address) as client:
            client.start(
                agent_pb2.JobSpec(
                    job_id="w", nprocs=1, entrypoint="/bin/sleep", args=[seconds], rank_offset=i
                )
            )
    with Cluster([a.address for a in nodes], node_timeout=NODE_TIMEOUT) as cluster:
        assert cluster.watch("w", timeout=10)
        os.kill(nodes[1].pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            results = cluster.wait("w", timeout=30)
            took = time.monotonic() - began
            print(f"wait gave up on the silent node after {took:.2f}s")
            assert took < NODE_TIMEOUT + SLACK, took
            assert results[0].unwrap().state == agent_pb2.SUCCEEDED
            error = results[1].error
            assert isinstance(error, NodeLostError), error
            loss = error.loss
            assert (loss.node_rank, loss.address, loss.global_ranks) == (1, nodes[1].address, (1,))
            assert loss.why == f"no answer for {NODE_TIMEOUT:g} s" or "keepalive" in loss.why
            assert loss.since <= loss.detected <= time.time()
        finally:
            os.kill(nodes[1].pid, signal.SIGCONT)
        cluster.kill("w", timeout=1)


def test_liveness_rules() -> None:
    live = Liveness()
    assert live.verdict(10.0) is None
    live.broke("DEADLINE_EXCEEDED", "slow")  # silence, not a refusal
    assert live.down_since is None
    live.broke("UNAVAILABLE", "Connection refused")
    assert live.verdict(10.0, grace=3600) is None
    why, _ = live.verdict(10.0, grace=0.0) or ("", 0.0)
    assert why.startswith("connection refused")
    live.heard()
    assert live.verdict(10.0, grace=0.0) is None
    why, _ = live.verdict(0.0) or ("", 0.0)
    assert why == "no answer for 0 s"
    # silence counts from when the caller began relying on the node
    assert live.verdict(1.0, since=time.monotonic()) is None
    # ... and not across the caller's own stall; a refused connection counts all the same
    stalled = Liveness()
    stalled.last_heard -= 5.0
    assert stalled.verdict(1.0) is not None
    assert stalled.verdict(1.0, quiet_from=time.monotonic()) is None
    stalled.broke("UNAVAILABLE", "Connection refused")
    why, _ = stalled.verdict(1.0, grace=0.0, quiet_from=time.monotonic()) or ("", 0.0)
    assert why.startswith("connection refused")


# -- the report's rules (pure) ------------------------------------------------------

T0 = 1_800_000_000.0


def _view(i: int) -> NodeView:
    return NodeView(f"h{i}:1", f"h{i}", i, 2 * i)


def _failure(local_rank: int, ts: float, *, terminated: bool) -> agent_pb2.Failure:
    return agent_pb2.Failure(
        local_rank=local_rank,
        pid=100 + local_rank,
        exit_code=-15 if terminated else 3,
        signal_name="SIGTERM" if terminated else "",
        timestamp=ts,
        terminated_by_agent=terminated,
    )


def _lost(since: float) -> NodeLost:
    return NodeLost("h1", "h1:1", 1, (2, 3), "no answer for 10 s", since, since + 10)


def test_a_lost_node_is_the_root_cause_unless_a_rank_failed_first() -> None:
    killed = agent_pb2.JobStatus(failures=[_failure(0, T0 + 5, terminated=True)])
    outcomes = [(_view(0), killed), (_view(1), None)]
    report = build_report("j", outcomes, world_size=4, restart_count=0, lost=[_lost(T0)])
    assert report.root_node is not None and report.root_cause is None
    text = report.format()
    assert "FAILED (attempt 0, 4 ranks on 2 nodes): node h1 lost" in text
    assert "ranks     : 2-3 (global" in text and "lost      : no answer for 10 s" in text
    own = agent_pb2.JobStatus(failures=[_failure(0, T0 - 1, terminated=False)])
    report = build_report(
        "j", [(_view(0), own), (_view(1), None)], world_size=4, restart_count=0, lost=[_lost(T0)]
    )
    assert report.root_node is None and report.root_cause is not None
    assert report.root_cause.global_rank == 0
    assert "Lost nodes:" in report.format() and "node h1 (node rank 1, global ranks 2-3)" in (
        report.format()
    )


def test_a_killed_report_names_who_and_has_no_root_cause() -> None:
    killed = [
        (_view(i), agent_pb2.JobStatus(failures=[_failure(r, T0 + r, terminated=True)]))
        for i, r in ((0, 0), (1, 1))
    ]
    report = build_report(
        "k", killed, world_size=4, restart_count=0, killed_by="killed by Kill(SIGTERM) from bob"
    )
    assert report.state == "KILLED" and report.root_cause is None
    text = report.format()
    assert text.splitlines()[1] == "rankd job k KILLED (attempt 0, 4 ranks on 2 nodes)"
    assert "reason: killed by Kill(SIGTERM) from bob" in text
    assert "Root Cause" not in text and "FAILED" not in text
    # a rank that failed on its own is a failure, whoever killed the rest
    own = [(_view(0), agent_pb2.JobStatus(failures=[_failure(0, T0, terminated=False)]))]
    assert build_report("k", own, world_size=2, restart_count=0, killed_by="x").state == "FAILED"
