"""The jobs an agent holds in memory, by id, and the order in which they ended."""

from __future__ import annotations

import logging

from rankd.agent.errors import JobNotFound, LimitExceeded
from rankd.agent.model import Job

__all__ = ["JobTable"]

logger = logging.getLogger(__name__)


class JobTable:
    """At most `max_jobs` jobs. Room for a new one is made by forgetting the job whose
    current attempt ended longest ago (its files and job.json stay on disk); the order
    of the ends is kept as they happen, so that no Start scans every job."""

    def __init__(self, max_jobs: int) -> None:
        self.max_jobs = max_jobs
        self._jobs: dict[str, Job] = {}
        self._ended: dict[str, None] = {}  # ids, the job that ended longest ago first

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def job(self, job_id: str) -> Job:
        """The job; raises JobNotFound."""
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} on this agent")
        return job

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def restore(self, jobs: list[Job]) -> None:
        """Hold jobs whose attempts have all ended (from job.json), oldest first."""
        for job in jobs:
            if job.job_id in self._jobs:
                logger.warning("job %s recorded twice; keeping %s", job.job_id, job.run_dir)
            self._jobs[job.job_id] = job
        for job in sorted(self._jobs.values(), key=lambda j: j.current.end_time):
            self._ended[job.job_id] = None

    def make_room(self) -> None:
        """Room for one more job; raises LimitExceeded when every job held runs."""
        if len(self._jobs) < self.max_jobs:
            return
        for job_id in self._ended:
            del self._ended[job_id]
            del self._jobs[job_id]
            logger.info("forgetting job %s (ended longest ago) to stay within --max-jobs", job_id)
            return
        raise LimitExceeded(
            f"this agent runs {len(self._jobs)} jobs, its limit (--max-jobs); "
            "wait for one to end or kill one"
        )

    def started(self, job: Job) -> None:
        """The job (new, or held already) has started an attempt."""
        self._jobs[job.job_id] = job
        self._ended.pop(job.job_id, None)

    def ended(self, job_id: str) -> Job | None:
        """The job's current attempt has ended: it is now the last to be forgotten.
        Returns the job (None when not held)."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._ended.pop(job_id, None)
            self._ended[job_id] = None
        return job
