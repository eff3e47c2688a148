"""One attempt of a launch on every node: following each node's log stream, watching
every node's liveness, renewing the job's lease, and stopping the attempt everywhere on
the first failure. :mod:`rankd.client.launch` runs attempts one after the other."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import rankd.client.rpc as rpc
from rankd.client.agent_client import AsyncAgentClient
from rankd.client.errors import AgentError, RankdError
from rankd.client.hang import Hang, HangWatch
from rankd.client.membership import Membership
from rankd.client.nodes import Node
from rankd.client.output import RankOutput
from rankd.client.report import FailureReport, NodeLost, NodeView, RankFailure, build_report
from rankd.client.results import NodeResult
from rankd.client.streams import StreamOptions
from rankd.client.torchrun import LaunchConfig, LaunchHooks, Progress
from rankd.client.watches import NodeWatch
from rankd.v1 import agent_pb2

__all__ = ["Attempt", "Fleet", "Host"]

# The agent's reasons for a job it stopped on its own: its shutdown, a lapsed lease.
_NODE_LEVEL = ("agent shutting down", "lease expired")


class Fleet(Protocol):
    """The agents a launch drives (an ``AsyncCluster``): in node order, their
    addresses, display names and clients, and the fanned-out calls it makes."""

    @property
    def nodes(self) -> Sequence[Node]: ...

    @property
    def names(self) -> Sequence[str]: ...

    @property
    def clients(self) -> Sequence[AsyncAgentClient]: ...

    @property
    def timeout(self) -> float: ...

    @property
    def node_timeout(self) -> float: ...

    async def info(self) -> list[NodeResult[agent_pb2.InfoResponse]]: ...

    def node_watches(self, job_id: str) -> list[NodeWatch]: ...

    def watches_of(self, job_id: str) -> list[NodeWatch] | None: ...


class Host(Protocol):
    """What an attempt needs of the launch that runs it."""

    cluster: Fleet
    config: LaunchConfig
    hooks: LaunchHooks
    run_id: str
    nnodes: int
    world_size: int
    interval: float
    output: RankOutput

    @property
    def membership(self) -> Membership:
        """This attempt's layout: member (node) ``i`` of the attempt is group rank ``i``."""
        ...

    def event(self, message: str) -> None: ...

    def stream_options(self, restart_count: int) -> StreamOptions: ...

    async def kill_everywhere(
        self,
        only: Sequence[int] | None = None,
        *,
        skip: set[int] | frozenset[int] = frozenset(),
        why: str = "",
    ) -> dict[int, agent_pb2.JobStatus]: ...


