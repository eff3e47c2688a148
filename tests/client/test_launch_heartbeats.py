"""A launch hears its nodes through their log streams: the agents' stream heartbeats keep
a quiet job's nodes alive with no Watch and no lease renewal, and watches are opened
only for progress. Real agents, real ranks."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from helpers.agents import Agent

from rankd.client import AsyncCluster, Progress
from rankd.v1 import agent_pb2 as pb

# One line, then silence for argv[1] s: several node timeouts without a word.
QUIET = """\
import sys, time
print("started", flush=True)
time.sleep(float(sys.argv[1]))
"""

NODE_TIMEOUT = 1.0


def _quiet(_: object) -> None:
    pass


@pytest.fixture
def quiet_script(tmp_path: Path) -> Path:
    """QUIET, written out."""
    path = tmp_path / "quiet.py"
    path.write_text(QUIET)
    return path


@pytest.mark.timeout(60)
def test_a_quiet_job_outlives_several_node_timeouts_without_watches(
    nodes: list[Agent], quiet_script: Path
) -> None:
    lines: list[str] = []

    async def run() -> None:
        async with AsyncCluster([n.address for n in nodes], node_timeout=NODE_TIMEOUT) as cluster:
            result = await cluster.launch(
                [sys.executable, str(quiet_script), str(3.5 * NODE_TIMEOUT)],
                nproc_per_node=1,
                run_id="quiet",
                lease=0,  # no renewals: only the stream speaks for a node
                on_text=lambda stream, text: lines.append(text),
                on_event=_quiet,
            )
            assert [s.state for s in result.statuses] == [pb.SUCCEEDED] * 2
            assert cluster.watches_of("quiet") is None  # none opened by the launch
            # a poll after the launch opens them and reads the end from the agents
            polled = await cluster.poll("quiet")
            assert [r.unwrap().state for r in polled] == [pb.SUCCEEDED] * 2

    asyncio.run(run())
    assert sorted(lines) == ["[default0]:started\n", "[default1]:started\n"]


@pytest.mark.timeout(60)
def test_progress_opens_the_watches_it_reads(nodes: list[Agent], quiet_script: Path) -> None:
    seen: list[Progress] = []

    async def run() -> None:
        async with AsyncCluster([n.address for n in nodes], node_timeout=NODE_TIMEOUT) as cluster:
            await cluster.launch(
                [sys.executable, str(quiet_script), "1.5"],
                nproc_per_node=2,
                run_id="shown",
                on_progress=seen.append,
                progress_interval=0.2,
                on_line=_quiet,
                on_event=_quiet,
            )
            watches = cluster.watches_of("shown")
            assert watches is not None and all(w.ended for w in watches)

    asyncio.run(run())
    assert any(p.running == 4 for p in seen), seen
    assert all(p.world_size == 4 for p in seen)


@pytest.mark.timeout(60)
def test_a_starved_client_does_not_hold_its_own_stall_against_the_nodes(
    nodes: list[Agent], quiet_script: Path
) -> None:
    # The hook blocks the client's loop for 2.5 node timeouts on the first line (a slow
    # terminal; thousands of nodes' messages at once do the same): the nodes' heartbeats
    # wait unread meanwhile, which is not their silence.
    calls: list[str] = []

    def slow(stream: str, text: str) -> None:
        calls.append(text)
        if len(calls) == 1:
            time.sleep(2.5 * NODE_TIMEOUT)

    async def run() -> None:
        async with AsyncCluster([n.address for n in nodes], node_timeout=NODE_TIMEOUT) as cluster:
            result = await cluster.launch(
                [sys.executable, str(quiet_script), str(4 * NODE_TIMEOUT)],
                nproc_per_node=1,
                run_id="starved",
                on_text=slow,
                on_event=_quiet,
            )
            assert [s.state for s in result.statuses] == [pb.SUCCEEDED] * 2

    asyncio.run(run())
    assert len(calls) == 2


@pytest.mark.timeout(60)
def test_a_wait_does_not_hold_its_own_loops_stall_against_the_nodes(
    nodes: list[Agent], quiet_script: Path
) -> None:
    # A coordinator's own code blocks the loop for 2.5 node timeouts while it waits on a
    # quiet job: the watches' heartbeats wait unread meanwhile, which is not the nodes'
    # silence.
    async def block_once() -> None:
        await asyncio.sleep(0.3)
        time.sleep(2.5 * NODE_TIMEOUT)

    async def run() -> list[int]:
        async with AsyncCluster([n.address for n in nodes], node_timeout=NODE_TIMEOUT) as cluster:
            for client in cluster.clients:
                spec = pb.JobSpec(
                    job_id="waited",
                    nprocs=1,
                    entrypoint=sys.executable,
                    args=[str(quiet_script), str(4 * NODE_TIMEOUT)],
                )
                await client.start(spec)
            blocker = asyncio.create_task(block_once())
            ended = await cluster.wait("waited", timeout=30)
            await blocker
            return [r.unwrap().state for r in ended]

    assert asyncio.run(run()) == [pb.SUCCEEDED] * 2
