"""The node's jobs as plain data: a job, its attempts, their ranks, and their states.

Changed on the supervisor's event loop only. A `Job` numbers its changes (`version`,
raised by `bump`) and wakes whoever waits for the next one (`changed`); an `Attempt`
ends once (`end`) and wakes whoever waits for that (`wait_end`). Nothing here starts or
signals a process; `Attempt.record_exit` reads the files a failed rank left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from rankd.agent import resources
from rankd.agent.errors import JobNotFound
from rankd.agent.failures import Failure, read_failure
from rankd.agent.logs import STDERR, STDOUT, AttemptLogs
from rankd.agent.specs import JobSpec

if TYPE_CHECKING:  # the types of agent.convert's cached messages; never imported here
    from rankd.v1 import agent_pb2 as pb

__all__ = ["Attempt", "Job", "JobState", "Rank", "RankState", "WireForms"]


class JobState(Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    KILLED = "KILLED"


class RankState(Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TERMINATED = "TERMINATED"


@dataclass
class Rank:
    local_rank: int
    pid: int
    start_time: float
    stdout_path: str
    stderr_path: str
    error_file: str
    end_time: float = 0.0
    exit_code: int | None = None
    state: RankState = RankState.RUNNING
    failure: Failure | None = None
    # sizes of the rank's files when it exited (-1: unknown), for its final status
    stdout_bytes: int = -1
    stderr_bytes: int = -1
    terminated_by_agent: bool = False
    cpus: tuple[int, ...] = ()  # the CPUs it was pinned to at its start; () = not pinned
    # its pidfd from the spawn until the Terminator's exit watcher takes it over (-1)
    pidfd: int = field(default=-1, repr=False)

    @property
    def alive(self) -> bool:
        return self.exit_code is None


@dataclass(slots=True)
class WireForms:
    """What agent.convert built once for an attempt because it no longer changes: the
    spec's message, and by local rank each failure and each exited rank's status."""

    spec: pb.JobSpec | None = None
    failures: dict[int, pb.Failure] = field(default_factory=dict)
    ranks: dict[int, pb.RankStatus] = field(default_factory=dict)


@dataclass
class Attempt:
    """One attempt (restart_count) of a job on this node."""

    spec: JobSpec
    logs: AttemptLogs
    ranks: list[Rank] = field(default_factory=list)
    state: JobState = JobState.RUNNING
    reason: str = ""
    start_time: float = 0.0
    end_time: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    mirrors: list[asyncio.Task[None]] = field(default_factory=list)
    # Carried in every rank's environment (RANKD_ATTEMPT) so that descendants which left
    # the process group or their parent are still known: "<agent tag>/<job>/<attempt>".
    marker: str = ""
    terminating: asyncio.Task[None] | None = None
    live: int = 0  # ranks that have not exited
    spec_record: dict[str, Any] | None = field(default=None, repr=False)  # agent.store's
    recorded: concurrent.futures.Future[None] | None = None  # the final job.json write
    wire: WireForms = field(default_factory=WireForms, repr=False)
    # loop time of the Start or the last Renew (see Supervisor.renew), for the lease
    renewed: float = 0.0
    lease_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    # futures resolved at the end, for waits with a timeout (no task per wait)
    _end_waiters: list[asyncio.Future[None]] = field(default_factory=list, repr=False)

    @property
    def restart_count(self) -> int:
        return self.spec.restart_count

    @property
    def ended(self) -> bool:
        return self.done.is_set()

    def failures(self) -> list[Failure]:
        """Every failure, the root cause first (earliest that was not caused by the
        agent), then by time."""
        found = [r.failure for r in self.ranks if r.failure is not None]
        return sorted(found, key=lambda f: (f.terminated_by_agent, f.timestamp))

    def record_exit(self, rank: Rank, code: int, exit_time: float) -> None:
        """`rank` exited with `code` (-N: killed by signal N) at `exit_time`: its state,
        the sizes of its files (call after `LogWatcher.drain`), and unless it succeeded
        its Failure, read from its error file and stderr, and when the log file system is
        full, saying so."""
        self.live -= 1
        rank.exit_code = code
        rank.end_time = exit_time
        rank.stdout_bytes = self.logs.size(rank.local_rank, STDOUT)
        rank.stderr_bytes = self.logs.size(rank.local_rank, STDERR)
        if code == 0:
            rank.state = RankState.SUCCEEDED
            return
        rank.state = RankState.TERMINATED if rank.terminated_by_agent else RankState.FAILED
        rank.failure = read_failure(
            local_rank=rank.local_rank,
            pid=rank.pid,
            exit_code=code,
            exit_time=exit_time,
            error_file=rank.error_file,
            stderr_path=rank.stderr_path,
            terminated_by_agent=rank.terminated_by_agent,
            stderr_size=rank.stderr_bytes,
            error_file_absent=not self.logs.may_have_error_file(rank.local_rank),
        )
        if not rank.terminated_by_agent:
            # a rank that could not write its output often dies of it, and its stderr
            # tail is then empty: say so whatever the failure's own message
            note = resources.disk_full_note(self.logs.log_dir)
            if note:
                rank.failure.message = f"{rank.failure.message}; {note}"

    def end(self, end_time: float) -> None:
        """Every rank has exited: the final state (SUCCEEDED unless something else was
        decided), and every waiter of the end woken. Call once."""
        if self.state is JobState.RUNNING:
            self.state = JobState.SUCCEEDED
            self.reason = "every rank exited with code 0"
        self.end_time = end_time
        if self.lease_timer is not None:
            self.lease_timer.cancel()
            self.lease_timer = None
        self.logs.mark_ended()
        self.done.set()
        for waiter in self._end_waiters:
            _resolve(waiter)
        self._end_waiters.clear()

    async def wait_end(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the end; returns early at the end."""
        if self.ended:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._end_waiters.append(waiter)
        # resolved by the end or by the timer: one wake-up, no task
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in self._end_waiters:
                self._end_waiters.remove(waiter)

    async def drained(self) -> None:
        """Wait until the attempt ended and its console/filter mirrors wrote every line."""
        await self.done.wait()
        if self.mirrors:
            await asyncio.gather(*self.mirrors, return_exceptions=True)

    def log_extra(self, rank: Rank | None = None) -> dict[str, object]:
        """Structured fields of a log record about this attempt (see agent.logfmt)."""
        extra: dict[str, object] = {"job_id": self.spec.job_id, "restart_count": self.restart_count}
        if rank is not None:
            extra["local_rank"] = rank.local_rank
            extra["pid"] = rank.pid
        return extra


