"""A Cluster's watch-fed job statuses across real agents on loopback: polls without
RPCs (counted by the agents' own Prometheus metrics), changes within a deadline, lost
agents as that node's error, fresh polls, kill then poll, wait, closing and eviction."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers.agents import Agent, agents, closed_port, start_agent
from helpers.wait import wait_until
from helpers.workers import GATED
from prometheus_client.parser import text_string_to_metric_families

from rankd.client import (
    AgentClient,
    AgentTimeout,
    AgentUnavailable,
    AsyncCluster,
    Cluster,
    JobNotFound,
    watches,
)
from rankd.client import cluster as cluster_module
from rankd.v1 import agent_pb2 as pb

PY = sys.executable


class Observed:
    """A real agent with its Prometheus endpoint on a known port."""

    def __init__(self, log_dir: Path) -> None:
        self.metrics_port = closed_port()
        self.agent = start_agent(log_dir, "--metrics-port", str(self.metrics_port))
        self.address = self.agent.address

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def polls(self) -> float:
        return self.metric("rankd_rpc_duration_seconds_count", method="Poll")

    def watches(self) -> float:
        return self.metric("rankd_active_watches")


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[list[Observed]]:
    started: list[Observed] = []
    try:
        for i in range(3):
            started.append(Observed(tmp_path / f"node{i}"))
        yield started
    finally:
        for node in started:
            node.agent.stop()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Agent]]:
    with agents(tmp_path, 3) as started:
        yield started


def start_everywhere(
    addresses: list[str], job_id: str, entrypoint: str, *args: str, restart_count: int = 0
) -> None:
    spec = pb.JobSpec(
        job_id=job_id, nprocs=1, entrypoint=entrypoint, args=args, restart_count=restart_count
    )
    for address in addresses:
        with AgentClient(address) as client:
            client.start(spec)


def gated(tmp_path: Path) -> tuple[str, str]:
    path = tmp_path / "gated.py"
    path.write_text(GATED)
    return str(path), str(tmp_path / "go")


@pytest.mark.timeout(60)
def test_poll_is_served_from_the_watches_without_any_rpc(observed: list[Observed]) -> None:
    addresses = [o.address for o in observed]
    start_everywhere(addresses, "quiet", "/bin/sleep", "60")
    with Cluster(addresses) as cluster:
        assert cluster.watch("quiet", timeout=10)
        assert [o.watches() for o in observed] == [1, 1, 1]
        before = [o.polls() for o in observed]
        for _ in range(50):
            results = cluster.poll("quiet")
            assert [r.unwrap().state for r in results] == [pb.RUNNING] * 3
            assert [r.node_rank for r in results] == [0, 1, 2]
            assert [r.node for r in results] == cluster.nodes
        assert [o.polls() for o in observed] == before  # not one Poll RPC
        # A caller may change its copy: the cluster's view stays intact.
        results[0].unwrap().state = pb.FAILED
        assert cluster.poll("quiet")[0].unwrap().state == pb.RUNNING

        fresh = cluster.poll("quiet", fresh=True)
        assert [r.unwrap().state for r in fresh] == [pb.RUNNING] * 3
        assert [o.polls() for o in observed] == [b + 1 for b in before]
    wait_until(lambda: [o.watches() for o in observed] == [0, 0, 0], 10, "the watches to end")


@pytest.mark.timeout(60)
def test_a_rank_exit_on_one_agent_shows_up_in_poll(nodes: list[Agent], tmp_path: Path) -> None:
    worker, gate = gated(tmp_path)
    addresses = [a.address for a in nodes]
    for i, address in enumerate(addresses):
        start_everywhere([address], "exit-one", PY, worker, f"{gate}{i}")
    with Cluster(addresses) as cluster:
        assert cluster.watch("exit-one", timeout=10)
        Path(f"{gate}1-0").touch()
        began = time.monotonic()

        def node1_ended() -> bool:
            return cluster.poll("exit-one")[1].unwrap().ranks[0].state == pb.RANK_SUCCEEDED

        wait_until(node1_ended, 10, "node 1's rank exit in the cluster's view")
        assert time.monotonic() - began < 5
        view = cluster.poll("exit-one")
        assert [r.unwrap().state for r in view] == [pb.RUNNING, pb.SUCCEEDED, pb.RUNNING]
        for i in (0, 2):
            Path(f"{gate}{i}-0").touch()
        finals = cluster.wait("exit-one", timeout=20)
        assert [r.unwrap().state for r in finals] == [pb.SUCCEEDED] * 3
        assert all(r.unwrap().ranks[0].exit_code == 0 for r in finals)


@pytest.mark.timeout(90)
def test_an_agent_killed_mid_watch_is_that_nodes_error(nodes: list[Agent], tmp_path: Path) -> None:
    addresses = [a.address for a in nodes]
    start_everywhere(addresses, "victim", "/bin/sleep", "60")
    try:
        with Cluster(addresses, timeout=3) as cluster:
            assert cluster.watch("victim", timeout=10)
            os.kill(nodes[1].proc.pid, signal.SIGKILL)
            nodes[1].proc.wait(10)

            def node1_failed() -> bool:
                began = time.monotonic()
                results = cluster.poll("victim")
                assert time.monotonic() - began < 5  # never a hang
                assert results[0].ok and results[2].ok
                return isinstance(results[1].error, AgentUnavailable)

            wait_until(node1_failed, 15, "node 1's error")
            results = cluster.poll("victim")
            assert [r.ok for r in results] == [True, False, True]
            assert nodes[1].address in str(results[1].error)
            with pytest.raises(AgentUnavailable):
                results[1].unwrap()
            assert [r.unwrap().state for r in (results[0], results[2])] == [pb.RUNNING] * 2
    finally:  # the dead agent's ranks are not ours to leave behind
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                error_file = proc.environ().get("TORCHELASTIC_ERROR_FILE", "")
                if error_file.startswith(str(nodes[1].log_dir)):
                    proc.kill()


@pytest.mark.timeout(90)
def test_a_silent_agent_is_noticed_and_a_recovered_one_rejoins(
    nodes: list[Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watches, "HEARTBEAT", 0.2)
    monkeypatch.setattr(watches, "STALE_AFTER", 1.0)
    addresses = [a.address for a in nodes]
    start_everywhere(addresses, "frozen", "/bin/sleep", "60")
    with Cluster(addresses, timeout=1) as cluster:
        assert cluster.watch("frozen", timeout=10)
        os.kill(nodes[2].proc.pid, signal.SIGSTOP)  # connection open, nothing sent
        try:
            wait_until(
                lambda: isinstance(cluster.poll("frozen")[2].error, AgentTimeout),
                15,
                "the silent node to time out",
            )
            assert all(r.ok for r in cluster.poll("frozen")[:2])
        finally:
            os.kill(nodes[2].proc.pid, signal.SIGCONT)
        wait_until(lambda: cluster.watch("frozen", timeout=1), 20, "the watch to come back")
        assert [r.unwrap().state for r in cluster.poll("frozen")] == [pb.RUNNING] * 3


@pytest.mark.timeout(60)
def test_kill_then_poll_reads_its_own_write(nodes: list[Agent]) -> None:
    addresses = [a.address for a in nodes]
    start_everywhere(addresses, "rw", "/bin/sleep", "60")
    with Cluster(addresses) as cluster:
        assert cluster.watch("rw", timeout=10)
        killed = cluster.kill("rw", timeout=5)
        assert all(r.ok for r in killed)
        view = cluster.poll("rw")  # at once: no push needed to see the kill's answer
        assert [r.unwrap().state for r in view] == [pb.KILLED] * 3
        assert all(r.unwrap().ranks[0].HasField("exit_code") for r in view)


@pytest.mark.timeout(60)
def test_a_restarted_attempt_reaches_the_view(nodes: list[Agent], tmp_path: Path) -> None:
    worker, gate = gated(tmp_path)
    addresses = [a.address for a in nodes]
    start_everywhere(addresses, "retry", PY, worker, gate)
    with Cluster(addresses) as cluster:
        assert cluster.watch("retry", timeout=10)
        Path(f"{gate}-0").touch()
        finals = cluster.wait("retry", timeout=20)
        assert [r.unwrap().restart_count for r in finals] == [0] * 3
        start_everywhere(addresses, "retry", "/bin/sleep", "60", restart_count=1)

        def restarted() -> bool:
            view = cluster.poll("retry")
            return all(r.ok and r.unwrap().restart_count == 1 for r in view)

        wait_until(restarted, 10, "attempt 1 in the cluster's view")
        assert [r.unwrap().state for r in cluster.poll("retry")] == [pb.RUNNING] * 3
        cluster.kill("retry", timeout=5)


@pytest.mark.timeout(60)
def test_wait_answers_per_node_errors_and_timeouts(nodes: list[Agent]) -> None:
    live = [a.address for a in nodes[:2]]
    start_everywhere(live, "slow", "/bin/sleep", "60")
    dead = f"127.0.0.1:{closed_port()}"
    with Cluster([*live, dead], timeout=2) as cluster:
        began = time.monotonic()
        results = cluster.wait("slow", timeout=0.5)
        assert time.monotonic() - began < 15
        assert [type(r.error) for r in results[:2]] == [AgentTimeout, AgentTimeout]
        assert "did not end within 0.5s" in str(results[0].error)
        assert isinstance(results[2].error, AgentUnavailable | AgentTimeout)
        missing = cluster.wait("never-started", timeout=5)
        assert [type(r.error) for r in missing[:2]] == [JobNotFound, JobNotFound]


@pytest.mark.timeout(60)
async def test_closing_leaves_no_task_and_no_watch(
    observed: list[Observed], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_module, "MAX_WATCHED_JOBS", 2)
    addresses = [o.address for o in observed]
    for job in ("a", "b", "c"):
        start_everywhere(addresses, job, "/bin/sleep", "60")
    before = asyncio.all_tasks()
    cluster = AsyncCluster(addresses)
    try:
        assert await cluster.watch("a", timeout=10)
        assert await cluster.watch("b", timeout=10)
        assert not await cluster.watch("unknown", timeout=10)  # evicts "a"
        assert all(isinstance(r.error, JobNotFound) for r in await cluster.poll("unknown"))
        assert await cluster.watch("c", timeout=10)  # evicts "b"
        await _until(lambda: [o.watches() for o in observed] == [1, 1, 1], 10)
        assert [r.unwrap().state for r in await cluster.poll("c")] == [pb.RUNNING] * 3
    finally:
        await cluster.close()
    ours = before | {asyncio.current_task()}
    # gRPC settles its own per-call tasks a moment after the channels close (its
    # _handle_status_once_received); ours must all be gone at once
    left = asyncio.all_tasks() - ours
    assert all("_handle_status_once_received" in repr(t) for t in left), left
    deadline = time.monotonic() + 2
    while asyncio.all_tasks() - ours:
        assert time.monotonic() < deadline, asyncio.all_tasks() - ours
        await asyncio.sleep(0.01)
    await _until(lambda: [o.watches() for o in observed] == [0, 0, 0], 10)


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    """Check `predicate` every 20 ms without blocking the loop; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        await asyncio.sleep(0.02)
