"""The server streams of one agent: log lines and status pushes, blocking and asyncio.

:class:`LogStream` / :class:`AsyncLogStream` iterate a job's ``LogLine`` messages
and reconnect after UNAVAILABLE, resuming from the cursors of the lines already
received, so every line arrives exactly once; ``chunks()`` gives the same lines
already rendered (``prefix + text + "\n"``), a block at a time, for consumers that print
them (a ``LogLine`` message per line costs ten times the rendering). :class:`StatusWatch` /
:class:`AsyncStatusWatch` iterate ``WatchResponse`` messages without reconnecting
(a new watch starts with the full status). What the two faces share (request,
cursors, backoff, unpacking) lives in one place; each face only waits its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Self, TypedDict

import grpc

from rankd.client.errors import AgentUnavailable
from rankd.client.rpc import Endpoint, is_tls_misconfiguration
from rankd.v1 import agent_pb2

__all__ = [
    "AsyncLogStream",
    "AsyncStatusWatch",
    "LogStream",
    "StatusWatch",
    "StreamOptions",
    "TextChunk",
    "follow_to_end",
    "render_block",
    "stream_kind",
    "unpack_block",
]

_NEVER_MATCHES = "(?!)"

#: A stub's streaming method: ``rpc(request, timeout=..., metadata=...)`` -> the call.
StreamRpc = Callable[..., Any]


class StreamOptions(TypedDict, total=False):
    """What :meth:`AgentClient.stream` takes besides the job id (every key optional).

    ``follow`` (False): stay open until the job ends; ``ranks``: local ranks (empty =
    the job's ``local_ranks_filter``, else all); ``streams``: ``"stdout"``/``"stderr"``
    (empty = both); ``contains``/``regex`` (""): line filters; ``resume``: ``Cursor``s
    from an earlier stream; ``restart_count`` (None = the latest): the attempt to read;
    ``timeout`` (None = none): overall deadline in seconds; ``heartbeat`` (0 = none),
    with ``follow``: seconds of silence after which the agent sends an empty message,
    a sign of life for the client's liveness (never yielded as a line).
    """

    follow: bool
    ranks: Iterable[int]
    streams: Iterable[str | int]
    contains: str
    regex: str
    resume: Iterable[agent_pb2.Cursor]
    restart_count: int | None
    timeout: float | None
    heartbeat: float


def follow_to_end(timeout: float | None = None) -> StreamOptions:
    """A follow stream whose filter matches no line: it carries only the job's end,
    which is how a client waits for a job without polling."""
    return {
        "follow": True,
        "ranks": [0],
        "streams": ["stdout"],
        "regex": _NEVER_MATCHES,
        "timeout": timeout,
    }


def unpack_block(block: agent_pb2.LogBlock) -> list[agent_pb2.LogLine]:
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


@dataclass(frozen=True, slots=True)
class TextChunk:
    """Consecutive lines of one rank's stream, each rendered ``prefix + text + "\n"``
    (as ``rankd logs`` prints them); ``count`` lines in ``text``."""

    local_rank: int
    stream: int
    text: str
    count: int


def render_block(block: agent_pb2.LogBlock) -> str:
    """A ``LogBlock``'s lines, each ``prefix + text + "\n"``: the same text as its
    ``unpack_block`` lines give, decoded as a whole (a newline never sits inside a
    UTF-8 sequence, so line by line and all at once decode alike). The prefixes go in
    as bytes, before the one decode: half the time of doing it on the text."""
    data = block.data
    if block.partial:
        return f"{block.prefix}{data.decode('utf-8', errors='replace')}\n"
    cut = data.rfind(b"\n") + 1  # as unpack_block: nothing after the last newline
    if cut != len(data):
        data = data[:cut]
    if data and block.prefix:
        prefix = block.prefix.encode()  # a protobuf string: valid UTF-8
        data = (prefix + data).replace(b"\n", b"\n" + prefix)[: -len(prefix)]
    return data.decode("utf-8", errors="replace")


def stream_kind(stream: str | int) -> int:
    """``"stdout"``/``"stderr"`` (or the enum value) -> ``StreamKind``."""
    if isinstance(stream, int):
        return stream
    try:
        return {"stdout": agent_pb2.STDOUT, "stderr": agent_pb2.STDERR}[stream.lower()]
    except KeyError:
        raise ValueError(f"unknown stream {stream!r}: use 'stdout' or 'stderr'") from None


class _StreamState:
    """The request of a log stream and where to resume it after a broken connection."""

    def __init__(
        self, endpoint: Endpoint, job_id: str, retries: int, options: StreamOptions
    ) -> None:
        unknown = sorted(options.keys() - StreamOptions.__optional_keys__)
        if unknown:  # as Python says it for a keyword parameter
            raise TypeError(f"stream() got an unexpected keyword argument {unknown[0]!r}")
        timeout = options.get("timeout")
        self.endpoint = endpoint
        self.job_id = job_id
        self.follow = options.get("follow", False)
        self.ranks = list(options.get("ranks", ()))
        self.streams: list[Any] = [stream_kind(s) for s in options.get("streams", ())]
        self.contains = options.get("contains", "")
        self.regex = options.get("regex", "")
        self.restart_count = options.get("restart_count")
        self.heartbeat = options.get("heartbeat", 0.0)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.retries = retries
        self.retries_left = retries
        # Reconnects since the last answer: the exponent of the backoff.
        self.backoff_step = 0
        self.offsets: dict[tuple[int, int], int] = {
            (c.local_rank, c.stream): c.offset for c in options.get("resume", ())
        }
        self.pending: deque[Any] = deque()  # LogLines, or TextChunks when `rendered`
        self.rendered = False
        self.final: agent_pb2.JobStatus | None = None
        self.done = False

    def request(self) -> agent_pb2.StreamRequest:
        req = agent_pb2.StreamRequest(
            job_id=self.job_id,
            ranks=self.ranks,
            streams=self.streams,
            contains=self.contains,
            regex=self.regex,
            follow=self.follow,
            resume=self.cursors(),
            packed=True,  # the agent sends raw blocks, we split them (see take)
            heartbeat=self.heartbeat,
        )
        if self.restart_count is not None:
            req.restart_count = self.restart_count
        return req

    def cursors(self) -> list[agent_pb2.Cursor]:
        # The stub types enum fields as StreamKind; protobuf takes the plain ints we keep.
        return [
            agent_pb2.Cursor(local_rank=rank, stream=kind, offset=offset)  # type: ignore[arg-type]
            for (rank, kind), offset in sorted(self.offsets.items())
        ]

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def take(self, resp: agent_pb2.StreamResponse) -> None:
        """Queue a response's lines and advance the cursors past them."""
        self.endpoint.liveness.heard()
        # Pin the attempt: a resumed stream must read the same attempt's files.
        self.restart_count = resp.restart_count
        for line in resp.lines:
            self.offsets[(line.local_rank, line.stream)] = line.offset
            if self.rendered:
                text = f"{line.prefix}{line.text}\n"
                self.pending.append(TextChunk(line.local_rank, line.stream, text, 1))
            else:
                self.pending.append(line)
        for block in resp.blocks:
            # the cursor after a block's last line: its end (a partial one has no newline)
            self.offsets[(block.local_rank, block.stream)] = block.offset + len(block.data)
            if self.rendered:
                text = render_block(block)
                count = block.count or 1
                self.pending.append(TextChunk(block.local_rank, block.stream, text, count))
            else:
                self.pending.extend(unpack_block(block))
        # An answer means the connection works again: the retry budget is per outage.
        self.backoff_step = 0
        self.retries_left = self.retries
        if resp.end:
            self.final = resp.job
            self.done = True

    def lost(self, err: grpc.RpcError | None) -> float:
        """The call ended (``err`` None) or failed: seconds to wait before calling
        again (0 when the stream is done); raises when the stream cannot go on."""
        if err is None and not self.follow:
            self.done = True
            return 0.0
        return self.backoff(err)  # err None: a follow stream cut before its end message

    def backoff(self, err: grpc.RpcError | None) -> float:
        """Seconds to wait before reconnecting; raises when the stream cannot go on.

        Only UNAVAILABLE (and a follow stream cut before its end message) is
        retried, a bounded number of times with exponential backoff; never a
        certificate the client rejects.
        """
        code = err.code() if err is not None else grpc.StatusCode.UNAVAILABLE
        if err is not None:
            self.endpoint.liveness.broke(code.name, str(err.details() or ""))
        retry = code == grpc.StatusCode.UNAVAILABLE and self.retries_left > 0
        if not retry or (err is not None and is_tls_misconfiguration(err)):
            if err is None:
                raise AgentUnavailable(
                    self.endpoint.address, "UNAVAILABLE", "stream ended before the job did"
                )
            raise self.endpoint.error(err) from err
        self.retries_left -= 1
        delay = min(0.1 * 2**self.backoff_step, 2.0)
        self.backoff_step += 1
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


class _Lines(_Cancellable):
    """What both log stream faces share: the state, and opening and losing calls."""

    def __init__(
        self, endpoint: Endpoint, rpc: StreamRpc, job_id: str, retries: int, options: StreamOptions
    ) -> None:
        self._endpoint = endpoint
        self._rpc = rpc
        self._state = _StreamState(endpoint, job_id, retries, options)
        self._call: Any = None
        self._closed = False

    @property
    def final(self) -> agent_pb2.JobStatus | None:
        """The job's final ``JobStatus`` (follow streams, once ended), else None."""
        return self._state.final

    @property
    def restart_count(self) -> int | None:
        """The attempt the lines belong to (known after the first answer)."""
        return self._state.restart_count

    def cursors(self) -> list[agent_pb2.Cursor]:
        """Resume points after the last line received, per (rank, stream)."""
        return self._state.cursors()

    def _open(self) -> Any:
        state = self._state
        return self._rpc(
            state.request(), timeout=state.remaining(), metadata=self._endpoint.metadata
        )

    def _lost(self, err: grpc.RpcError | None) -> float:
        """The call ended or failed: seconds to wait before the next step."""
        self._call = None
        return 0.0 if self._closed else self._state.lost(err)


class LogStream(_Lines, _SyncCall, Iterator[agent_pb2.LogLine]):
    """Iterator of ``LogLine`` from one agent, reconnecting on UNAVAILABLE.

    After a broken connection it resumes from the cursors of the lines already
    received, so every line arrives exactly once. With ``follow`` it ends when
    the job has ended; ``final`` then holds the job's final ``JobStatus``.
    ``close()`` (or leaving a ``with`` block) cancels the RPC.
    """

    def __iter__(self) -> LogStream:
        return self

    def __next__(self) -> agent_pb2.LogLine:
        if not self._fill():
            raise StopIteration
        return self._state.pending.popleft()

    def chunks(self) -> Iterator[TextChunk]:
        """The same lines as :class:`TextChunk` (rendered, a block at a time); use
        instead of iterating the stream, not beside it."""
        self._state.rendered = True
        while self._fill():
            yield self._state.pending.popleft()

    def _fill(self) -> bool:
        """Wait until something is pending: False when the stream is done."""
        state = self._state
        while not state.pending:
            if state.done or self._closed:
                return False
            if self._call is None:
                self._call = self._open()
            try:
                state.take(next(self._call))
            except StopIteration:
                time.sleep(self._lost(None))
            except grpc.RpcError as err:
                time.sleep(self._lost(err))
        return True

    def drain(self) -> agent_pb2.JobStatus | None:
        """Read to the end and close; ``final``."""
        with self:
            for _ in self:
                pass
        return self.final


class AsyncLogStream(_Lines, _AsyncCall, AsyncIterator[agent_pb2.LogLine]):
    """The asyncio twin of :class:`LogStream`."""

    _iter: Any = None

    def __aiter__(self) -> AsyncLogStream:
        return self

    async def __anext__(self) -> agent_pb2.LogLine:
        if not await self._fill():
            raise StopAsyncIteration
        return self._state.pending.popleft()

    async def chunks(self) -> AsyncIterator[TextChunk]:
        """The asyncio twin of :meth:`LogStream.chunks`."""
        self._state.rendered = True
        while await self._fill():
            yield self._state.pending.popleft()

    async def _fill(self) -> bool:
        state = self._state
        while not state.pending:
            if state.done or self._closed:
                return False
            if self._call is None:
                self._call = self._open()
                self._iter = self._call.__aiter__()
            try:
                state.take(await self._iter.__anext__())
            except StopAsyncIteration:
                await asyncio.sleep(self._lost(None))
            except grpc.RpcError as err:
                await asyncio.sleep(self._lost(err))
        return True

    async def drain(self) -> agent_pb2.JobStatus | None:
        """Read to the end and close; ``final``."""
        async with self:
            async for _ in self:
                pass
        return self.final


class _Watch(_Cancellable):
    """What both watch faces share: the request and how a call is opened."""

    def __init__(
        self,
        endpoint: Endpoint,
        rpc: StreamRpc,
        request: agent_pb2.WatchRequest,
        timeout: float | None,
    ) -> None:
        self._endpoint = endpoint
        self._rpc = rpc
        self._request = request
        self._timeout = timeout
        self._call: Any = None
        self._closed = False

    def _open(self) -> Any:
        return self._rpc(self._request, timeout=self._timeout, metadata=self._endpoint.metadata)


class StatusWatch(_Watch, _SyncCall, Iterator[agent_pb2.WatchResponse]):
    """Iterator of ``WatchResponse`` from one agent (see :meth:`AgentClient.watch`).

    Ends after the ``ended`` message of an ``until_ended`` watch, or when the agent
    closes the stream; raises ``AgentError`` when the RPC fails (no reconnection:
    a new watch starts with the full current status). ``close()`` (or leaving a
    ``with`` block) cancels the RPC.
    """

    def __iter__(self) -> StatusWatch:
        return self

    def __next__(self) -> agent_pb2.WatchResponse:
        if self._closed:
            raise StopIteration
        if self._call is None:
            self._call = self._open()
        try:
            resp: agent_pb2.WatchResponse = next(self._call)
        except grpc.RpcError as err:
            if self._closed:
                raise StopIteration from None
            raise self._endpoint.error(err) from err
        self._endpoint.liveness.heard()
        return resp


class AsyncStatusWatch(_Watch, _AsyncCall, AsyncIterator[agent_pb2.WatchResponse]):
    """The asyncio twin of :class:`StatusWatch`."""

    _iter: Any = None

    def __aiter__(self) -> AsyncStatusWatch:
        return self

    async def __anext__(self) -> agent_pb2.WatchResponse:
        if self._closed:
            raise StopAsyncIteration
        if self._call is None:
            self._call = self._open()
            self._iter = self._call.__aiter__()
        try:
            resp: agent_pb2.WatchResponse = await self._iter.__anext__()
        except grpc.RpcError as err:
            if self._closed:
                raise StopAsyncIteration from None
            raise self._endpoint.error(err) from err
        self._endpoint.liveness.heard()
        return resp
