"""Prometheus metrics of an agent (`--metrics-port`).

Job and rank gauges are computed at scrape time from the supervisor; RPC latencies are
observed by a server interceptor. The HTTP endpoint (`MetricsEndpoint`) runs on the
agent's event loop: a connection costs a task, not a thread, and the scrape reads the
supervisor's state where it changes, never from another thread.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rankd.agent import resources
from rankd.agent.errors import RankdError
from rankd.agent.model import JobState
from rankd.agent.supervisor import Supervisor

__all__ = [
    "METRICS_BACKLOG",
    "METRICS_MAX_CONNECTIONS",
    "METRICS_TIMEOUT",
    "MetricsEndpoint",
    "MetricsInterceptor",
    "StreamStats",
    "metrics_registry",
]

logger = logging.getLogger(__name__)

#: Scrape connections served at once. One more evicts the oldest connection that has
#: not sent its request yet (so idle sockets cannot lock Prometheus out), or is refused
#: when every one is being answered.
METRICS_MAX_CONNECTIONS = 32
#: Seconds a scrape connection has to send its request, and again to take the answer.
METRICS_TIMEOUT = 5.0
#: Connections the kernel queues for the endpoint before it accepts them.
METRICS_BACKLOG = 128
#: Bytes of request line and headers read at most (a scraper sends a few hundred).
_MAX_REQUEST_HEAD = 8192


class StreamStats:
    """Counters the Stream and Watch RPCs update on the event loop."""

    def __init__(self) -> None:
        self.lines = 0
        self.bytes = 0
        self.active = 0
        self.watches = 0
        self.watch_messages = 0


class _AgentCollector(Collector):
    def __init__(self, supervisor: Supervisor, streams: StreamStats) -> None:
        self._sup = supervisor
        self._streams = streams

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("rankd_jobs", "Jobs held by the agent, by state", labels=["state"])
        by_state = dict.fromkeys((s.value for s in JobState), 0)
        running_ranks = 0
        for job in list(self._sup.jobs()):
            attempt = job.current
            by_state[attempt.state.value] += 1
            running_ranks += sum(1 for r in list(attempt.ranks) if r.alive)
        for state, count in by_state.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("rankd_ranks_running", "Ranks alive now", value=running_ranks)
        exits = CounterMetricFamily("rankd_rank_exits", "Rank exits by reason", labels=["reason"])
        for reason, count in dict(self._sup.exit_counts).items():
            exits.add_metric([reason], count)
        yield exits
        yield CounterMetricFamily(
            "rankd_log_lines_streamed", "Log lines sent by Stream", value=self._streams.lines
        )
        yield CounterMetricFamily(
            "rankd_log_bytes_streamed", "Log bytes sent by Stream", value=self._streams.bytes
        )
        yield GaugeMetricFamily(
            "rankd_active_streams", "Stream RPCs open now", value=self._streams.active
        )
        yield GaugeMetricFamily(
            "rankd_active_watches", "Watch RPCs open now", value=self._streams.watches
        )
        yield CounterMetricFamily(
            "rankd_watch_messages",
            "Job statuses and heartbeats sent by Watch",
            value=self._streams.watch_messages,
        )
        yield from self._node()

    def _node(self) -> Iterator[Any]:
        """What the node lends the agent: inotify, disk space, descriptors, the guardian."""
        sup = self._sup
        follow = GaugeMetricFamily(
            "rankd_log_follow_mode",
            "How the agent follows log files (1 for the mode in use): inotify, or poll when "
            "inotify could not be had",
            labels=["mode"],
        )
        for mode in ("inotify", "poll"):
            follow.add_metric([mode], 1 if sup.follow_mode == mode else 0)
        yield follow
        yield GaugeMetricFamily(
            "rankd_log_attempts_polled",
            "Running attempts whose logs are polled (inotify watches used up)",
            value=sup.polled_attempts,
        )
        yield GaugeMetricFamily(
            "rankd_log_dir_free_bytes",
            "Bytes free on the log directory's file system (-1: unknown)",
            value=sup.free_space(),
        )
        yield GaugeMetricFamily(
            "rankd_log_dir_min_free_bytes",
            "--min-free-space: Starts are refused below it (0: no check)",
            value=sup.min_free_space,
        )
        open_fds, soft = resources.fd_usage()
        yield GaugeMetricFamily(
            "rankd_open_fds", "File descriptors the agent has open", value=open_fds
        )
        yield GaugeMetricFamily(
            "rankd_fd_limit", "The agent's soft limit of file descriptors", value=soft
        )
        yield GaugeMetricFamily(
            "rankd_guardian_up",
            "1 while the agent's guardian runs (it kills the ranks if the agent dies)",
            value=1 if sup.guardian_pid else 0,
        )
        yield CounterMetricFamily(
            "rankd_guardian_restarts",
            "Guardians started after the first one died",
            value=sup.guardian_restarts,
        )


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Observes every RPC's duration by method and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._latency = Histogram(
            "rankd_rpc_duration_seconds",
            "RPC latency by method and status code",
            ["method", "code"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30, 300),
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        observe = self._latency.labels

        def code_of(context: grpc.aio.ServicerContext, failed: bool) -> str:
            code = context.code()
            if code is None:
                return "INTERNAL" if failed else "OK"
            return code.name if isinstance(code, grpc.StatusCode) else str(code)

        if handler.unary_unary:
            inner: Any = handler.unary_unary  # an async function on an aio server

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                failed = True
                try:
                    result = await inner(request, context)
                    failed = False
                    return result
                finally:
                    observe(method, code_of(context, failed)).observe(time.perf_counter() - start)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_stream: Any = handler.unary_stream  # an async generator on an aio server

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                failed = True
                try:
                    async for item in inner_stream(request, context):
                        yield item
                    failed = False
                finally:
                    observe(method, code_of(context, failed)).observe(time.perf_counter() - start)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def metrics_registry(supervisor: Supervisor, streams: StreamStats) -> CollectorRegistry:
    """A registry with the agent's job, rank and node metrics (read at scrape time)."""
    registry = CollectorRegistry()
    registry.register(_AgentCollector(supervisor, streams))
    return registry


