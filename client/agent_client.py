"""One agent: :class:`AgentClient` (blocking) and :class:`AsyncAgentClient` (asyncio).

Both speak ``rankd.v1.NodeAgent`` and return the contract's protobuf messages:

======================  ===========================================
``start(spec)``         ``StartResponse`` (``job`` and ``created``)
``poll(job_id)``        ``JobStatus``
``wait(job_id)``        ``JobStatus`` once the job has ended
``stream(job_id, ...)`` an iterator of ``LogLine`` (:class:`LogStream`)
``watch(job_id, ...)``  an iterator of ``WatchResponse`` (:class:`StatusWatch`)
``kill(job_id, ...)``   ``JobStatus`` after the kill
``list()``              ``list[JobStatus]``
``info()``              ``InfoResponse``
======================  ===========================================

Failed RPCs raise :class:`client.errors.AgentError` subclasses. Every answer
that carries the agent's clock (Poll, Info) feeds ``client.clock``, the agent's
estimated clock offset.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Self

import grpc
import grpc.aio

from rankd.client.clock import ClockEstimator, RoundTrip
from rankd.client.errors import AgentError, AgentUnavailable, agent_error
from rankd.client.nodes import Node
from rankd.v1 import agent_pb2, agent_pb2_grpc

__all__ = [
    "DEFAULT_TIMEOUT",
    "AgentClient",
    "AsyncAgentClient",
    "AsyncLogStream",
    "AsyncStatusWatch",
    "LogStream",
    "StatusWatch",
    "stream_kind",
]

#: Deadline of one unary RPC, seconds.
DEFAULT_TIMEOUT = 10.0
#: Reconnects a stream makes after UNAVAILABLE before it gives up.
DEFAULT_STREAM_RETRIES = 6

# Kill answers after the ranks are dead: up to the kill timeout (30 s unset).
_AGENT_KILL_TIMEOUT = 30.0
_NEVER_MATCHES = "(?!)"
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

JobSpec = agent_pb2.JobSpec
JobStatus = agent_pb2.JobStatus
LogLine = agent_pb2.LogLine


def unpack_block(block: Any) -> list[Any]:
    """The ``LogLine`` messages of a packed ``LogBlock``: the same lines, cursors and
    prefix as an unpacked stream sends. Splitting here spares the agent's CPU, which
    belongs to the ranks."""
    raws = block.data.split(b"\n")
    if not block.partial:
        raws.pop()  # after the last newline
    line_type = agent_pb2.LogLine
    out = []
    cursor = block.offset
    newline = 0 if block.partial else 1
    for raw in raws:
        cursor += len(raw) + newline
        out.append(
            line_type(
                local_rank=block.local_rank,
                stream=block.stream,
                offset=cursor,
                text=raw.decode("utf-8", errors="replace"),
                prefix=block.prefix,
                partial=block.partial,
            )
        )
    return out


def stream_kind(stream: str | int) -> int:
    """``"stdout"``/``"stderr"`` (or the enum value) -> ``StreamKind``."""
    if isinstance(stream, int):
        return stream
    try:
        return {"stdout": agent_pb2.STDOUT, "stderr": agent_pb2.STDERR}[stream.lower()]
    except KeyError:
        raise ValueError(f"unknown stream {stream!r}: use 'stdout' or 'stderr'") from None


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _tls_hint(details: str, tls: bool) -> str:
    """What a person can do about a connection that TLS settings likely broke, or ""."""
    text = details.lower()
    if "wrong_version_number" in text:
        return "the agent does not speak TLS here (started without --tls-cert?)"
    if tls and any(mark in text for mark in ("handshake", "certificate", "verification")):
        return (
            "TLS handshake failed: the agent's certificate must be signed by the CA given "
            "(--tls-ca) and name the address used"
        )
    if tls and "socket closed" in text:
        return (
            "the agent closed the connection after the TLS handshake: an agent started with "
            "--tls-client-ca needs a client certificate signed by that CA (--tls-cert/--tls-key)"
        )
    if not tls and "socket closed" in text:
        return "the agent closed the connection: if it serves TLS, give its CA (--tls-ca)"
    return ""


def _error(address: str, err: grpc.RpcError, *, tls: bool) -> AgentError:
    """The typed error for a failed RPC, with a hint when TLS settings are the likely cause."""
    error = agent_error(address, err)
    if isinstance(error, AgentUnavailable):
        hint = _tls_hint(error.details, tls)
        if hint:
            return AgentUnavailable(address, error.code, f"{error.details}; {hint}")
    return error


def _is_tls_misconfiguration(err: grpc.RpcError) -> bool:
    """A certificate the client rejects: retrying cannot help."""
    details_fn = getattr(err, "details", None)
    text = str(details_fn() or "").lower() if callable(details_fn) else ""
    return "certificate_verify_failed" in text or "verification check failed" in text


class _StreamState:
    """The request of a stream and where to resume it after a broken connection."""

    def __init__(
        self,
        job_id: str,
        *,
        follow: bool,
        ranks: Iterable[int],
        streams: Iterable[str | int],
        contains: str,
        regex: str,
        resume: Iterable[Any],
        restart_count: int | None,
        timeout: float | None,
        retries: int,
        tls: bool = False,
    ) -> None:
        self.job_id = job_id
        self.tls = tls
        self.follow = follow
        self.ranks = list(ranks)
        self.streams: list[Any] = [stream_kind(s) for s in streams]
        self.contains = contains
        self.regex = regex
        self.restart_count = restart_count
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.retries = retries
        self.retries_left = retries
        self.attempt = 0
        self.offsets: dict[tuple[int, Any], int] = {
            (c.local_rank, c.stream): c.offset for c in resume
        }
        self.pending: deque[Any] = deque()
        self.final: Any = None
        self.done = False

    def request(self) -> Any:
        req = agent_pb2.StreamRequest(
            job_id=self.job_id,
            ranks=self.ranks,
            streams=self.streams,
            contains=self.contains,
            regex=self.regex,
            follow=self.follow,
            resume=self.cursors(),
            packed=True,  # the agent sends raw blocks, we split them (see take)
        )
        if self.restart_count is not None:
            req.restart_count = self.restart_count
        return req

    def cursors(self) -> list[Any]:
        return [
            agent_pb2.Cursor(local_rank=rank, stream=kind, offset=offset)
            for (rank, kind), offset in sorted(self.offsets.items())
        ]

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def take(self, resp: Any) -> None:
        """Queue a response's lines and advance the cursors past them."""
        # Pin the attempt: a resumed stream must read the same attempt's files.
        self.restart_count = resp.restart_count
        for line in resp.lines:
            self.offsets[(line.local_rank, line.stream)] = line.offset
            self.pending.append(line)
        for block in resp.blocks:
            lines = unpack_block(block)
            self.offsets[(block.local_rank, block.stream)] = lines[-1].offset
            self.pending.extend(lines)
        # An answer means the connection works again: the retry budget is per outage.
        self.attempt = 0
        self.retries_left = self.retries
        if resp.end:
            self.final = resp.job
            self.done = True

    def backoff(self, address: str, err: grpc.RpcError | None) -> float:
        """Seconds to wait before reconnecting; raises when the stream cannot go on.

        Only UNAVAILABLE (and a follow stream cut before its end message) is
        retried, a bounded number of times with exponential backoff; never a
        certificate the client rejects.
        """
        code = err.code() if err is not None else grpc.StatusCode.UNAVAILABLE
        retry = code == grpc.StatusCode.UNAVAILABLE and self.retries_left > 0
        if not retry or (err is not None and _is_tls_misconfiguration(err)):
            if err is None:
                raise AgentUnavailable(address, "UNAVAILABLE", "stream ended before the job did")
            raise _error(address, err, tls=self.tls) from err
        self.retries_left -= 1
        delay = min(0.1 * 2**self.attempt, 2.0)
        self.attempt += 1
        return delay


