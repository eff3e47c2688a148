"""A job's changes as they happen, for the Watch RPC: no polling, no idle timers.

`job_updates` waits on the supervisor's change counter (`Job.version`, bumped when an
attempt starts, a rank exits, the state changes, an attempt ends) and yields the job
each time it moved. Changes that happen while the consumer is busy with the previous
update (building or sending a message), or within `MIN_GAP` of it, are folded: the next
update carries the latest state, and the final one is never skipped. A lone change goes
out at once; a burst (32 ranks exiting over a few milliseconds) costs a few messages.

Timers exist only while someone watches: one to refresh the resource use of running
ranks at most once per `refresh` seconds, one for `heartbeat` (an update without a job
when nothing else was yielded for that long), and the short `MIN_GAP` wait in a burst.

Never imports grpc: the service adapts it to the wire.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from rankd.agent.errors import SpecError
from rankd.agent.model import Attempt, Job
from rankd.agent.supervisor import Supervisor

__all__ = [
    "MAX_HEARTBEAT",
    "MIN_GAP",
    "MIN_HEARTBEAT",
    "REFRESH",
    "Update",
    "check_heartbeat",
    "job_updates",
]

#: Seconds between resource-use refreshes while ranks run.
REFRESH = 1.0
#: Least seconds between two updates of changes: a watcher gets at most 100 a second.
MIN_GAP = 0.01
MIN_HEARTBEAT = 0.1
MAX_HEARTBEAT = 3600.0


@dataclass(frozen=True)
class Update:
    """The job at `version`; `job` and `attempt` are None on a heartbeat."""

    version: int
    job: Job | None = None
    attempt: Attempt | None = None
    ended: bool = False


def check_heartbeat(seconds: float) -> float:
    """`seconds` if it is a valid heartbeat interval (0 = none); raises SpecError."""
    if seconds == 0:
        return 0.0
    if not (math.isfinite(seconds) and MIN_HEARTBEAT <= seconds <= MAX_HEARTBEAT):
        raise SpecError(
            f"heartbeat must be 0 (none) or between {MIN_HEARTBEAT:g} and "
            f"{MAX_HEARTBEAT:g} seconds, got {seconds:g}"
        )
    return seconds


async def job_updates(
    supervisor: Supervisor,
    job_id: str,
    *,
    until_ended: bool = False,
    heartbeat: float = 0.0,
    refresh: float = REFRESH,
) -> AsyncGenerator[Update, None]:
    """The job now, then after every change (see the module doc).

    With `until_ended`, ends after the update whose current attempt has ended. Raises
    JobNotFound for an unknown job, and when the job is forgotten (--max-jobs) while
    watched: noticed at the next refresh or heartbeat.
    """
    loop = asyncio.get_running_loop()
    while True:
        job = supervisor.job(job_id)
        attempt = job.current
        seen = job.version
        ended = attempt.ended
        yield Update(seen, job, attempt, ended)
        if until_ended and ended:
            return
        refreshed = sent = loop.time()
        while True:  # until a change, or a refresh is due
            live = not ended and any(r.alive for r in attempt.ranks)
            due = [refreshed + refresh] if live else []
            if heartbeat:
                due.append(sent + heartbeat)
            try:
                async with asyncio.timeout_at(min(due) if due else None):
                    await supervisor.changed(job_id, seen)
            except TimeoutError:
                supervisor.job(job_id)  # still held?
                if live and loop.time() >= refreshed + refresh:
                    break  # same version, fresh resource use
                yield Update(seen)
                sent = loop.time()
                continue
            gap = refreshed + MIN_GAP - loop.time()
            if gap > 0:  # in a burst: fold what follows within the gap
                await asyncio.sleep(gap)
            break
