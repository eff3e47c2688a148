"""What follows an attempt's end. The end itself is published at once (state, waiters,
the --max-jobs order); what nobody waits for is put off a moment, so that it does not
delay the answers that follow (the Kill's, the Poll that sees the end): the job.json
record, and the log line with the kill of what the ranks left behind."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time

from rankd.agent.deferred import Deferred
from rankd.agent.follow import LogWatcher
from rankd.agent.model import Attempt, Job
from rankd.agent.registry import JobTable
from rankd.agent.store import JobStore
from rankd.agent.terminator import Terminator

__all__ = ["CLEANUP_DELAY", "RECORD_DELAY", "Endings"]

logger = logging.getLogger(__name__)

RECORD_DELAY = 0.01  # seconds from an attempt's end to its job.json write
CLEANUP_DELAY = 0.002  # seconds from an attempt's end to its log line and leftover kill


class Endings:
    """An attempt's end chores, put off by job id: an earlier attempt's chores, if still
    waiting, run before a later one's."""

    def __init__(
        self, jobs: JobTable, store: JobStore, watcher: LogWatcher, terminator: Terminator
    ) -> None:
        self._jobs = jobs
        self._store = store
        self._watcher = watcher
        self._terminator = terminator
        self._records = Deferred(RECORD_DELAY)
        self._cleanups = Deferred(CLEANUP_DELAY)

    def end(self, attempt: Attempt) -> None:
        """Every rank of `attempt` has exited: publish its end and put off the chores."""
        attempt.end(time.time())
        job_id = attempt.spec.job_id
        self._record(self._jobs.ended(job_id), attempt)
        self._cleanups.put(job_id, functools.partial(self._log_and_kill_leftovers, attempt))

    def before_start(self, job_id: str) -> None:
        """A Start of `job_id` is coming: its last attempt's leftovers go first."""
        self._cleanups.flush(job_id)

    def flush(self) -> None:
        """Run every waiting chore now (the agent is closing)."""
        self._cleanups.flush()
        self._records.flush()

    def _record(self, job: Job | None, attempt: Attempt) -> None:
        """RECORD_DELAY after the end: stop watching the attempt's logs, and write
        job.json (`attempt.recorded` resolves when it is on disk). A crash in that moment
        restores the attempt as FAILED ("the agent stopped"), never as RUNNING."""
        recorded: concurrent.futures.Future[None] = concurrent.futures.Future()
        attempt.recorded = recorded

        def chores() -> None:
            self._watcher.unwatch(attempt.logs)
            if job is None:
                recorded.set_result(None)
                return
            self._store.save_later(job).add_done_callback(lambda _: recorded.set_result(None))

        self._records.put(job.job_id if job is not None else attempt.marker, chores)

    def _log_and_kill_leftovers(self, attempt: Attempt) -> None:
        """CLEANUP_DELAY after the end, or at once when a Start of the same job, its next
        end, or the agent's close comes first: log the end and kill what the ranks left."""
        logger.info(
            "job %s attempt %d ended: %s",
            attempt.spec.job_id,
            attempt.restart_count,
            attempt.state.value,
            extra=attempt.log_extra(),
        )
        self._terminator.kill_leftovers(attempt)