class _Cancellable:
    """A streaming RPC that ``close()`` cancels; the base of the stream iterators."""

    _call: Any = None
    _closed = False

    def close(self) -> None:
        """Cancel the RPC. Idempotent."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()


class _SyncCall(_Cancellable):
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncCall(_Cancellable):
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        if self._call is not None:
            # until gRPC has taken the cancellation (its own task for the call ends), so
            # that leaving the block leaves nothing running
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await self._call.code()


class LogStream(_SyncCall, Iterator[Any]):
    """Iterator of ``LogLine`` from one agent, reconnecting on UNAVAILABLE.

    After a broken connection it resumes from the cursors of the lines already
    received, so every line arrives exactly once. With ``follow`` it ends when
    the job has ended; ``final`` then holds the job's final ``JobStatus``.
    ``close()`` (or leaving a ``with`` block) cancels the RPC.
    """

    def __init__(self, client: AgentClient, state: _StreamState) -> None:
        self._client = client
        self._state = state
        self._call: Any = None
        self._closed = False

    @property
    def final(self) -> Any:
        """The job's final ``JobStatus`` (follow streams, once ended), else None."""
        return self._state.final

    @property
    def restart_count(self) -> int | None:
        """The attempt the lines belong to (known after the first answer)."""
        return self._state.restart_count

    def cursors(self) -> list[Any]:
        """Resume points after the last line received, per (rank, stream)."""
        return self._state.cursors()

    def __iter__(self) -> LogStream:
        return self

    def __next__(self) -> Any:
        state = self._state
        while True:
            if state.pending:
                return state.pending.popleft()
            if state.done or self._closed:
                raise StopIteration
            if self._call is None:
                self._call = self._client._stub.Stream(
                    state.request(),
                    timeout=state.remaining(),
                    metadata=self._client._metadata,
                )
            try:
                state.take(next(self._call))
            except StopIteration:
                self._call = None
                if not state.follow:
                    state.done = True
                else:  # a follow stream ended without its end message
                    self._reconnect(None)
            except grpc.RpcError as err:
                self._call = None
                if self._closed:
                    raise StopIteration from None
                self._reconnect(err)

    def _reconnect(self, err: grpc.RpcError | None) -> None:
        delay = self._state.backoff(self._client.address, err)
        time.sleep(delay)


