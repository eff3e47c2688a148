"""One job across many agents, as torchrun runs one across many processes.

- Global ranks node by node: ``RANK = node_rank * nproc_per_node + local_rank``,
  and the whole torchrun environment on every rank (:func:`torchrun_env`).
- Merged live logs: every node's lines, prefixed with the global rank
  (template ``[${role_name}${rank}]:`` unless another is given; placeholders
  ``${rank}``, ``${local_rank}``, ``${role_name}``, ``${host}``). stdout lines
  go to stdout, stderr lines to stderr; ``redirects`` hides a rank's stream
  from the terminal unless ``tee`` shows it; ``local_ranks_filter`` limits the
  terminal to some local ranks. Every line stays in the agents' log files.
- All-or-nothing: the first failure on any node (a failed rank, a lost agent)
  kills the job on every node (SIGTERM, SIGKILL after ``kill_timeout``).
- Liveness: a node from which nothing arrived for the cluster's ``node_timeout``
  seconds, or whose connection stayed refused for a moment, is lost: it is never
  called again, the stop on the others goes ahead without it (every call there has
  a deadline), and the report names it as the root cause (unless a rank failed on
  its own before it went silent).
- Lease: the launch renews the job's lease (``lease`` seconds) on every node while
  it runs; an agent that hears nothing for that long stops its ranks itself.
- A job that another client kills ends :class:`rankd.client.errors.JobKilled`,
  never failed, and is not restarted. ``detach`` starts the job without a lease
  and returns at once.
- ``max_restarts``: a failed attempt is stopped everywhere and attempt
  ``restart_count + 1`` starts on every node, up to ``max_restarts`` times.
- Failure: :class:`rankd.client.errors.JobFailed` with the :mod:`rankd.client.report`.
- Cancellation (Ctrl-C): the job is killed on every node, then the
  cancellation propagates.

A launch drives a :class:`Fleet`, the few things it needs of an ``AsyncCluster``,
so this module does not depend on the cluster that calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from string import Template
from typing import Protocol

import rankd.client.rpc as rpc
from rankd.client.agent_client import AsyncAgentClient
from rankd.client.errors import (
    AgentError,
    JobFailed,
    JobKilled,
    JobNotFound,
    RankdError,
    cluster_error,
)
from rankd.client.nodes import Node
from rankd.client.report import FailureReport, NodeLost, NodeView, RankFailure, build_report
from rankd.client.results import NodeResult
from rankd.client.streams import StreamOptions, follow_to_end
from rankd.client.torchrun import (
    DEFAULT_PREFIX_TEMPLATE,
    LaunchConfig,
    LaunchHooks,
    LaunchResult,
    OutputLine,
    Progress,
    new_run_id,
    parse_std,
    torchrun_defaults,
    torchrun_env,
)
from rankd.client.watches import NodeWatch
from rankd.v1 import agent_pb2

__all__ = ["Fleet", "run_launch"]

logger = logging.getLogger(__name__)

_STD_BITS = {"stdout": 1, "stderr": 2}


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


class _Launch:
    """The state of one ``launch`` call."""

    def __init__(self, cluster: Fleet, config: LaunchConfig, hooks: LaunchHooks) -> None:
        self.cluster = cluster
        self.config = config
        self.hooks = hooks
        self.run_id = config.run_id or new_run_id()
        self.nnodes = len(cluster.nodes)
        self.world_size = self.nnodes * config.nproc_per_node
        self.template = config.log_line_prefix_template or DEFAULT_PREFIX_TEMPLATE
        self.interval = hooks.progress_interval if hooks.on_progress else 2.0
        self._redirects = parse_std(config.redirects, "redirects")
        self._tee = parse_std(config.tee, "tee")
        self._prefixes: dict[tuple[int, int], str] = {}

    # -- output ---------------------------------------------------------------

    def event(self, message: str) -> None:
        if self.hooks.on_event is not None:
            self.hooks.on_event(message)
        else:
            logger.info("%s", message)

    def visible(self, local_rank: int, stream: str) -> bool:
        """Does this rank's stream reach the terminal? (torchrun's rules)"""
        ranks = self.config.local_ranks_filter
        if ranks and local_rank not in ranks:
            return False
        bit = _STD_BITS[stream]
        return not self._redirects(local_rank) & bit or bool(self._tee(local_rank) & bit)

    def prefix(self, node_rank: int, local_rank: int) -> str:
        key = (node_rank, local_rank)
        if key not in self._prefixes:
            self._prefixes[key] = Template(self.template).safe_substitute(
                role_name=self.config.role_name,
                rank=node_rank * self.config.nproc_per_node + local_rank,
                local_rank=local_rank,
                host=self.cluster.names[node_rank],
            )
        return self._prefixes[key]

    def emit(self, node_rank: int, line: agent_pb2.LogLine, restart_count: int) -> None:
        stream = "stderr" if line.stream == agent_pb2.STDERR else "stdout"
        if not self.visible(line.local_rank, stream):
            return
        prefix = self.prefix(node_rank, line.local_rank)
        if self.hooks.on_line is not None:
            self.hooks.on_line(
                OutputLine(
                    host=self.cluster.names[node_rank],
                    node_rank=node_rank,
                    global_rank=node_rank * self.config.nproc_per_node + line.local_rank,
                    local_rank=line.local_rank,
                    stream=stream,
                    text=line.text,
                    prefix=prefix,
                    partial=line.partial,
                    restart_count=restart_count,
                )
            )
            return
        hooks = self.hooks
        out = (hooks.stderr or sys.stderr) if stream == "stderr" else (hooks.stdout or sys.stdout)
        out.write(f"{prefix}{line.text}\n")
        out.flush()

    # -- specs ----------------------------------------------------------------

    def spec(
        self, node_rank: int, restart_count: int, master_addr: str, port: int
    ) -> agent_pb2.JobSpec:
        cfg = self.config
        common, per_rank = torchrun_env(
            node_rank=node_rank,
            nnodes=self.nnodes,
            nproc_per_node=cfg.nproc_per_node,
            master_addr=master_addr,
            master_port=port,
            run_id=self.run_id,
            restart_count=restart_count,
            max_restarts=cfg.max_restarts,
            role_name=cfg.role_name,
            env=cfg.env,
        )
        spec = agent_pb2.JobSpec(
            job_id=self.run_id,
            nprocs=cfg.nproc_per_node,
            entrypoint=cfg.cmd[0],
            args=list(cfg.cmd[1:]),
            env=common,
            default_env=torchrun_defaults(cfg.nproc_per_node),
            cwd=cfg.cwd,
            role_name=cfg.role_name,
            restart_count=restart_count,
            redirects=cfg.redirects,
            tee=cfg.tee,
            local_ranks_filter=list(cfg.local_ranks_filter),
            # ${host} is ours; the agent renders the rest the same way.
            log_line_prefix_template=self.template.replace(
                "${host}", self.cluster.names[node_rank]
            ),
            rank_offset=node_rank * cfg.nproc_per_node,
            kill_timeout=cfg.kill_timeout,
            lease=0.0 if cfg.detach else cfg.lease,
        )
        for local_rank, env in per_rank.items():
            spec.rank_env[local_rank].env.update(env)
        return spec

    def stream_options(self, restart_count: int) -> StreamOptions:
        """What a node's log stream of this attempt follows: the terminal's lines."""
        streams = [
            s
            for s in ("stdout", "stderr")
            if any(self.visible(r, s) for r in range(self.config.nproc_per_node))
        ]
        options = (
            follow_to_end()  # nothing for the terminal: follow only for the end
            if not streams
            else StreamOptions(
                follow=True, ranks=list(self.config.local_ranks_filter), streams=streams
            )
        )
        options["restart_count"] = restart_count
        return options

    # -- the run ----------------------------------------------------------------

    async def run(self) -> LaunchResult:
        answers = await self.cluster.info()
        errors = {str(r.node): r.error for r in answers if r.error is not None}
        if errors:  # a refusal (token, TLS) is named as such, not as "cannot reach"
            raise cluster_error("cannot reach every node", errors, self.nnodes)
        infos = [r.unwrap() for r in answers]
        await self.cluster.info()  # a second round trip: a tighter clock estimate
        master_addr = self.config.master_addr or self.cluster.nodes[0].host
        restart_count = 0
        if self.config.detach:
            port = self.config.master_port or infos[0].free_port
            self.event(
                f"starting job {self.run_id} detached, {_count(self.world_size, 'rank')} on "
                f"{_count(self.nnodes, 'node')} (MASTER_ADDR={master_addr} MASTER_PORT={port})"
            )
            statuses = await self.start(0, master_addr, port)
            return LaunchResult(self.run_id, 0, self.world_size, tuple(statuses), detached=True)
        try:
            while True:
                port = self.config.master_port or infos[0].free_port
                report = await self.attempt(restart_count, master_addr, port)
                if not isinstance(report, FailureReport):
                    self.event(f"job {self.run_id} succeeded (attempt {restart_count})")
                    return LaunchResult(self.run_id, restart_count, self.world_size, report)
                if report.state == "KILLED":
                    raise JobKilled(report)
                if restart_count >= self.config.max_restarts or report.lost_nodes:
                    raise JobFailed(report)
                restart_count += 1
                self.event(
                    f"attempt {restart_count - 1} failed ({_root_line(report)}); restarting "
                    f"(restart {restart_count} of {self.config.max_restarts})"
                )
                if self.config.master_port is None:
                    fresh = await self.cluster.info()
                    if fresh[0].ok:
                        infos[0] = fresh[0].unwrap()
        except asyncio.CancelledError:
            self.event(f"interrupted: killing job {self.run_id} on {self.nnodes} nodes")
            await asyncio.shield(self.kill_everywhere())
            raise

    async def kill_everywhere(
        self,
        only: Sequence[int] | None = None,
        *,
        skip: set[int] | frozenset[int] = frozenset(),
        why: str = "",
    ) -> dict[int, agent_pb2.JobStatus]:
        """Kill the job on every node (or the node ranks in ``only``) but those in
        ``skip`` (lost nodes), all at once; each call has a deadline (the kill timeout
        plus the node timeout). Returns the answers by node rank; reports, not raises,
        the nodes where that failed. The agents record this launch as the requester."""
        ranks = [i for i in (range(self.nnodes) if only is None else only) if i not in skip]
        requester = f"rankd launch on {socket.gethostname()} (pid {os.getpid()})"
        if why:
            requester += f": {why}"
        deadline = min(self.cluster.timeout, self.cluster.node_timeout) + 1.0
        op = rpc.kill(
            self.run_id,
            timeout=self.config.kill_timeout,
            requester=requester[:256],
            deadline=deadline,
        )
        answers: dict[int, agent_pb2.JobStatus] = {}

        async def one(i: int) -> None:
            try:
                answers[i] = (await self.cluster.clients[i].call(op)).job
            except JobNotFound:
                pass
            except RankdError as err:
                self.event(f"could not kill job {self.run_id} on {self.cluster.names[i]}: {err}")

        await asyncio.gather(*(one(i) for i in ranks))
        return answers

    async def start(
        self, restart_count: int, master_addr: str, port: int
    ) -> list[agent_pb2.JobStatus]:
        specs = [self.spec(i, restart_count, master_addr, port) for i in range(self.nnodes)]

        async def one(i: int) -> agent_pb2.StartResponse:
            return await self.cluster.clients[i].start(specs[i])

        results = await asyncio.gather(
            *(one(i) for i in range(self.nnodes)), return_exceptions=True
        )
        errors: dict[str, Exception] = {}
        created: list[int] = []
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                if not isinstance(result, RankdError):
                    raise result
                errors[str(self.cluster.nodes[i])] = result
            elif result.created:
                created.append(i)
            else:  # the id names a job that was already there: not ours to follow
                errors[str(self.cluster.nodes[i])] = RankdError(
                    f"{self.cluster.nodes[i]}: job id {self.run_id!r} is already in use "
                    f"(attempt {result.job.restart_count}); choose another run id"
                )
        if errors:
            # Stop only what this call started: a clash must not kill another job.
            await self.kill_everywhere(only=created)
            raise cluster_error(f"cannot start job {self.run_id}", errors, self.nnodes)
        return [r.job for r in results]  # type: ignore[union-attr]

    async def attempt(
        self, restart_count: int, master_addr: str, port: int
    ) -> tuple[agent_pb2.JobStatus, ...] | FailureReport:
        """Run one attempt everywhere: each node's final status, or the report."""
        self.event(
            f"attempt {restart_count}: starting job {self.run_id}, "
            f"{_count(self.world_size, 'rank')} on {_count(self.nnodes, 'node')} "
            f"(MASTER_ADDR={master_addr} MASTER_PORT={port})"
        )
        await self.start(restart_count, master_addr, port)
        run = _Attempt(self, restart_count)
        return await run.run()


