"""Watch-fed job statuses: one Watch stream per agent and job, kept open for a cluster.

A :class:`NodeWatch` holds the latest ``JobStatus`` one agent pushed for one job. It
is *live* from the first message of a stream until that stream breaks or falls silent
(the agent sends a heartbeat after :data:`HEARTBEAT` seconds of silence, so silence
for :data:`STALE_AFTER` seconds means a lost connection, e.g. a host that vanished
without closing it). A watch that is down reconnects in the background with
exponential backoff capped at :data:`MAX_BACKOFF` seconds, never giving up until it
is closed; meanwhile its owner answers from unary RPCs.

Freshness: a live watch's status reflects every change the agent has pushed, so it
lags the agent by about one one-way network latency (the agent pushes each change the
moment its event loop sees it). All of this runs on one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from rankd.client.agent_client import AsyncAgentClient
from rankd.client.errors import AgentError, AgentTimeout, AgentUnavailable, RankdError
from rankd.v1 import agent_pb2

__all__ = ["HEARTBEAT", "MAX_BACKOFF", "STALE_AFTER", "NodeWatch", "ended", "heartbeat_for"]

logger = logging.getLogger(__name__)

#: Seconds of silence after which an agent sends a heartbeat on a Watch stream.
HEARTBEAT = 2.0
#: Seconds without any message after which a watch counts as lost.
STALE_AFTER = 3 * HEARTBEAT
#: Bounds of the reconnection backoff, seconds.
MIN_BACKOFF = 0.05
MAX_BACKOFF = 5.0


def heartbeat_for(node_timeout: float) -> float:
    """The heartbeat to ask of an agent (a Watch's or a follow Stream's) so that a
    quiet node is heard from well within ``node_timeout``."""
    return max(min(HEARTBEAT, node_timeout / 4), 0.1)


def ended(status: agent_pb2.JobStatus) -> bool:
    """Has the attempt of this ``JobStatus`` ended (every rank exited)?"""
    return bool(status.ranks) and all(r.HasField("exit_code") for r in status.ranks)


class NodeWatch:
    """One agent's Watch stream of one job, and the status it last pushed.

    Create inside the event loop; ``await close()`` when done. ``status`` is
    meaningful while ``live``; ``error`` says why the watch is down (None while it
    is live or connecting for the first time). ``heartbeat`` and ``stale_after``
    (seconds) default to :data:`HEARTBEAT` and :data:`STALE_AFTER`.
    """

    def __init__(
        self,
        client: AsyncAgentClient,
        job_id: str,
        *,
        heartbeat: float | None = None,
        stale_after: float | None = None,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.heartbeat = HEARTBEAT if heartbeat is None else heartbeat
        self.stale_after = STALE_AFTER if stale_after is None else stale_after
        self.live = False
        self.status: agent_pb2.JobStatus | None = None
        # the last status received, kept while the watch is down (what the node ran)
        self.last_seen: agent_pb2.JobStatus | None = None
        self.version = 0
        self.ended = False
        self.error: RankdError | None = None
        self._changed = asyncio.Event()
        self._kick = asyncio.Event()
        self._failures = 0
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"rankd-watch {job_id}@{client.address}"
        )

    def snapshot(self) -> agent_pb2.JobStatus:
        """A copy of the latest status (callers may change theirs freely); only
        while ``live``."""
        copy = agent_pb2.JobStatus()
        if self.status is not None:
            copy.CopyFrom(self.status)
        return copy

    def offer(self, status: agent_pb2.JobStatus, version: int) -> None:
        """A status from a unary answer (Poll, Kill) at `version`: kept when it is
        newer than what the watch holds, so that a caller reads its own writes."""
        if self.live and version > self.version:
            self._set(status, version, ended(status))

    def kick(self) -> None:
        """The agent answered something else: reconnect now rather than after the
        backoff."""
        self._kick.set()

    async def changed(self, timeout: float | None) -> bool:
        """Wait for the next change of ``live``/``status``/``error``; False on timeout."""
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Cancel the stream and its task; waiters see the watch down. Idempotent."""
        if self._task.done():
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._down(AgentUnavailable(self.client.address, "UNAVAILABLE", "the watch was closed"))

    # -- the stream ------------------------------------------------------------

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _set(self, status: agent_pb2.JobStatus, version: int, is_ended: bool) -> None:
        self.status, self.version, self.ended = status, version, is_ended
        self.last_seen = status
        self.live, self.error = True, None
        self._notify()

    def _down(self, error: RankdError) -> None:
        self.live, self.status, self.error = False, None, error
        self._notify()

    async def _run(self) -> None:
        try:
            while True:
                try:
                    await self._follow()
                    error: RankdError = AgentUnavailable(
                        self.client.address, "UNAVAILABLE", "the agent ended the watch"
                    )
                except RankdError as err:
                    error = err
                except Exception as err:  # never a live-looking watch that no task feeds
                    logger.warning("watch of %s failed", self.job_id, exc_info=True)
                    error = AgentError(self.client.address, "UNKNOWN", f"watch failed: {err!r}")
                self._down(error)
                delay = min(MIN_BACKOFF * 2**self._failures, MAX_BACKOFF)
                self._failures += 1
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._kick.wait()
        finally:
            self.live = False

    async def _follow(self) -> None:
        """Take the stream's messages until it ends, breaks or falls silent."""
        first = True
        async with self.client.watch(self.job_id, heartbeat=self.heartbeat) as updates:
            while True:
                try:
                    async with asyncio.timeout(self.stale_after):
                        update = await anext(updates)
                except StopAsyncIteration:
                    return
                except TimeoutError as err:
                    if isinstance(err, RankdError):
                        raise
                    raise AgentTimeout(
                        self.client.address,
                        "DEADLINE_EXCEEDED",
                        f"the watch of job {self.job_id!r} fell silent for {self.stale_after:g}s",
                    ) from None
                self._failures = 0
                if not update.HasField("job"):
                    continue  # a heartbeat
                # A new stream resyncs; within one, an offered newer status stays.
                if first or update.version >= self.version:
                    self._set(update.job, update.version, update.ended)
                first = False
