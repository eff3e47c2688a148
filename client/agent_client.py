"""One agent: :class:`AgentClient` (blocking) and :class:`AsyncAgentClient` (asyncio).

Both speak ``rankd.v1.NodeAgent`` and return the contract's protobuf messages:

======================  ===========================================
``start(spec)``         ``StartResponse`` (``job`` and ``created``)
``poll(job_id)``        ``JobStatus``
``wait(job_id)``        ``JobStatus`` once the job has ended
``stream(job_id, ...)`` an iterator of ``LogLine`` (:class:`LogStream`)
``watch(job_id, ...)``  an iterator of ``WatchResponse`` (:class:`StatusWatch`)
``kill(job_id, ...)``   ``JobStatus`` after the kill
``renew(job_id)``       seconds left on the job's lease
``list()``              ``list[JobStatus]``
``info()``              ``InfoResponse``
``call(op)``            the whole answer of an RPC built by :mod:`rankd.client.rpc`
======================  ===========================================

One implementation, two faces: every request is built and every answer read by
shared code (:mod:`rankd.client.rpc`, :mod:`rankd.client.streams`); each face
only sends, on a blocking or an asyncio channel. The blocking face keeps its own
channel rather than running the asyncio one on a loop thread, so a streamed line
costs no hop between threads.

Failed RPCs raise :class:`rankd.client.errors.AgentError` subclasses. Every answer
that carries the agent's clock (Poll, Info) feeds ``client.clock``, the agent's
estimated clock offset.
"""

from __future__ import annotations

import builtins
from typing import Any, TypeVar, Unpack

import grpc
import grpc.aio
from google.protobuf.message import Message

import rankd.client.rpc as rpc
from rankd.client.clock import ClockEstimator, RoundTrip
from rankd.client.errors import AgentUnavailable
from rankd.client.liveness import Liveness, check_node_timeout, keepalive_options
from rankd.client.nodes import Node
from rankd.client.rpc import (
    CHANNEL_OPTIONS,
    DEFAULT_STREAM_RETRIES,
    DEFAULT_TIMEOUT,
    Endpoint,
    Unary,
)
from rankd.client.streams import (
    AsyncLogStream,
    AsyncStatusWatch,
    LogStream,
    StatusWatch,
    StreamOptions,
    follow_to_end,
)
from rankd.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["DEFAULT_TIMEOUT", "AgentClient", "AsyncAgentClient"]

R = TypeVar("R", bound=Message)


class _AgentBase:
    """What both faces share: settings, the clock estimate, how a call is sent and
    how its answer is read."""

    def __init__(
        self,
        address: str | Node,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        stream_retries: int = DEFAULT_STREAM_RETRIES,
        node_timeout: float | None = None,
        insecure: bool = False,
    ) -> None:
        self.address = str(address)
        self.timeout = timeout
        self.stream_retries = stream_retries
        self.clock = ClockEstimator()
        # Before any channel exists: a refused token never reaches the network.
        self._endpoint = Endpoint.of(
            self.address, token=token, tls=credentials is not None, insecure=insecure
        )
        self._options = list(CHANNEL_OPTIONS)
        if node_timeout is not None:
            self._options += keepalive_options(check_node_timeout(node_timeout))
        self._channel = self._connect(credentials)
        self._stub = agent_pb2_grpc.NodeAgentStub(self._channel)

    @property
    def liveness(self) -> Liveness:
        """What this client heard from its agent, and when (see rankd.client.liveness)."""
        return self._endpoint.liveness

    def _connect(self, credentials: grpc.ChannelCredentials | None) -> Any:
        raise NotImplementedError

    def _send(self, op: Unary[R]) -> Any:
        """Start the RPC: its answer (blocking stub) or an awaitable of it (asyncio)."""
        method = getattr(self._stub, op.method)
        timeout = (self.timeout if op.deadline is None else op.deadline) + op.extra_timeout
        return method(op.request, timeout=timeout, metadata=self._endpoint.metadata)

    def _answer(self, op: Unary[R], resp: R, trip: RoundTrip) -> R:
        """Take the clock sample an answer carries; return the answer."""
        self._endpoint.liveness.heard()
        if op.agent_time is not None and (stamp := op.agent_time(resp)) > 0:
            self.clock.add(trip.sample(stamp))
        return resp

    def _ended(self, final: agent_pb2.JobStatus | None) -> agent_pb2.JobStatus:
        # A follow stream stops only at its end message, which carries the status.
        if final is None:
            raise AgentUnavailable(self.address, "UNAVAILABLE", "stream ended before the job did")
        return final


