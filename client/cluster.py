"""Many agents at once: :class:`AsyncCluster` (asyncio) and :class:`Cluster` (blocking).

Every call fans out to all nodes concurrently, so N nodes cost about one round
trip; each node answers a :class:`NodeResult` (a value or its own error) within
the RPC deadline, and a dead or slow node never holds up the others.
``launch`` runs a whole multi-node job (see :mod:`client.launch`).

``Cluster`` runs an ``AsyncCluster`` on a private event-loop thread; launch
callbacks (``on_line``, ``on_event``, ``on_progress``) run on that thread.
Ctrl-C in a blocking call cancels it, and a cancelled ``launch`` kills the job
on every node before ``KeyboardInterrupt`` propagates.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import IO, Any, TypeVar

import grpc

from client.agent_client import DEFAULT_TIMEOUT, AsyncAgentClient
from client.errors import RankdError
from client.launch import run_launch
from client.nodes import Node, parse_nodes
from client.results import NodeResult
from client.torchrun import LaunchConfig, LaunchResult, OutputLine, Progress

__all__ = ["AsyncCluster", "Cluster", "NodeResult"]

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
    """Concurrent calls to many agents (asyncio). Create it inside its event loop."""

    def __init__(
        self,
        nodes: Sequence[str | Node],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.nodes = [_as_node(n) for n in nodes]
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("a node appears twice in the cluster")
        self.names = display_names(self.nodes)
        self.timeout = timeout
        self.clients = [
            AsyncAgentClient(n, timeout=timeout, token=token, credentials=credentials)
            for n in self.nodes
        ]

    async def fan_out(
        self, call: Callable[[AsyncAgentClient], Awaitable[T]]
    ) -> builtins.list[NodeResult[T]]:
        """Run ``call`` on every node at once; one result per node, in node order."""

        async def one(rank: int, client: AsyncAgentClient) -> NodeResult[T]:
            try:
                return NodeResult(self.nodes[rank], rank, value=await call(client))
            except RankdError as err:
                return NodeResult(self.nodes[rank], rank, error=err)

        return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(self.clients))))

    async def info(self) -> builtins.list[NodeResult[Any]]:
        """Every agent's ``InfoResponse`` (also a clock sample per agent)."""
        return await self.fan_out(lambda c: c.info())

    async def poll(self, job_id: str) -> builtins.list[NodeResult[Any]]:
        """The job's ``JobStatus`` on every node."""
        return await self.fan_out(lambda c: c.poll(job_id))

    async def list(self) -> builtins.list[NodeResult[builtins.list[Any]]]:
        """Every node's jobs."""
        return await self.fan_out(lambda c: c.list())

    async def wait(
        self, job_id: str, *, timeout: float | None = None
    ) -> builtins.list[NodeResult[Any]]:
        """Wait until the job has ended on every node; final ``JobStatus`` per node."""
        return await self.fan_out(lambda c: c.wait(job_id, timeout=timeout))

    async def kill(
        self,
        job_id: str,
        *,
        signal: str | int = "SIGTERM",
        timeout: float | None = None,
        escalate: bool = True,
    ) -> builtins.list[NodeResult[Any]]:
        """Kill the job on every node; ``JobStatus`` after the kill per node."""
        return await self.fan_out(
            lambda c: c.kill(job_id, signal=signal, timeout=timeout, escalate=escalate)
        )

    async def launch(
        self,
        cmd: Sequence[str],
        *,
        on_line: Callable[[OutputLine], None] | None = None,
        on_event: Callable[[str], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_interval: float = 1.0,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        **options: Any,
    ) -> LaunchResult:
        """Run ``cmd`` on every node; see :func:`client.launch.run_launch`.

        ``options`` are the fields of :class:`client.torchrun.LaunchConfig`
        (``nproc_per_node``, ``run_id``, ``max_restarts``, ``redirects``, ``tee``,
        ``local_ranks_filter``, ``log_line_prefix_template``, ``master_addr``,
        ``master_port``, ``role_name``, ``env``, ``cwd``, ``kill_timeout``).
        Raises ``JobFailed`` with the report when the job failed.
        """
        config = LaunchConfig(cmd=tuple(cmd), **options)
        return await run_launch(
            self,
            config,
            on_line=on_line,
            on_event=on_event,
            on_progress=on_progress,
            progress_interval=progress_interval,
            stdout=stdout,
            stderr=stderr,
        )

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    async def __aenter__(self) -> AsyncCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _LoopThread:
    """An event loop on a daemon thread, and a Ctrl-C-aware way to run on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="rankd-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], *, cleanup_timeout: float = 60.0) -> T:
        """Run ``coro`` on the loop and return its result.

        On KeyboardInterrupt the task is cancelled and given ``cleanup_timeout``
        seconds to finish its cleanup (a launch kills its job), then the
        interrupt propagates.
        """
        task_future = asyncio.run_coroutine_threadsafe(_as_task(coro), self.loop)
        task = task_future.result()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def relay(t: asyncio.Task[T]) -> None:
            if t.cancelled():
                done.cancel()
            elif t.exception() is not None:
                done.set_exception(t.exception())
            else:
                done.set_result(t.result())

        self.loop.call_soon_threadsafe(task.add_done_callback, relay)
        try:
            return done.result()
        except KeyboardInterrupt:
            self.loop.call_soon_threadsafe(task.cancel)
            try:
                done.result(timeout=cleanup_timeout)
            except (concurrent.futures.CancelledError, concurrent.futures.TimeoutError):
                pass
            except Exception:
                pass  # the interrupt is what the caller must see
            raise

    def close(self) -> None:
        """Cancel what still runs on the loop, then stop and close it."""

        async def drain() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(drain(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


async def _as_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    return asyncio.get_running_loop().create_task(coro)


class Cluster:
    """Blocking twin of :class:`AsyncCluster`; same methods, same results."""

    def __init__(
        self,
        nodes: Sequence[str | Node],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._runner = _LoopThread()

        async def make() -> AsyncCluster:
            return AsyncCluster(nodes, timeout=timeout, token=token, credentials=credentials)

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

    def info(self) -> builtins.list[NodeResult[Any]]:
        return self._runner.run(self._async.info())

    def poll(self, job_id: str) -> builtins.list[NodeResult[Any]]:
        return self._runner.run(self._async.poll(job_id))

    def list(self) -> builtins.list[NodeResult[builtins.list[Any]]]:
        return self._runner.run(self._async.list())

    def wait(self, job_id: str, *, timeout: float | None = None) -> builtins.list[NodeResult[Any]]:
        return self._runner.run(self._async.wait(job_id, timeout=timeout))

    def kill(
        self,
        job_id: str,
        *,
        signal: str | int = "SIGTERM",
        timeout: float | None = None,
        escalate: bool = True,
    ) -> builtins.list[NodeResult[Any]]:
        return self._runner.run(
            self._async.kill(job_id, signal=signal, timeout=timeout, escalate=escalate)
        )

    def launch(
        self,
        cmd: Sequence[str],
        *,
        on_line: Callable[[OutputLine], None] | None = None,
        on_event: Callable[[str], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_interval: float = 1.0,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        **options: Any,
    ) -> LaunchResult:
        """Blocking :meth:`AsyncCluster.launch`. Ctrl-C kills the job everywhere,
        then raises ``KeyboardInterrupt``."""
        kill_timeout = float(options.get("kill_timeout", LaunchConfig.kill_timeout))
        return self._runner.run(
            self._async.launch(
                cmd,
                on_line=on_line,
                on_event=on_event,
                on_progress=on_progress,
                progress_interval=progress_interval,
                stdout=stdout,
                stderr=stderr,
                **options,
            ),
            cleanup_timeout=kill_timeout + 2 * self._async.timeout,
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
