"""Leases, detached jobs and kills that say who (issue 18): real agents, real `rankd`
subprocesses, real signals."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers.agents import PYTHON, RANKD_BIN, Agent
from helpers.agents import start_launch as launch_ready
from helpers.wait import wait_until
from helpers.workers import write

from rankd.client import AgentClient, InvalidArgument
from rankd.client.cli_jobs import EXIT_KILLED
from rankd.v1 import agent_pb2

LEASE = 3.0
KILL_TIMEOUT = 2.0
SLACK = 2.0

SLEEPER = """\
import time
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

COUNTER = """\
import os, time
for i in range(5):
    print(f"line {i} of rank {os.environ['RANK']}", flush=True)
    time.sleep(0.3)
"""


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"}


def where(nodes: list[Agent]) -> list[str]:
    return ["--nodes", ",".join(a.address for a in nodes)]


def start_launch(
    nodes: list[Agent], script: str, run_id: str, *flags: str
) -> subprocess.Popen[str]:
    """`rankd launch` of 2 sleeping ranks per node, returned once all 4 said ready."""
    return launch_ready(nodes, script, run_id, "--kill-timeout", str(KILL_TIMEOUT), *flags)


@pytest.mark.timeout(90)
def test_a_launcher_killed_takes_its_job_down_after_its_lease(
    nodes: list[Agent], tmp_path: Path
) -> None:
    script = write(tmp_path, "sleeper.py", SLEEPER)
    proc = start_launch(nodes, script, "orphaned", "--lease", str(LEASE))
    time.sleep(LEASE)  # renewals keep the job alive past one lease
    assert all(len(a.workers(script)) == 2 for a in nodes)
    proc.kill()  # SIGKILL: no cleanup, its renewals stop
    proc.communicate(timeout=10)
    began = time.monotonic()
    for agent in nodes:
        left = LEASE + KILL_TIMEOUT + SLACK - (time.monotonic() - began)
        wait_until(lambda a=agent: not a.workers(script), left, f"{agent.address}'s ranks")  # type: ignore[misc]
    print(f"every rank gone {time.monotonic() - began:.2f}s after the launcher's SIGKILL")
    for agent in nodes:
        with AgentClient(agent.address) as client:
            status = client.poll("orphaned")
        assert status.state == agent_pb2.KILLED
        assert status.reason == f"lease expired: no client for {LEASE:g} s"