class AgentClient(_AgentBase):
    """Blocking client of one ``rankd-agent``. Thread-safe; ``close()`` when done.

    ``timeout`` is the deadline of every unary RPC (Kill: plus its kill timeout).
    ``token`` is sent as ``authorization: Bearer <token>`` (agents started with
    ``--token-file``); ``credentials`` (``grpc.ssl_channel_credentials(...)``)
    switch the channel to TLS, with a client certificate for mutual TLS. Without
    ``credentials``, a token goes only to a loopback address (127.0.0.0/8, ``::1``,
    ``localhost``) or a unix socket: any other address raises
    ``PlaintextTokenRefused`` here, before connecting, unless ``insecure=True``
    (a trusted network; a warning is logged once per address).
    ``stream_retries``: reconnects a log stream makes after UNAVAILABLE.
    ``node_timeout`` (seconds, None = off): the channel pings the agent and closes a
    connection that gets no answer within about that long (gRPC keepalive).
    """

    def _connect(self, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        if credentials is not None:
            return grpc.secure_channel(self.address, credentials, options=self._options)
        return grpc.insecure_channel(self.address, options=self._options)

    def call(self, op: Unary[R]) -> R:
        """Send one RPC built by :mod:`rankd.client.rpc`; its whole answer."""
        trip = RoundTrip()
        with self._endpoint.errors():
            resp = self._send(op)
        return self._answer(op, resp, trip)

    def start(self, spec: agent_pb2.JobSpec) -> agent_pb2.StartResponse:
        """Start a ``JobSpec``; idempotent on ``job_id``. Returns ``StartResponse``."""
        return self.call(rpc.start(spec))

    def poll(self, job_id: str) -> agent_pb2.JobStatus:
        """The job's ``JobStatus`` (answered from the agent's memory)."""
        return self.call(rpc.poll(job_id)).job

    def watch(
        self,
        job_id: str,
        *,
        until_ended: bool = False,
        heartbeat: float = 0.0,
        timeout: float | None = None,
    ) -> StatusWatch:
        """The job's status as the agent pushes it: an iterator of ``WatchResponse``.

        The first message is the current ``JobStatus`` (``resp.job``), then one per
        change (attempt started, rank exited, state changed, attempt ended), with an
        increasing ``resp.version``; changes that happen while a message is on its way
        are folded into the next, never the final one. While ranks run, the status is
        also resent about once a second with fresh resource use (same version).
        ``until_ended``: stop after the message whose ``ended`` is set. ``heartbeat``
        (seconds, 0 = none): the agent sends a message without ``job`` after that
        much silence. ``timeout``: overall deadline (None = none). A broken
        connection raises ``AgentError``; watch again, the first message resyncs.
        """
        request = rpc.watch(job_id, until_ended=until_ended, heartbeat=heartbeat)
        return StatusWatch(self._endpoint, self._stub.Watch, request, timeout)

    def info(self) -> agent_pb2.InfoResponse:
        """The agent's ``InfoResponse``: hostname, version, clock, a free port."""
        return self.call(rpc.info())

    def list(self) -> builtins.list[agent_pb2.JobStatus]:
        """Every job the agent holds (``JobStatus``), newest last."""
        return builtins.list(self.call(rpc.list_jobs()).jobs)

    def kill(
        self,
        job_id: str,
        *,
        signal: str | int = "SIGTERM",
        timeout: float | None = None,
        escalate: bool = True,
        requester: str | None = None,
    ) -> agent_pb2.JobStatus:
        """Signal every rank's process tree; SIGKILL after ``timeout`` s (agent
        default 30) unless ``escalate`` is False. Returns the ``JobStatus`` after
        the kill. Idempotent: killing an ended job answers its final state.
        ``requester`` names who asks in the job's reason (default: this program,
        host and pid)."""
        op = rpc.kill(
            job_id, signal=signal, timeout=timeout, escalate=escalate, requester=requester
        )
        return self.call(op).job

    def renew(self, job_id: str) -> float:
        """Renew the job's lease (``JobSpec.lease``); seconds until it lapses."""
        return self.call(rpc.renew(job_id)).remaining

    def stream(self, job_id: str, **options: Unpack[StreamOptions]) -> LogStream:
        """The job's log lines (``LogLine``), see :class:`LogStream`; ``options``
        are :class:`rankd.client.streams.StreamOptions` (``follow``, ``ranks``,
        ``streams``, ``contains``, ``regex``, ``resume``, ``restart_count``,
        ``timeout``)."""
        return LogStream(self._endpoint, self._stub.Stream, job_id, self.stream_retries, options)

    def wait(self, job_id: str, *, timeout: float | None = None) -> agent_pb2.JobStatus:
        """Block until the job has ended; return its final ``JobStatus``.

        Event-driven (a follow stream whose filter matches no line), not a poll
        loop. Raises ``AgentTimeout`` when ``timeout`` seconds pass first.
        """
        return self._ended(self.stream(job_id, **follow_to_end(timeout)).drain())

    def close(self) -> None:
        """Close the channel. Idempotent."""
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAgentClient(_AgentBase):
    """The asyncio twin of :class:`AgentClient` (same methods, awaited).

    Create it inside the event loop that will use it; ``await close()``.
    """

    def _connect(self, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        if credentials is not None:
            return grpc.aio.secure_channel(self.address, credentials, options=self._options)
        return grpc.aio.insecure_channel(self.address, options=self._options)

    async def call(self, op: Unary[R]) -> R:
        """Send one RPC built by :mod:`rankd.client.rpc`; its whole answer."""
        trip = RoundTrip()
        with self._endpoint.errors():
            resp = await self._send(op)
        return self._answer(op, resp, trip)

    async def start(self, spec: agent_pb2.JobSpec) -> agent_pb2.StartResponse:
        return await self.call(rpc.start(spec))

    async def poll(self, job_id: str) -> agent_pb2.JobStatus:
        return (await self.call(rpc.poll(job_id))).job

    def watch(
        self,
        job_id: str,
        *,
        until_ended: bool = False,
        heartbeat: float = 0.0,
        timeout: float | None = None,
    ) -> AsyncStatusWatch:
        """The asyncio twin of :meth:`AgentClient.watch`: ``async for resp in ...``."""
        request = rpc.watch(job_id, until_ended=until_ended, heartbeat=heartbeat)
        return AsyncStatusWatch(self._endpoint, self._stub.Watch, request, timeout)

    async def info(self) -> agent_pb2.InfoResponse:
        return await self.call(rpc.info())

    async def list(self) -> builtins.list[agent_pb2.JobStatus]:
        return builtins.list((await self.call(rpc.list_jobs())).jobs)

    async def kill(
        self,
        job_id: str,
        *,
        signal: str | int = "SIGTERM",
        timeout: float | None = None,
        escalate: bool = True,
        requester: str | None = None,
    ) -> agent_pb2.JobStatus:
        op = rpc.kill(
            job_id, signal=signal, timeout=timeout, escalate=escalate, requester=requester
        )
        return (await self.call(op)).job

    async def renew(self, job_id: str) -> float:
        return (await self.call(rpc.renew(job_id))).remaining

    def stream(self, job_id: str, **options: Unpack[StreamOptions]) -> AsyncLogStream:
        return AsyncLogStream(
            self._endpoint, self._stub.Stream, job_id, self.stream_retries, options
        )

    async def wait(self, job_id: str, *, timeout: float | None = None) -> agent_pb2.JobStatus:
        return self._ended(await self.stream(job_id, **follow_to_end(timeout)).drain())

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