def _watch_request(job_id: str, until_ended: bool, heartbeat: float) -> Any:
    return agent_pb2.WatchRequest(job_id=job_id, until_ended=until_ended, heartbeat=heartbeat)


class StatusWatch(_SyncCall, Iterator[Any]):
    """Iterator of ``WatchResponse`` from one agent (see :meth:`AgentClient.watch`).

    Ends after the ``ended`` message of an ``until_ended`` watch, or when the agent
    closes the stream; raises ``AgentError`` when the RPC fails (no reconnection:
    a new watch starts with the full current status). ``close()`` (or leaving a
    ``with`` block) cancels the RPC.
    """

    def __init__(self, client: AgentClient, request: Any, timeout: float | None) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self._call: Any = None
        self._closed = False

    def __iter__(self) -> StatusWatch:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        if self._call is None:
            client = self._client
            self._call = client._stub.Watch(
                self._request, timeout=self._timeout, metadata=client._metadata
            )
        try:
            return next(self._call)
        except grpc.RpcError as err:
            if self._closed:
                raise StopIteration from None
            raise _error(self._client.address, err, tls=self._client._tls) from err


class AgentClient:
    """Blocking client of one ``rankd-agent``. Thread-safe; ``close()`` when done.

    ``timeout`` is the deadline of every unary RPC (Kill: plus its kill timeout).
    ``token`` is sent as ``authorization: Bearer <token>`` (agents started with
    ``--token-file``); ``credentials`` (``grpc.ssl_channel_credentials(...)``)
    switch the channel to TLS, with a client certificate for mutual TLS.
    """

    def __init__(
        self,
        address: str | Node,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        stream_retries: int = DEFAULT_STREAM_RETRIES,
    ) -> None:
        self.address = str(address)
        self.timeout = timeout
        self.stream_retries = stream_retries
        self.clock = ClockEstimator()
        self._metadata = _metadata(token)
        self._tls = credentials is not None
        self._channel = (
            grpc.secure_channel(self.address, credentials, options=_CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        )
        self._stub = agent_pb2_grpc.NodeAgentStub(self._channel)

    def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(self.address, err, tls=self._tls) from err

    def start(self, spec: Any) -> Any:
        """Start a ``JobSpec``; idempotent on ``job_id``. Returns ``StartResponse``."""
        return self._unary(self._stub.Start, agent_pb2.StartRequest(spec=spec))

    def poll(self, job_id: str) -> Any:
        """The job's ``JobStatus`` (answered from the agent's memory)."""
        trip = RoundTrip()
        resp = self._unary(self._stub.Poll, agent_pb2.PollRequest(job_id=job_id))
        if resp.agent_time > 0:
            self.clock.add(trip.sample(resp.agent_time))
        return resp.job

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
        return StatusWatch(self, _watch_request(job_id, until_ended, heartbeat), timeout)

    def info(self) -> Any:
        """The agent's ``InfoResponse``: hostname, version, clock, a free port."""
        trip = RoundTrip()
        resp = self._unary(self._stub.Info, agent_pb2.InfoRequest())
        if resp.agent_time > 0:
            self.clock.add(trip.sample(resp.agent_time))
        return resp

    def list(self) -> builtins.list[Any]:
        """Every job the agent holds (``JobStatus``), newest last."""
        return list(self._unary(self._stub.List, agent_pb2.ListRequest()).jobs)

    def kill(
        self,
        job_id: str,
        *,
        signal: str | int = "SIGTERM",
        timeout: float | None = None,
        escalate: bool = True,
    ) -> Any:
        """Signal every rank's process tree; SIGKILL after ``timeout`` s (agent
        default 30) unless ``escalate`` is False. Returns the ``JobStatus`` after
        the kill. Idempotent: killing an ended job answers its final state."""
        req = agent_pb2.KillRequest(job_id=job_id, signal=str(signal), no_escalate=not escalate)
        if timeout is not None:
            req.timeout = timeout
        wait = (_AGENT_KILL_TIMEOUT if timeout is None else timeout) if escalate else 0.0
        return self._unary(self._stub.Kill, req, timeout=self.timeout + wait).job

    def stream(
        self,
        job_id: str,
        *,
        follow: bool = False,
        ranks: Iterable[int] = (),
        streams: Iterable[str | int] = (),
        contains: str = "",
        regex: str = "",
        resume: Iterable[Any] = (),
        restart_count: int | None = None,
        timeout: float | None = None,
    ) -> LogStream:
        """The job's log lines (``LogLine``), see :class:`LogStream`.

        ``ranks``: local ranks (empty = the job's ``local_ranks_filter``, else
        all); ``streams``: ``"stdout"``/``"stderr"``; ``resume``: ``Cursor``s
        from an earlier stream; ``timeout``: overall deadline (None = none).
        """
        state = _StreamState(
            job_id,
            follow=follow,
            ranks=ranks,
            streams=streams,
            contains=contains,
            regex=regex,
            resume=resume,
            restart_count=restart_count,
            timeout=timeout,
            retries=self.stream_retries,
            tls=self._tls,
        )
        return LogStream(self, state)

    def wait(self, job_id: str, *, timeout: float | None = None) -> Any:
        """Block until the job has ended; return its final ``JobStatus``.

        Event-driven (a follow stream whose filter matches no line), not a poll
        loop. Raises ``AgentTimeout`` when ``timeout`` seconds pass first.
        """
        with self._wait_stream(job_id, timeout) as lines:
            for _ in lines:
                pass
            return lines.final

    def _wait_stream(self, job_id: str, timeout: float | None) -> LogStream:
        return self.stream(
            job_id,
            follow=True,
            ranks=[0],
            streams=["stdout"],
            regex=_NEVER_MATCHES,
            timeout=timeout,
        )

    def close(self) -> None:
        """Close the channel. Idempotent."""
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLogStream(_AsyncCall, AsyncIterator[Any]):
    """The asyncio twin of :class:`LogStream`."""

    def __init__(self, client: AsyncAgentClient, state: _StreamState) -> None:
        self._client = client
        self._state = state
        self._call: Any = None
        self._iter: Any = None
        self._closed = False

    @property
    def final(self) -> Any:
        return self._state.final

    @property
    def restart_count(self) -> int | None:
        return self._state.restart_count

    def cursors(self) -> list[Any]:
        return self._state.cursors()

    def __aiter__(self) -> AsyncLogStream:
        return self

    async def __anext__(self) -> Any:
        state = self._state
        while True:
            if state.pending:
                return state.pending.popleft()
            if state.done or self._closed:
                raise StopAsyncIteration
            if self._call is None:
                self._call = self._client._stub.Stream(
                    state.request(),
                    timeout=state.remaining(),
                    metadata=self._client._metadata,
                )
                self._iter = self._call.__aiter__()
            try:
                state.take(await self._iter.__anext__())
            except StopAsyncIteration:
                self._call = None
                if not state.follow:
                    state.done = True
                else:
                    await self._reconnect(None)
            except grpc.RpcError as err:
                self._call = None
                if self._closed:
                    raise StopAsyncIteration from None
                await self._reconnect(err)

    async def _reconnect(self, err: grpc.RpcError | None) -> None:
        delay = self._state.backoff(self._client.address, err)
        await asyncio.sleep(delay)


class AsyncStatusWatch(_AsyncCall, AsyncIterator[Any]):
    """The asyncio twin of :class:`StatusWatch`."""

    def __init__(self, client: AsyncAgentClient, request: Any, timeout: float | None) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self._call: Any = None
        self._iter: Any = None
        self._closed = False

    def __aiter__(self) -> AsyncStatusWatch:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._call is None:
            client = self._client
            self._call = client._stub.Watch(
                self._request, timeout=self._timeout, metadata=client._metadata
            )
            self._iter = self._call.__aiter__()
        try:
            return await self._iter.__anext__()
        except grpc.RpcError as err:
            if self._closed:
                raise StopAsyncIteration from None
            raise _error(self._client.address, err, tls=self._client._tls) from err


class AsyncAgentClient:
    """The asyncio twin of :class:`AgentClient` (same methods, awaited).

    Create it inside the event loop that will use it; ``await close()``.
    """

    def __init__(
        self,
        address: str | Node,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        stream_retries: int = DEFAULT_STREAM_RETRIES,
    ) -> None:
        self.address = str(address)
        self.timeout = timeout
        self.stream_retries = stream_retries
        self.clock = ClockEstimator()
        self._metadata = _metadata(token)
        self._tls = credentials is not None
        self._channel = (
            grpc.aio.secure_channel(self.address, credentials, options=_CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        )
        self._stub = agent_pb2_grpc.NodeAgentStub(self._channel)

    async def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(self.address, err, tls=self._tls) from err

    async def start(self, spec: Any) -> Any:
        return await self._unary(self._stub.Start, agent_pb2.StartRequest(spec=spec))

    async def poll(self, job_id: str) -> Any:
        return (await self._poll(job_id)).job

    async def _poll(self, job_id: str) -> Any:
        """The whole ``PollResponse`` (``job``, ``agent_time``, ``version``)."""
        trip = RoundTrip()
        resp = await self._unary(self._stub.Poll, agent_pb2.PollRequest(job_id=job_id))
        if resp.agent_time > 0:
            self.clock.add(trip.sample(resp.agent_time))
        return resp

    def watch(
        self,
        job_id: str,
        *,
        until_ended: bool = False,
        heartbeat: float = 0.0,
        timeout: float | None = None,
    ) -> AsyncStatusWatch:
        """The asyncio twin of :meth:`AgentClient.watch`: ``async for resp in ...``."""
        return AsyncStatusWatch(self, _watch_request(job_id, until_ended, heartbeat), timeout)

    async def info(self) -> Any:
        trip = RoundTrip()
        resp = await self._unary(self._stub.Info, agent_pb2.InfoRequest())
        if resp.agent_time > 0:
            self.clock.add(trip.sample(resp.agent_time))
        return resp

    async def list(self) -> builtins.list[Any]:
        resp = await self._unary(self._stub.List, agent_pb2.ListRequest())
        return builtins.list(resp.jobs)

    async def kill(
        self,
        job_id: str,
        *,
        signal: str | int = "SIGTERM",
        timeout: float | None = None,
        escalate: bool = True,
    ) -> Any:
        resp = await self._kill(job_id, signal=signal, timeout=timeout, escalate=escalate)
        return resp.job

    async def _kill(
        self, job_id: str, *, signal: str | int, timeout: float | None, escalate: bool
    ) -> Any:
        """The whole ``KillResponse`` (``job``, ``version``)."""
        req = agent_pb2.KillRequest(job_id=job_id, signal=str(signal), no_escalate=not escalate)
        if timeout is not None:
            req.timeout = timeout
        wait = (_AGENT_KILL_TIMEOUT if timeout is None else timeout) if escalate else 0.0
        return await self._unary(self._stub.Kill, req, timeout=self.timeout + wait)

    def stream(
        self,
        job_id: str,
        *,
        follow: bool = False,
        ranks: Iterable[int] = (),
        streams: Iterable[str | int] = (),
        contains: str = "",
        regex: str = "",
        resume: Iterable[Any] = (),
        restart_count: int | None = None,
        timeout: float | None = None,
    ) -> AsyncLogStream:
        state = _StreamState(
            job_id,
            follow=follow,
            ranks=ranks,
            streams=streams,
            contains=contains,
            regex=regex,
            resume=resume,
            restart_count=restart_count,
            timeout=timeout,
            retries=self.stream_retries,
            tls=self._tls,
        )
        return AsyncLogStream(self, state)

    async def wait(self, job_id: str, *, timeout: float | None = None) -> Any:
        async with self.stream(
            job_id,
            follow=True,
            ranks=[0],
            streams=["stdout"],
            regex=_NEVER_MATCHES,
            timeout=timeout,
        ) as lines:
            async for _ in lines:
                pass
            return lines.final

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