@pytest.mark.timeout(90)
def test_rankd_kill_from_another_process_reports_killed_and_who(
    nodes: list[Agent], tmp_path: Path
) -> None:
    script = write(tmp_path, "sleeper.py", SLEEPER)
    proc = start_launch(nodes, script, "k1")
    try:
        done = subprocess.run(
            [RANKD_BIN, "kill", "k1", *where(nodes), "--requester", "alice on the night shift"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env(),
        )
        assert done.returncode == 0, done.stderr
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_KILLED, err
    assert "rankd job k1 KILLED (attempt 0, 4 ranks on 2 nodes)" in err
    assert "reason: killed by Kill(SIGTERM) from alice on the night shift" in err
    assert "Terminated ranks (stopped by the kill, did not fail):" in err
    assert "global ranks 0-3" in err
    assert "Root Cause" not in err and "FAILED" not in err
    assert not any(a.workers(script) for a in nodes)


@pytest.mark.timeout(90)
def test_rankd_kill_names_its_host_and_pid_by_default(nodes: list[Agent]) -> None:
    with AgentClient(nodes[0].address) as client:
        client.start(
            agent_pb2.JobSpec(job_id="who", nprocs=1, entrypoint="/bin/sleep", args=["60"])
        )
    done = subprocess.run(
        [RANKD_BIN, "kill", "who", "--nodes", nodes[0].address],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert done.returncode == 0, done.stderr
    with AgentClient(nodes[0].address) as client:
        status = client.poll("who")
    assert status.state == agent_pb2.KILLED
    assert status.reason.startswith("killed by Kill(SIGTERM) from rankd kill on ")
    assert "(pid " in status.reason


@pytest.mark.timeout(90)
def test_detach_exits_at_once_and_logs_follow_the_job_to_its_end(
    nodes: list[Agent], tmp_path: Path
) -> None:
    script = write(tmp_path, "counter.py", COUNTER)
    began = time.monotonic()
    done = subprocess.run(
        [
            RANKD_BIN,
            "launch",
            *where(nodes),
            "--nproc-per-node",
            "2",
            "--detach",
            "--run-id",
            "bg",
            "--",
            PYTHON,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    took = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert done.stdout == "bg\n"
    assert "rankd logs -f bg --nodes" in done.stderr
    status = subprocess.run(
        [RANKD_BIN, "status", "bg", *where(nodes)], capture_output=True, text=True, env=env()
    )
    assert status.stdout.startswith("job bg: RUNNING"), status.stdout  # it outlived rankd
    follow = subprocess.run(
        [RANKD_BIN, "logs", "-f", "bg", *where(nodes)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert follow.returncode == 0, follow.stderr
    lines = sorted(follow.stdout.splitlines())
    expected = sorted(f"[default{r}]:line {i} of rank {r}" for r in range(4) for i in range(5))
    assert lines == expected
    print(f"--detach returned after {took:.2f}s")
    for agent in nodes:
        with AgentClient(agent.address) as client:
            final = client.poll("bg")
        assert final.state == agent_pb2.SUCCEEDED
        assert final.spec.lease == 0


@pytest.mark.timeout(60)
def test_the_agent_keeps_a_renewed_lease_and_ends_a_lapsed_one(nodes: list[Agent]) -> None:
    spec = agent_pb2.JobSpec(
        job_id="leased", nprocs=1, entrypoint="/bin/sleep", args=["60"], lease=1.0, kill_timeout=1
    )
    with AgentClient(nodes[0].address) as client:
        client.start(spec)
        began = time.monotonic()
        while time.monotonic() - began < 2.5:  # two and a half leases, renewed
            assert 0 < client.renew("leased") <= 1.0
            time.sleep(0.3)
        assert client.poll("leased").state == agent_pb2.RUNNING
        stopped = time.monotonic()
        wait_until(lambda: client.poll("leased").state == agent_pb2.KILLED, 5, "the lease to lapse")
        assert time.monotonic() - stopped >= 0.5
        status = client.poll("leased")
        assert status.reason == "lease expired: no client for 1 s"
        assert client.renew("leased") == 0.0  # ended: nothing to renew
        client.start(
            agent_pb2.JobSpec(job_id="free", nprocs=1, entrypoint="/bin/sleep", args=["60"])
        )
        assert client.renew("free") == 0.0  # no lease
        client.kill("free", timeout=1)


@pytest.mark.parametrize("lease", [-1.0, float("inf"), 86401.0])
def test_a_bad_lease_is_refused_and_starts_nothing(nodes: list[Agent], lease: float) -> None:
    spec = agent_pb2.JobSpec(job_id="bad", nprocs=1, entrypoint="/bin/true", lease=lease)
    with AgentClient(nodes[0].address) as client:
        with pytest.raises(InvalidArgument, match="lease must be"):
            client.start(spec)
        assert all(s.job_id != "bad" for s in client.list())


def test_a_bad_requester_is_refused(nodes: list[Agent]) -> None:
    with AgentClient(nodes[0].address) as client:
        client.start(agent_pb2.JobSpec(job_id="r", nprocs=1, entrypoint="/bin/sleep", args=["60"]))
        with pytest.raises(InvalidArgument, match="requester"):
            client.kill("r", requester="two\nlines")
        assert client.poll("r").state == agent_pb2.RUNNING
        client.kill("r", timeout=1, requester="x" * 300)  # cut to 256 by the client
        assert client.poll("r").reason == "killed by Kill(SIGTERM) from " + "x" * 256


def test_detach_refuses_restarts(nodes: list[Agent]) -> None:
    done = subprocess.run(
        [RANKD_BIN, "launch", *where(nodes), "--detach", "--max-restarts", "1", "--", "/bin/true"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert done.returncode == 2
    assert "a detached job cannot restart" in done.stderr
