"""Prometheus metrics of an agent (`--metrics-port`).

Job and rank gauges are computed at scrape time from the supervisor; RPC latencies are
observed by a server interceptor. The HTTP endpoint runs on prometheus-client's own
thread; it only reads plain counters and snapshots, never mutates agent state.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rankd.agent import resources
from rankd.agent.model import JobState
from rankd.agent.supervisor import Supervisor

__all__ = ["MetricsInterceptor", "StreamStats", "serve_metrics"]


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


def serve_metrics(
    host: str, port: int, supervisor: Supervisor, streams: StreamStats
) -> tuple[CollectorRegistry, int]:
    """Start the HTTP endpoint on (host, port); returns the registry and the bound port."""
    registry = CollectorRegistry()
    registry.register(_AgentCollector(supervisor, streams))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return registry, int(server.server_port)