class Attempt:
    """Following, watching and (on failure) stopping one attempt on every node.

    Liveness: a monitor checks every node each tick (:mod:`rankd.client.liveness`);
    every message of a node's log stream is a sign of life, and the agent sends a
    heartbeat on it when the job is quiet, so no Watch is needed for that (watches
    are opened only for progress, ``on_progress``). A lost node's follower is
    cancelled, the node is never called again, and the stop of the job on the other
    nodes goes ahead without it. While the attempt runs, its lease is renewed on
    every node that is not lost."""

    def __init__(self, launch: Host, restart_count: int) -> None:
        self.launch = launch
        self.cluster = launch.cluster
        self.restart_count = restart_count
        n = launch.nnodes
        self.finals: list[agent_pb2.JobStatus | None] = [None] * n
        self.lost: dict[int, NodeLost] = {}
        self.failed = asyncio.Event()
        self.first_failure: str | None = None
        self.killed_by = ""  # a node's reason, when a Kill this launch did not send ended it
        self.began = time.monotonic()
        hang_timeout = launch.config.hang_timeout
        self.hang_watch = (
            HangWatch(self.cluster, launch.run_id, hang_timeout) if hang_timeout > 0 else None
        )
        self.hang: Hang | None = None
        # progress needs every node's watch; else only watches a caller opened
        run_id = launch.run_id
        self.watches = (
            self.cluster.node_watches(run_id)
            if launch.hooks.on_progress is not None
            else self.cluster.watches_of(run_id)
        )

    def fail(self, why: str) -> None:
        if not self.failed.is_set():
            self.first_failure = why
            self.launch.event(f"{why}; stopping job {self.launch.run_id} on every node")
            self.failed.set()

    def lose(self, i: int, why: str, since: float) -> None:
        """Give up on node ``i``: it is never called again in this attempt. Its loss
        dates from when it was last heard from, at the latest: its peers' ranks that
        failed since died of it."""
        if i in self.lost:
            return
        heard = self.cluster.clients[i].liveness.last_heard_wall
        self.lost[i] = NodeLost(
            node=self.cluster.names[i],
            address=str(self.cluster.nodes[i]),
            node_rank=i,
            global_ranks=tuple(self.launch.membership.members[i].global_ranks),
            why=why,
            since=min(since, heard),
            detected=time.time(),
        )
        self.fail(f"node {self.cluster.names[i]} lost: {why}")

    async def follow(self, i: int) -> None:
        client = self.cluster.clients[i]
        try:
            options = self.launch.stream_options(self.restart_count)
            watch = self.hang_watch
            async with client.stream(self.launch.run_id, **options) as lines:
                if self.launch.hooks.on_line is None:  # rendered: no object per line
                    async for chunk in lines.chunks():
                        if watch is not None:
                            watch.saw_output()
                        self.launch.output.chunk(chunk)
                else:
                    async for line in lines:
                        if watch is not None:
                            watch.saw_output()
                        self.launch.output.line(i, line, self.restart_count)
                self.finals[i] = lines.final
        except AgentError as err:
            # a stream that gave up: the node is lost, unless liveness said so first
            self.lose(i, f"its log stream failed: {err.details or err.code}", time.time())
            return
        except Exception as err:
            self.fail(f"error while following {self.cluster.names[i]}: {err!r}")
            raise
        final = self.finals[i]
        assert final is not None  # a follow stream that ran to its end carries the status
        if final.state == agent_pb2.KILLED and not self.failed.is_set():
            # not ours (we kill only after fail()): another client, the lease, the agent
            reason = final.reason or "killed"
            if self.launch.config.nnodes is not None and reason.startswith(_NODE_LEVEL):
                # elastic: the node stopped the job on its own, a node failure to recover
                self.lose(i, f"its agent stopped the job: {reason}", time.time())
                return
            self.killed_by = reason
            self.fail(
                f"job {self.launch.run_id} was killed on {self.cluster.names[i]}: {self.killed_by}"
            )
        elif final.state != agent_pb2.SUCCEEDED:
            self.fail(self.describe_end(i, final))

    def describe_end(self, i: int, final: agent_pb2.JobStatus) -> str:
        """``global rank 3 on host02 failed: exit code 1`` (or the job's reason)."""
        name = self.cluster.names[i]
        own = [f for f in final.failures if not f.terminated_by_agent]
        if own:
            offset = self.launch.membership.members[i].rank_offset
            view = NodeView(str(self.cluster.nodes[i]), name, i, offset)
            failure = RankFailure.from_proto(own[0], view)
            return f"global rank {failure.global_rank} on {name} failed: {failure.summary()}"
        state = agent_pb2.JobState.Name(final.state)
        return f"job {state} on {name}" + (f" ({final.reason})" if final.reason else "")

    async def monitor(self, followers: list[asyncio.Task[None]]) -> None:
        """Liveness of every node still followed, and progress (from the watches).

        A tick that comes late means this loop was starved (thousands of nodes' messages
        at once, a slow ``on_text``): what the nodes sent meanwhile waits unread, so
        their silence is counted again from the end of the stall, not held against them
        (a refused or reset connection still counts at once).
        """
        launch = self.launch
        node_timeout = self.cluster.node_timeout
        tick = min(0.25, node_timeout / 8)
        next_progress = time.monotonic() + launch.interval
        quiet_from = 0.0
        while True:
            due = time.monotonic() + tick
            await asyncio.sleep(tick)
            if time.monotonic() - due > tick:
                quiet_from = time.monotonic()
            for i, follower in enumerate(followers):
                if i in self.lost or follower.done():
                    continue
                verdict = self.cluster.clients[i].liveness.verdict(
                    node_timeout, since=self.began, quiet_from=quiet_from
                )
                if verdict is not None:
                    follower.cancel()
                    self.lose(i, *verdict)
            on_progress = launch.hooks.on_progress
            if on_progress is not None and self.watches and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + launch.interval
                on_progress(self.progress(self.watches))

    def progress(self, watches: Sequence[NodeWatch]) -> Progress:
        counts = dict.fromkeys(range(5), 0)
        down = 0
        for i, watch in enumerate(watches):
            if i in self.lost or not watch.live or watch.status is None:
                down += 1
                continue
            for rank in watch.status.ranks:
                counts[rank.state] = counts.get(rank.state, 0) + 1
        return Progress(
            restart_count=self.restart_count,
            world_size=self.launch.world_size,
            running=counts[agent_pb2.RANK_RUNNING],
            succeeded=counts[agent_pb2.RANK_SUCCEEDED],
            failed=counts[agent_pb2.RANK_FAILED],
            terminated=counts[agent_pb2.RANK_TERMINATED],
            unreachable_nodes=down,
        )

    async def renew(self) -> None:
        """Renew the lease on every node not lost, every third of the lease (the first
        round a third of the lease after the start, which set it)."""
        lease = self.launch.config.lease
        if lease <= 0:
            return
        every = lease / 3
        deadline = min(self.cluster.timeout, self.cluster.node_timeout, every)
        op = rpc.renew(self.launch.run_id, deadline=deadline)

        async def one(i: int) -> None:
            with contextlib.suppress(RankdError):  # liveness has taken note
                await self.cluster.clients[i].call(op)

        while True:
            await asyncio.sleep(every)
            live = [i for i in range(self.launch.nnodes) if i not in self.lost]
            await asyncio.gather(*(one(i) for i in live))

    async def watch_hang(self, watch: HangWatch) -> None:
        """Declare the job hung when no rank wrote for the hang timeout (the stacks are
        taken before the job is stopped)."""
        hang = await watch.run(skip=self.lost.keys())
        if not self.failed.is_set():
            self.hang = hang
            self.fail(hang.title())

    async def stop_on_failure(self) -> None:
        await self.failed.wait()
        ended = [i for i, s in enumerate(self.finals) if s is not None]
        answers = await self.launch.kill_everywhere(
            skip=set(self.lost) | set(ended), why=self.first_failure or ""
        )
        for i, status in answers.items():
            if self.finals[i] is None and status.restart_count == self.restart_count:
                self.finals[i] = status

    async def run(self) -> tuple[agent_pb2.JobStatus, ...] | FailureReport:
        """Each node's final status when every rank succeeded, else the report."""
        n = self.launch.nnodes
        followers = [asyncio.create_task(self.follow(i)) for i in range(n)]
        helpers = [
            asyncio.create_task(self.monitor(followers)),
            asyncio.create_task(self.renew()),
        ]
        if self.hang_watch is not None:
            helpers.append(asyncio.create_task(self.watch_hang(self.hang_watch)))
        stopper = asyncio.create_task(self.stop_on_failure())
        try:
            outcomes = await asyncio.gather(*followers, return_exceptions=True)
            if self.failed.is_set():
                await stopper
            for outcome in outcomes:  # a bug (e.g. in on_line) is not a node failure
                if isinstance(outcome, Exception):
                    await self.launch.kill_everywhere(skip=set(self.lost))
                    await self.settle()  # a poll after the raise reads the kill
                    raise outcome
        finally:
            for task in (*followers, *helpers, stopper):
                task.cancel()
        await self.settle()
        succeeded = [s for s in self.finals if s is not None and s.state == agent_pb2.SUCCEEDED]
        if not self.lost and len(succeeded) == len(self.finals):
            return tuple(succeeded)
        return self.report()

    async def settle(self, timeout: float = 1.0) -> None:
        """Wait (at most ``timeout`` s) until the watch (if open) of every node whose
        end this attempt saw shows that end too, so that a ``poll`` after the launch
        reads it: the watch's push and the log stream's end message travel apart.
        Without watches, a poll opens them and reads the end from the agents."""
        watches = self.watches
        if watches is None:
            return
        deadline = time.monotonic() + timeout

        async def one(watch: NodeWatch) -> None:
            while watch.live and not watch.ended:
                left = deadline - time.monotonic()
                if left <= 0 or not await watch.changed(left):
                    return

        await asyncio.gather(
            *(
                one(watches[i])
                for i, final in enumerate(self.finals)
                if final is not None and i not in self.lost
            )
        )

    def report(self) -> FailureReport:
        views = [
            NodeView(
                address=str(node),
                name=self.cluster.names[i],
                node_rank=i,
                rank_offset=self.launch.membership.members[i].rank_offset,
                clock=self.cluster.clients[i].clock.best,
            )
            for i, node in enumerate(self.cluster.nodes)
        ]
        report = build_report(
            self.launch.run_id,
            list(zip(views, self.finals, strict=True)),
            world_size=self.launch.world_size,
            restart_count=self.restart_count,
            reason=self.first_failure or "",
            lost=list(self.lost.values()),
            killed_by=self.killed_by,
        )
        root = report.root_cause
        own = root is not None and not root.terminated
        if self.hang is None or own or report.root_node is not None:
            return report  # a rank or node that failed before the hang was declared wins
        return replace(
            report,
            state="HUNG",
            root_cause=None,
            close_call=None,
            hang_title=self.hang.title(),
            hang_lines=tuple(self.hang.lines()),
        )