class MetricsEndpoint:
    """`GET /metrics` over HTTP/1.1 on the running event loop: Prometheus text of
    `registry`, one request per connection. Bounded: `METRICS_MAX_CONNECTIONS`
    connections, `METRICS_TIMEOUT` to send the request and again to take the answer,
    `_MAX_REQUEST_HEAD` bytes of request head. Anything but GET is 405, any other path
    404."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port  # 0 until started: any free port
        self._open: set[asyncio.StreamWriter] = set()
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # no request yet, oldest first
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen, and say where on stderr (`metrics on HOST:PORT`); RankdError when it
        cannot listen there."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, backlog=METRICS_BACKLOG, limit=_MAX_REQUEST_HEAD
            )
        except OSError as err:
            raise RankdError(
                f"cannot serve metrics on {self.host}:{self.port}: {err.strerror}"
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)
        print(f"metrics on {self.host}:{self.port}", file=sys.stderr, flush=True)

    async def close(self) -> None:
        """Stop listening and drop every connection. Idempotent."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            writer.transport.abort()
            return
        try:
            async with asyncio.timeout(METRICS_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if writer not in self._waiting:
                return  # evicted while its request came in
            del self._waiting[writer]
            answer = self._answer(head.split(b"\r\n", 1)[0])
            # No write buffer of our own: drain returns once the kernel has all of it.
            writer.transport.set_write_buffer_limits(high=0)
            writer.write(answer)
            async with asyncio.timeout(METRICS_TIMEOUT):
                await writer.drain()
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # slow, oversized, malformed or gone: the connection is dropped
        finally:
            self._waiting.pop(writer, None)
            self._open.discard(writer)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a reader too slow to take the answer
            else:
                writer.close()

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Room for one more connection: evict the oldest one still silent if full."""
        if len(self._open) >= METRICS_MAX_CONNECTIONS:
            if not self._waiting:
                return False
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self._open.discard(oldest)
            oldest.transport.abort()
        self._open.add(writer)
        self._waiting[writer] = None
        return True

    def _answer(self, request_line: bytes) -> bytes:
        """The whole HTTP response to `request_line` (`GET /metrics HTTP/1.1`)."""
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET":
            return _response(b"405 Method Not Allowed", b"only GET /metrics\n", b"GET")
        if path != b"/metrics":
            return _response(b"404 Not Found", b"metrics are at /metrics\n")
        return _response(b"200 OK", generate_latest(self.registry), content=CONTENT_TYPE_LATEST)


def _response(
    status: bytes, body: bytes, allow: bytes = b"", content: str = "text/plain; charset=utf-8"
) -> bytes:
    head = [b"HTTP/1.1 " + status, b"Content-Type: " + content.encode()]
    head += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    if allow:
        head.append(b"Allow: " + allow)
    return b"\r\n".join(head) + b"\r\n\r\n" + body
