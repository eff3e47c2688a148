"""An event loop on a daemon thread, for the blocking faces of asyncio APIs.

:class:`~rankd.client.cluster.Cluster` runs its ``AsyncCluster`` here: one
implementation, a blocking face over it. ``run`` turns Ctrl-C in the calling thread
into a cancellation of the task on the loop and waits a bounded time for its cleanup.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
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

    def close(self, settle: float = 2.0) -> None:
        """Let what still runs on the loop finish (``settle`` seconds at most), cancel
        the rest, then stop and close the loop.

        What still runs after the caller closed its channels is gRPC's own: a task per
        cancelled call that waits for the call's final status. Cancelling it instead
        leaves that status in gRPC's queue, to be delivered later to this closed loop
        from whichever loop polls the queue next: an "Event loop is closed" traceback
        per call, thousands of them after a cluster of thousands of nodes."""

        async def drain() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=settle)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(drain(), self.loop).result(timeout=settle + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


async def _as_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    return asyncio.get_running_loop().create_task(coro)