class _Attempt:
    """Following, watching and (on failure) stopping one attempt on every node.

    Liveness: a monitor checks every node each tick (:mod:`rankd.client.liveness`);
    a lost node's follower is cancelled, the node is never called again, and the
    stop of the job on the other nodes goes ahead without it. While the attempt
    runs, its lease is renewed on every node that is not lost."""

    def __init__(self, launch: _Launch, restart_count: int) -> None:
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

    def fail(self, why: str) -> None:
        if not self.failed.is_set():
            self.first_failure = why
            self.launch.event(f"{why}; stopping job {self.launch.run_id} on every node")
            self.failed.set()

    def lose(self, i: int, why: str, since: float) -> None:
        """Give up on node ``i``: it is never called again in this launch."""
        if i in self.lost:
            return
        npn = self.launch.config.nproc_per_node
        self.lost[i] = NodeLost(
            node=self.cluster.names[i],
            address=str(self.cluster.nodes[i]),
            node_rank=i,
            global_ranks=tuple(range(i * npn, (i + 1) * npn)),
            why=why,
            since=since,
            detected=time.time(),
        )
        self.fail(f"node {self.cluster.names[i]} lost: {why}")

    async def follow(self, i: int) -> None:
        client = self.cluster.clients[i]
        try:
            options = self.launch.stream_options(self.restart_count)
            async with client.stream(self.launch.run_id, **options) as lines:
                async for line in lines:
                    self.launch.emit(i, line, self.restart_count)
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
            self.killed_by = final.reason or "killed"
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
            view = NodeView(
                str(self.cluster.nodes[i]), name, i, i * self.launch.config.nproc_per_node
            )
            failure = RankFailure.from_proto(own[0], view)
            return f"global rank {failure.global_rank} on {name} failed: {failure.summary()}"
        state = agent_pb2.JobState.Name(final.state)
        return f"job {state} on {name}" + (f" ({final.reason})" if final.reason else "")

    async def monitor(self, followers: list[asyncio.Task[None]]) -> None:
        """Liveness of every node still followed, and progress (from the watches)."""
        launch = self.launch
        node_timeout = self.cluster.node_timeout
        watches = self.cluster.node_watches(launch.run_id)
        tick = min(0.25, node_timeout / 8)
        next_progress = time.monotonic() + launch.interval
        while True:
            await asyncio.sleep(tick)
            for i, follower in enumerate(followers):
                if i in self.lost or follower.done():
                    continue
                verdict = self.cluster.clients[i].liveness.verdict(node_timeout, since=self.began)
                if verdict is not None:
                    follower.cancel()
                    self.lose(i, *verdict)
            if launch.hooks.on_progress is not None and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + launch.interval
                launch.hooks.on_progress(self.progress(watches))

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
        """Renew the lease on every node not lost, every third of the lease."""
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
            live = [i for i in range(self.launch.nnodes) if i not in self.lost]
            await asyncio.gather(*(one(i) for i in live))
            await asyncio.sleep(every)

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
        self.cluster.node_watches(self.launch.run_id)  # heartbeats: signs of life
        followers = [asyncio.create_task(self.follow(i)) for i in range(n)]
        helpers = [
            asyncio.create_task(self.monitor(followers)),
            asyncio.create_task(self.renew()),
        ]
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
        """Wait (at most ``timeout`` s) until the watch of every node whose end this
        attempt saw shows that end too, so that a ``poll`` after the launch reads it:
        the watch's push and the log stream's end message travel apart."""
        watches = self.cluster.node_watches(self.launch.run_id)
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
                rank_offset=i * self.launch.config.nproc_per_node,
                clock=self.cluster.clients[i].clock.best,
            )
            for i, node in enumerate(self.cluster.nodes)
        ]
        return build_report(
            self.launch.run_id,
            list(zip(views, self.finals, strict=True)),
            world_size=self.launch.world_size,
            restart_count=self.restart_count,
            reason=self.first_failure or "",
            lost=list(self.lost.values()),
            killed_by=self.killed_by,
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _root_line(report: FailureReport) -> str:
    root = report.root_cause
    if root is None:
        return report.reason or "no failure recorded"
    return f"global rank {root.global_rank} on {root.node}: {root.summary()}"


async def run_launch(cluster: Fleet, config: LaunchConfig, hooks: LaunchHooks) -> LaunchResult:
    """Run one job on every node of ``cluster`` until it succeeds or gives up;
    its output goes where ``hooks`` say.

    Raises ``ClusterError`` when a node cannot be reached or refuses the job
    (``AuthenticationFailed``, a ``ClusterError``, when a node refused this
    client's token, TLS settings or permissions), ``JobFailed`` when the job failed.
    """
    return await _Launch(cluster, config, hooks).run()
