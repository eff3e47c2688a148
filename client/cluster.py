"""Many agents at once: :class:`AsyncCluster` (asyncio) and :class:`Cluster` (blocking).

Every call fans out to all nodes concurrently, so N nodes cost about one round
trip; each node answers a :class:`NodeResult` (a value or its own error) within
the RPC deadline, and a dead or slow node never holds up the others.
``launch`` runs a whole multi-node job (see :mod:`rankd.client.launch`).

Job statuses are event-driven: once asked about a job (``poll``, ``wait``), the
cluster keeps one Watch stream per agent for it (:mod:`rankd.client.watches`) and
answers ``poll`` from what the agents pushed, without a round trip; a node whose
watch is down is polled as before while its watch reconnects. At most
:data:`MAX_WATCHED_JOBS` jobs are watched; the least recently asked one is dropped.

Liveness: every channel pings its agent (gRPC keepalive) and every answer counts as
a sign of life (:mod:`rankd.client.liveness`). ``wait`` gives up on a node from which
nothing arrived for ``node_timeout`` seconds, or whose connection stayed refused for
:data:`~rankd.client.liveness.REFUSED_GRACE` seconds: that node answers
:class:`~rankd.client.errors.NodeLostError`, whose ``loss`` says why and when.

``Cluster`` runs an ``AsyncCluster`` on a private event-loop thread
(:mod:`rankd.client.loop_thread`); launch callbacks (``on_line``, ``on_event``,
``on_progress``) run on that thread. Ctrl-C in a blocking call cancels it, and a
cancelled ``launch`` kills the job on every node before ``KeyboardInterrupt`` propagates.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar, Unpack

import grpc

import rankd.client.rpc as rpc
import rankd.client.watches as watch_defaults
from rankd.client.agent_client import DEFAULT_TIMEOUT, AsyncAgentClient
from rankd.client.errors import AgentTimeout, AgentUnavailable, NodeLostError, RankdError
from rankd.client.liveness import DEFAULT_NODE_TIMEOUT, check_node_timeout
from rankd.client.loop_thread import LoopThread
from rankd.client.nodes import Node, parse_nodes
from rankd.client.report import NodeLost
from rankd.client.results import NodeResult
from rankd.client.stackfold import FoldedStacks
from rankd.client.stacks import gather_stacks
from rankd.client.torchrun import LaunchOptions, LaunchResult, launch_settings
from rankd.client.watches import NodeWatch
from rankd.v1 import agent_pb2

__all__ = ["MAX_WATCHED_JOBS", "AsyncCluster", "Cluster", "NodeResult"]

#: Jobs whose statuses a cluster keeps watched at once.
MAX_WATCHED_JOBS = 16
#: Most seconds between two liveness checks of a waiting call.
_TICK = 0.25

T = TypeVar("T")


def _as_node(node: str | Node) -> Node:
    if isinstance(node, Node):
        return node
    (parsed,) = parse_nodes(node)
    return parsed


def display_names(nodes: Sequence[Node]) -> list[str]:
    """Host names when they tell the nodes apart, else ``host:port``."""
    hosts = [n.host for n in nodes]
    if len(set(hosts)) == len(hosts):
        return hosts
    return [n.address for n in nodes]


class AsyncCluster:
    """Concurrent calls to many agents (asyncio). Create it inside its event loop.

    ``timeout``: deadline of each unary RPC; ``node_timeout``: seconds of silence after
    which ``wait`` and ``launch`` give up on a node (see the module doc). ``token``,
    ``credentials`` and ``insecure`` as for :class:`AgentClient`: a token without
    ``credentials`` to any node that is not loopback raises ``PlaintextTokenRefused``
    naming those nodes, before any connection, unless ``insecure`` (one warning)."""

    def __init__(
        self,
        nodes: Sequence[str | Node],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        node_timeout: float = DEFAULT_NODE_TIMEOUT,
        insecure: bool = False,
    ) -> None:
        self.nodes = [_as_node(n) for n in nodes]
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("a node appears twice in the cluster")
        # All nodes at once: one refusal or warning naming them, not one per client.
        rpc.check_token_transport(
            [n.address for n in self.nodes],
            token=bool(token),
            tls=credentials is not None,
            insecure=insecure,
        )
        self.names = display_names(self.nodes)
        self.timeout = timeout
        self.node_timeout = check_node_timeout(node_timeout)
        self.clients = [
            AsyncAgentClient(
                n,
                timeout=timeout,
                token=token,
                credentials=credentials,
                node_timeout=self.node_timeout,
                insecure=insecure,
            )
            for n in self.nodes
        ]
        self._watches: OrderedDict[str, builtins.list[NodeWatch]] = OrderedDict()
        self._dropped: set[asyncio.Task[None]] = set()

    async def fan_out(
        self, call: Callable[[AsyncAgentClient], Awaitable[T]]
    ) -> builtins.list[NodeResult[T]]:
        """Run ``call`` on every node at once; one result per node, in node order."""
        return await self._each(lambda i: call(self.clients[i]))

    async def _each(
        self, call: Callable[[int], Awaitable[T]], ranks: Sequence[int] | None = None
    ) -> builtins.list[NodeResult[T]]:
        """``call(node_rank)`` for every node (or those in ``ranks``) at once."""

        async def one(rank: int) -> NodeResult[T]:
            try:
                return NodeResult(self.nodes[rank], rank, value=await call(rank))
            except RankdError as err:
                return NodeResult(self.nodes[rank], rank, error=err)

        if ranks is None:
            ranks = range(len(self.nodes))
        return list(await asyncio.gather(*(one(i) for i in ranks)))

    async def info(self) -> builtins.list[NodeResult[agent_pb2.InfoResponse]]:
        """Every agent's ``InfoResponse`` (also a clock sample per agent)."""
        return await self.fan_out(lambda c: c.info())

    async def stacks(
        self,
        job_id: str,
        *,
        ranks: Collection[int] | None = None,
        native: bool = False,
        timeout: float = 0.0,
    ) -> FoldedStacks:
        """The Python stacks of the job's live ranks (``ranks``: global ranks; None:
        all) on every node, sampled at once and folded (:mod:`rankd.client.stackfold`).
        Needs py-spy beside each agent (``pip install 'rankd[stacks]'``)."""
        return await gather_stacks(self, job_id, ranks=ranks, native=native, timeout=timeout)

    async def poll(
        self, job_id: str, *, fresh: bool = False
    ) -> builtins.list[NodeResult[agent_pb2.JobStatus]]:
        """The job's ``JobStatus`` on every node.

        Watch-fed: from the first call on, every node's status comes from its Watch
        stream, so a call costs no RPC and reflects every change the agent has
        pushed (it lags the agent by about one one-way network latency). A node
        whose watch is not live yet or is down is polled with a unary Poll, as
        with ``fresh=True``, which polls every node (one round trip each).
        """
        if fresh:
            return await self._fresh_polls(job_id, range(len(self.nodes)))
        watches = self._watch(job_id)
        if all(w.live for w in watches):  # the common case: no RPC, no await
            return [NodeResult(n, i, value=watches[i].snapshot()) for i, n in enumerate(self.nodes)]
        down = [i for i, w in enumerate(watches) if not w.live]
        polled = dict(zip(down, await self._fresh_polls(job_id, down), strict=True))
        return [
            polled[i] if i in polled else NodeResult(n, i, value=watches[i].snapshot())
            for i, n in enumerate(self.nodes)
        ]

    async def _fresh_polls(
        self, job_id: str, ranks: Sequence[int]
    ) -> builtins.list[NodeResult[agent_pb2.JobStatus]]:
        """Unary Polls of the nodes in ``ranks``, concurrently; their answers also
        refresh the nodes' watches."""
        watches = self._watches.get(job_id)

        async def one(i: int) -> agent_pb2.JobStatus:
            resp = await self.clients[i].call(rpc.poll(job_id))
            if watches is not None:
                watches[i].offer(resp.job, resp.version)
                watches[i].kick()
            return resp.job

        return await self._each(one, ranks)

    async def watch(self, job_id: str, *, timeout: float | None = None) -> bool:
        """Watch the job on every node from now on (idempotent; ``poll`` and ``wait``
        do it too), and wait until every node's watch is live, i.e. has delivered
        the job's status: True. False as soon as a node's watch is down (unknown
        job, unreachable agent; it keeps reconnecting) or after ``timeout`` seconds."""
        watches = self._watch(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(w.live for w in watches):
            if any(w.error is not None for w in watches):
                return False
            pending = next(w for w in watches if not w.live)
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not await pending.changed(left):
                return False
        return True

    def node_watches(self, job_id: str) -> builtins.list[NodeWatch]:
        """The job's :class:`NodeWatch` per node, in node order (opened if needed)."""
        return self._watch(job_id)

    def watches_of(self, job_id: str) -> builtins.list[NodeWatch] | None:
        """The job's watches if they are open (None: they are not, and stay so)."""
        return self._watches.get(job_id)

    def _watch(self, job_id: str) -> builtins.list[NodeWatch]:
        """The job's watches, opened on first use; the least recently used job's
        are dropped beyond MAX_WATCHED_JOBS. Their heartbeats come often enough for
        ``node_timeout``."""
        watches = self._watches.get(job_id)
        if watches is not None:
            self._watches.move_to_end(job_id)
            return watches
        heartbeat = watch_defaults.heartbeat_for(self.node_timeout)
        stale = min(watch_defaults.STALE_AFTER, self.node_timeout)
        watches = [
            NodeWatch(c, job_id, heartbeat=heartbeat, stale_after=stale) for c in self.clients
        ]
        self._watches[job_id] = watches
        while len(self._watches) > MAX_WATCHED_JOBS:
            _, old = self._watches.popitem(last=False)
            task = asyncio.get_running_loop().create_task(_close_all(old))
            self._dropped.add(task)
            task.add_done_callback(self._dropped.discard)
        return watches

    async def list(self) -> builtins.list[NodeResult[builtins.list[agent_pb2.JobStatus]]]:
        """Every node's jobs."""
        return await self.fan_out(lambda c: c.list())

    async def wait(
        self, job_id: str, *, timeout: float | None = None
    ) -> builtins.list[NodeResult[agent_pb2.JobStatus]]:
        """Wait until the job has ended on every node; final ``JobStatus`` per node.

        Event-driven on the job's watches (see :meth:`poll`), which reconnect while
        down. A node that is lost (nothing heard for ``node_timeout`` seconds, or a
        refused connection for longer than a moment) answers ``NodeLostError`` and
        is not waited on again; one whose watch fails otherwise (unknown job, a
        refused token) answers that error; one that has not ended within
        ``timeout`` seconds answers ``AgentTimeout``.
        """
        watches = self._watch(job_id)
        began = time.monotonic()
        deadline = None if timeout is None else began + timeout

        async def one(i: int) -> agent_pb2.JobStatus:
            watch = watches[i]
            liveness = self.clients[i].liveness
            quiet_from = 0.0  # a stall of this loop is not the node's silence
            while True:
                if watch.live and watch.ended:
                    return watch.snapshot()
                error = watch.error
                if error is not None and not isinstance(error, AgentUnavailable | AgentTimeout):
                    raise error
                verdict = liveness.verdict(self.node_timeout, since=began, quiet_from=quiet_from)
                if verdict is not None:
                    raise NodeLostError(self._loss(i, watch, *verdict))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AgentTimeout(
                        str(self.nodes[i]),
                        "DEADLINE_EXCEEDED",
                        f"job {job_id!r} did not end within {timeout:g}s",
                    )
                waited = _TICK if left is None else min(left, _TICK)
                due = time.monotonic() + waited
                await watch.changed(waited)
                if time.monotonic() - due > _TICK:
                    quiet_from = time.monotonic()

        return await self._each(one)

    def _loss(self, i: int, watch: NodeWatch, why: str, since: float) -> NodeLost:
        """Node ``i`` lost: its global ranks as the job's spec there last said."""
        ranks: tuple[int, ...] = ()
        status = watch.last_seen
        if status is not None and status.HasField("spec"):
            offset = status.spec.rank_offset
            ranks = tuple(range(offset, offset + status.nprocs))
        return NodeLost(
            node=self.names[i],
            address=str(self.nodes[i]),
            node_rank=i,
            global_ranks=ranks,
            why=why,
            since=since,
            detected=time.time(),
        )

    async def kill(
        self,
        job_id: str,
        *,
        signal: str | int = "SIGTERM",
        timeout: float | None = None,
        escalate: bool = True,
        requester: str | None = None,
    ) -> builtins.list[NodeResult[agent_pb2.JobStatus]]:
        """Kill the job on every node; ``JobStatus`` after the kill per node.
        ``requester`` names who asks in the killed job's reason (default: this
        program, host and pid).

        A later watch-fed :meth:`poll` shows at least the states these answers show."""
        watches = self._watches.get(job_id)
        op = rpc.kill(
            job_id, signal=signal, timeout=timeout, escalate=escalate, requester=requester
        )

        async def one(i: int) -> agent_pb2.JobStatus:
            resp = await self.clients[i].call(op)
            if watches is not None:
                watches[i].offer(resp.job, resp.version)
            return resp.job

        return await self._each(one)

    async def launch(self, cmd: Sequence[str], **options: Unpack[LaunchOptions]) -> LaunchResult:
        """Run ``cmd`` on every node; see :func:`rankd.client.launch.run_launch`.

        ``options`` (:class:`rankd.client.torchrun.LaunchOptions`) are the fields of
        :class:`~rankd.client.torchrun.LaunchConfig` (``nproc_per_node``, ``run_id``,
        ``max_restarts``, ``redirects``, ``tee``, ``local_ranks_filter``,
        ``log_line_prefix_template``, ``master_addr``, ``master_port``, ``role_name``,
        ``env``, ``cwd``, ``kill_timeout``, ``lease``, ``detach``, ``hang_timeout``,
        ``nnodes``) and of :class:`~rankd.client.torchrun.LaunchHooks` (``on_line``,
        ``on_event``, ``on_membership``, ``on_progress``, ``progress_interval``,
        ``stdout``, ``stderr``). ``nnodes=(MIN, MAX)``: elastic membership, the nodes
        beyond MAX are spares (see :mod:`rankd.client.launch`, docs/elastic.md).
        Raises ``JobFailed`` with the report when the job failed (a lost node
        included: ``report.root_node``), ``JobKilled`` when another client killed it.
        """
        config, hooks = launch_settings(cmd, options)
        # imported here: the launch's machinery is a third of what `rankd status` or
        # `rankd logs` would import for nothing
        from rankd.client.launch import run_launch

        return await run_launch(self, config, hooks)

    async def close(self) -> None:
        """Stop every watch, then close the channels. Idempotent."""
        watched = [w for ws in self._watches.values() for w in ws]
        self._watches.clear()
        await _close_all(watched)
        await asyncio.gather(*self._dropped, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients))

    async def __aenter__(self) -> AsyncCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _close_all(watches: Sequence[NodeWatch]) -> None:
    await asyncio.gather(*(w.close() for w in watches))