@dataclass
class Job:
    """A job (its id is the run id) and its attempts on this node, the last current."""

    job_id: str
    run_dir: str
    attempts: list[Attempt] = field(default_factory=list)
    # Raised by `bump` on every change a Poll would show (attempt started, rank exited,
    # state changed, attempt ended); `changed` waits for the next one.
    version: int = 0
    _next: asyncio.Future[int] | None = field(default=None, repr=False)

    @property
    def current(self) -> Attempt:
        return self.attempts[-1]

    def attempt(self, restart_count: int | None) -> Attempt:
        """The attempt `restart_count` (None: the current one); raises JobNotFound."""
        if restart_count is None:
            return self.current
        for attempt in self.attempts:
            if attempt.restart_count == restart_count:
                return attempt
        have = ", ".join(str(a.restart_count) for a in self.attempts)
        raise JobNotFound(f"job {self.job_id!r} has no attempt {restart_count} (has: {have})")

    def bump(self) -> None:
        """A change: the next version, and everyone in `changed` woken with it."""
        self.version += 1
        waiters, self._next = self._next, None
        if waiters is not None and not waiters.done():
            waiters.set_result(self.version)

    async def changed(self, seen: int) -> int:
        """Wait until the version differs from `seen` (at once if it does already) and
        return the new version."""
        if self.version != seen:
            return self.version
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        # shielded: one cancelled waiter must not cancel the future the others share
        return await asyncio.shield(self._next)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