class Cluster:
    """Blocking twin of :class:`AsyncCluster`; same methods, same results."""

    def __init__(
        self,
        nodes: Sequence[str | Node],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        node_timeout: float = DEFAULT_NODE_TIMEOUT,
        insecure: bool = False,
    ) -> None:
        self._runner = LoopThread()

        async def make() -> AsyncCluster:
            return AsyncCluster(
                nodes,
                timeout=timeout,
                token=token,
                credentials=credentials,
                node_timeout=node_timeout,
                insecure=insecure,
            )

        try:
            self._async = self._runner.run(make())
        except BaseException:
            self._runner.close()
            raise
        self.nodes = self._async.nodes
        self.names = self._async.names

    @property
    def clients(self) -> builtins.list[AsyncAgentClient]:
        return self._async.clients

    def info(self) -> builtins.list[NodeResult[agent_pb2.InfoResponse]]:
        return self._runner.run(self._async.info())

    def poll(
        self, job_id: str, *, fresh: bool = False
    ) -> builtins.list[NodeResult[agent_pb2.JobStatus]]:
        """See :meth:`AsyncCluster.poll`: watch-fed unless ``fresh``."""
        return self._runner.run(self._async.poll(job_id, fresh=fresh))

    def list(self) -> builtins.list[NodeResult[builtins.list[agent_pb2.JobStatus]]]:
        return self._runner.run(self._async.list())

    def stacks(
        self,
        job_id: str,
        *,
        ranks: Collection[int] | None = None,
        native: bool = False,
        timeout: float = 0.0,
    ) -> FoldedStacks:
        """See :meth:`AsyncCluster.stacks`."""
        return self._runner.run(
            self._async.stacks(job_id, ranks=ranks, native=native, timeout=timeout)
        )

    def watch(self, job_id: str, *, timeout: float | None = None) -> bool:
        """See :meth:`AsyncCluster.watch`."""
        return self._runner.run(self._async.watch(job_id, timeout=timeout))

    def wait(
        self, job_id: str, *, timeout: float | None = None
    ) -> builtins.list[NodeResult[agent_pb2.JobStatus]]:
        return self._runner.run(self._async.wait(job_id, timeout=timeout))

    def kill(
        self,
        job_id: str,
        *,
        signal: str | int = "SIGTERM",
        timeout: float | None = None,
        escalate: bool = True,
        requester: str | None = None,
    ) -> builtins.list[NodeResult[agent_pb2.JobStatus]]:
        return self._runner.run(
            self._async.kill(
                job_id, signal=signal, timeout=timeout, escalate=escalate, requester=requester
            )
        )

    def launch(self, cmd: Sequence[str], **options: Unpack[LaunchOptions]) -> LaunchResult:
        """Blocking :meth:`AsyncCluster.launch`; launch callbacks run on the loop
        thread. Ctrl-C kills the job everywhere, then raises ``KeyboardInterrupt``."""
        from rankd.client.launch import run_launch  # see AsyncCluster.launch

        config, hooks = launch_settings(cmd, options)
        return self._runner.run(
            run_launch(self._async, config, hooks),
            cleanup_timeout=config.kill_timeout
            + 2 * min(self._async.timeout, self._async.node_timeout)
            + 2,
        )

    def close(self) -> None:
        """Close every channel and stop the loop thread. Idempotent."""
        if self._runner.loop.is_closed():
            return
        try:
            self._runner.run(self._async.close())
        finally:
            self._runner.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
