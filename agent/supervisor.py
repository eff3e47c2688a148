"""The node's worker groups: start a job's local ranks, watch them, stop them.

Behaves as torch's `SubprocessContext` with `DefaultLogsSpecs` and `TailLog`, on one
asyncio loop and without sleep loops: a rank's exit is seen through its pidfd the moment
it happens, output through inotify. All-or-nothing: the first rank that fails on its
own makes the agent terminate the others (SIGTERM, SIGKILL after the spec's
kill_timeout); those are marked `terminated_by_agent` and never taken for a root cause.

`Supervisor` is the face callers use: it holds the jobs, admits Starts, and applies the
failure policy to exits. Its parts do the work: `launch.Launcher` (directories, spawn),
`terminator.Terminator` (exits, kills, orphans), `store.JobStore` (job.json),
`mirrors` (tee and duplicate filters), `spares.SpareDirs` (directories made ahead).

This module never imports grpc: the service adapts it to the wire.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TextIO

from rankd.agent import binding, logdir, procs, resources, spares
from rankd.agent.admission import Admission
from rankd.agent.endings import Endings
from rankd.agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    SpecError,
)
from rankd.agent.follow import FOLLOW_MODES, LogWatcher
from rankd.agent.guardian import Guardian
from rankd.agent.launch import Launcher
from rankd.agent.leases import Leases
from rankd.agent.mirrors import start_mirrors
from rankd.agent.model import Attempt, Job, JobState, Rank, RankState
from rankd.agent.registry import JobTable
from rankd.agent.specs import JobSpec, Limits
from rankd.agent.store import JobStore
from rankd.agent.terminator import SIGKILL_WAIT, Exit, Terminator

# the model's names too: the types of what a Supervisor returns
__all__ = ["Attempt", "Job", "JobState", "Rank", "RankState", "Supervisor"]

logger = logging.getLogger(__name__)

_COUNTED = {state: state.value.lower() for state in RankState}  # exit_counts' keys


class Supervisor:
    """Holds every job of the node. Call from one asyncio loop.

    `log_dir`: made 0700 if missing, refused if another user could change it (LogDirError,
    see `logdir.check_log_dir`). `base_env`: the environment ranks inherit (the agent's,
    minus its secrets; never `launch.AGENT_ONLY_ENV`);
    `console_out`/`console_err` receive the tee'd lines; `subreaper=True` (the agent
    process, not a library user with other children) adopts and reaps orphans, so that
    nothing a rank started escapes; `guardian=True` starts (and restarts) the process that
    kills the ranks if this one dies; `log_follow`: "auto" (inotify, polling where it
    cannot be had) or "poll"; `min_free_space`: bytes the log disk must have for a Start.
    Its parts are bound to the loop by `bind`, all or nothing (never half-built)."""

    def __init__(
        self,
        log_dir: str,
        *,
        limits: Limits | None = None,
        base_env: Mapping[str, str] | None = None,
        console_out: TextIO | None = None,
        console_err: TextIO | None = None,
        subreaper: bool = False,
        guardian: bool = False,
        max_jobs: int = 1000,
        max_running_ranks: int = 4096,
        allowed_entrypoints: Iterable[str] | None = None,
        allowed_env: Iterable[str] = (),
        log_follow: str = "auto",
        min_free_space: int = 0,
    ) -> None:
        if log_follow not in FOLLOW_MODES:
            raise SpecError(f"log follow mode must be one of {FOLLOW_MODES}, not {log_follow!r}")
        self.log_dir = logdir.check_log_dir(log_dir)  # for the CLI and library users alike
        logdir.tighten_run_dirs(self.log_dir)
        self._admission = Admission(
            self.log_dir,
            limits=limits,
            max_running_ranks=max_running_ranks,
            allowed_entrypoints=allowed_entrypoints,
            allowed_env=allowed_env,
            min_free_space=min_free_space,
        )
        self.limits = self._admission.limits
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._out = console_out or sys.stdout
        self._err = console_err or sys.stderr
        self.tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._closing = False
        self._jobs = JobTable(max_jobs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher = LogWatcher(log_follow)  # the inotify instance now (or polling)
        self._start_lock = asyncio.Lock()
        # Called with (attempt, rank) right after a rank exited (the service caches the
        # rank's final wire form there, while the other ranks are still dying).
        self.exit_hooks: list[Callable[[Attempt, Rank], None]] = []
        spares.sweep(self.log_dir)
        self._spares = spares.SpareDirs(self.log_dir)
        self._store = JobStore(self.log_dir)
        self._launcher = Launcher(self.log_dir, self._spares)
        self._terminator = Terminator(subreaper=subreaper, on_exits=self._on_exits)
        self.children = self._terminator  # to protect the agent's other children (samplers)
        self._endings = Endings(self._jobs, self._store, self._watcher, self._terminator)
        self.usage = procs.UsageSampler()
        self.exit_counts: collections.Counter[str] = collections.Counter()
        self._leases = Leases(self._lapse)
        self._expiries: set[asyncio.Task[Attempt]] = set()  # kills of lapsed leases
        self._jobs.restore(self._store.load(max_jobs))
        if self._jobs:
            logger.info("restored %d jobs from %s", len(self._jobs), self.log_dir)
        # last: nothing after it can fail and leave it running unowned
        self._guardian = Guardian(self.tag) if guardian else None

    def bind(self) -> None:
        """Bind to the running event loop: watch the ranks' exits (and adopt orphans),
        their logs, and the guardian. Idempotent. All or nothing: raises LimitExceeded
        (out of descriptors) or OSError with nothing bound, and the next call tries
        again."""
        if self._loop is None:
            loop = asyncio.get_running_loop()
            _bind_parts(loop, self._terminator, self._watcher, self._guardian)
            self._loop = loop

    @property
    def follow_mode(self) -> str:  # how a new attempt's logs are followed: inotify, poll
        return self._watcher.mode

    @property
    def polled_attempts(self) -> int:  # running attempts whose logs are polled
        return self._watcher.polled

    @property
    def guardian_pid(self) -> int:  # 0: there is none, or none runs now
        return self._guardian.pid if self._guardian is not None else 0

    @property
    def guardian_restarts(self) -> int:
        return self._guardian.restarts if self._guardian is not None else 0

    @property
    def min_free_space(self) -> int:
        """Bytes the log directory's file system must have free for a Start (0: any)."""
        return self._admission.min_free_space

    def free_space(self) -> int:
        """Bytes free on the log directory's file system (-1: unknown)."""
        return self._admission.free_space()

    async def close(self, timeout: float = 10.0) -> None:
        """Kill every running job (SIGTERM, SIGKILL after `timeout`; at once after
        `kill_now`) and release the watchers; Starts are refused from now on. Returns
        within about `timeout` + SIGKILL_WAIT seconds."""
        self._closing = True
        running = [j.job_id for j in self._jobs.jobs() if not j.current.ended]
        await asyncio.gather(
            *(
                self.kill(job_id, signal.SIGTERM, timeout, reason="agent shutting down")
                for job_id in running
            ),
            return_exceptions=True,
        )
        for job in self._jobs.jobs():
            for task in job.current.mirrors:
                task.cancel()
        self._watcher.close()
        self._terminator.close()
        self._endings.flush()  # the loop may not run much longer
        self._store.close()  # the last job.json writes land before we return
        self._launcher.close()
        self._spares.close()
        if self._guardian is not None:  # it sweeps for stragglers and exits
            self._guardian.close()

    def kill_now(self) -> None:
        """SIGKILL every process of every running attempt, at once (a second signal to the
        agent while `close` waits for the ranks to end)."""
        self._terminator.kill_now(job.current for job in self._jobs.jobs())

    # -- queries -------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """The job; raises JobNotFound."""
        return self._jobs.job(job_id)

    def jobs(self) -> list[Job]:
        return self._jobs.jobs()

    async def wait(self, job_id: str) -> Attempt:
        """Wait for the current attempt to end, its mirrors to drain, and its job.json."""
        attempt = self.job(job_id).current
        await attempt.drained()
        if attempt.recorded is not None:
            await asyncio.wrap_future(attempt.recorded)
        return attempt

    async def changed(self, job_id: str, seen: int) -> int:
        """Wait until the job's version differs from `seen` (at once if it does already)
        and return the new version. Raises JobNotFound."""
        return await self.job(job_id).changed(seen)

    def _bump(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.bump()

    # -- start -----------------------------------------------------------------------

    async def start(self, spec: JobSpec) -> tuple[Job, bool]:
        """Start an attempt. Idempotent: the same spec returns the job and False.
        Raises SpecError (nothing started), AlreadyExists, LimitExceeded (also: too few
        descriptors or too little disk space left), PermissionDenied, FailedPrecondition
        (shutting down), GuardianError (no guardian runs)."""
        if self._closing:
            raise FailedPrecondition("this agent is shutting down: it starts no more jobs")
        self.bind()
        spec = self._admission.spec(spec)
        if self._guardian is not None:
            await self._guardian.armed()  # no rank runs unguarded
        async with self._start_lock, self._spares.held():
            self._endings.before_start(spec.job_id)  # a restart never meets the leftovers
            job = self._jobs.get(spec.job_id)
            if job is not None and _repeated(job, spec):
                return job, False
            self._admission.room(spec, self._terminator.running)
            if job is None:
                self._jobs.make_room()
            attempt = self._launch(job, spec)
            self._spares.prepare(spec.nprocs)  # for the next Start of this size
            fresh = job is None
            if job is None:
                job = Job(spec.job_id, os.path.dirname(attempt.logs.attempt_dir))
            job.attempts.append(attempt)
            assert self._loop is not None
            self._leases.hold(attempt, self._loop)
            self._jobs.started(job)
            job.bump()
            # on disk before Start answers: a crash cannot lose the job. Written here,
            # not in the io thread: the hand-over would cost more than the write.
            self._store.save_now(job, fresh=fresh)
            return job, True

    def _launch(self, job: Job | None, spec: JobSpec) -> Attempt:
        assert self._loop is not None
        attempt = self._launcher.launch(
            spec,
            None if job is None else job.run_dir,
            base_env=self._base_env,
            marker=f"{self.tag}/{spec.job_id}/{spec.restart_count}",
            watcher=self._watcher,
        )
        self._terminator.adopt(attempt)
        start_mirrors(attempt, self._out, self._err)
        if logger.isEnabledFor(logging.INFO):  # on the loop's next turn, after the answer
            self._loop.call_soon(_log_started, attempt)
        return attempt

    # -- leases ------------------------------------------------------------------------------

    def renew(self, job_id: str) -> float:
        """A client renewed the job's lease: seconds until it lapses now (0: the job has
        no lease or its current attempt has ended). Raises JobNotFound."""
        return self._leases.renew(self.job(job_id).current, self._loop)

    def _lapse(self, attempt: Attempt, reason: str) -> None:
        """No client renewed the lease of a running attempt: stop it."""
        logger.warning("job %s: %s; stopping it", attempt.spec.job_id, reason)
        job = self._jobs.get(attempt.spec.job_id)
        if job is None or job.current is not attempt:
            return
        task = asyncio.ensure_future(
            self.kill(attempt.spec.job_id, signal.SIGTERM, attempt.spec.kill_timeout, reason=reason)
        )
        self._expiries.add(task)
        task.add_done_callback(self._expiries.discard)

    # -- exits and the failure policy ------------------------------------------------------

    def _on_exits(self, exits: list[Exit]) -> None:
        """Ranks have exited (a batch, when many died at once): record each, then end the
        attempts that have no rank left, and tell the watchers once per job."""
        self._watcher.drain()  # every write the ranks made is known (AttemptLogs.size)
        touched: dict[int, Attempt] = {}
        for (attempt, rank), code, exit_time in exits:
            attempt.record_exit(rank, code, exit_time)
            self.exit_counts[_COUNTED[rank.state]] += 1
            for hook in self.exit_hooks:
                hook(attempt, rank)
            if rank.state is RankState.FAILED and attempt.state is JobState.RUNNING:
                self._fail(attempt, rank)
            touched[id(attempt)] = attempt
        for attempt in touched.values():
            if not attempt.ended and attempt.live == 0:
                self._endings.end(attempt)
            self._bump(attempt.spec.job_id)

    def _fail(self, attempt: Attempt, rank: Rank) -> None:
        """All-or-nothing, as torch's `SubprocessContext._poll`: the first rank that fails
        on its own fails the attempt, and the others are terminated."""
        assert rank.failure is not None
        attempt.state = JobState.FAILED
        attempt.reason = f"local rank {rank.local_rank} failed: {rank.failure.message}"
        logger.warning(
            "job %s: %s", attempt.spec.job_id, attempt.reason, extra=attempt.log_extra(rank)
        )
        attempt.terminating = asyncio.ensure_future(
            self._terminator.terminate(attempt, signal.SIGTERM, attempt.spec.kill_timeout)
        )

    # -- kill -------------------------------------------------------------------------------

    async def kill(
        self,
        job_id: str,
        sig: int = signal.SIGTERM,
        timeout: float = 30.0,
        *,
        escalate: bool = True,
        reason: str | None = None,
        requester: str = "",
    ) -> Attempt:
        """Stop the current attempt: `sig` to every rank's process tree, SIGKILL after
        `timeout`. Returns with the final states (bounded by timeout + SIGKILL_WAIT).
        A finished attempt is left as it is. With `escalate=False` only the signal is
        delivered and the job runs on. The attempt ends KILLED with `reason`, else
        "killed by Kill(SIGTERM)" and " from `requester`" when one is named."""
        attempt = self.job(job_id).current
        if attempt.ended:
            return attempt
        if not escalate:
            await self._terminator.terminate(attempt, sig, timeout, escalate=False)
            return attempt
        if attempt.state is JobState.RUNNING:
            attempt.state = JobState.KILLED
            attempt.reason = reason or f"killed by Kill({signal.Signals(sig).name})" + (
                f" from {requester}" if requester else ""
            )
            self._bump(job_id)
        async with self._spares.held():  # the ranks' exits get both CPUs
            await self._terminator.terminate(attempt, sig, timeout)
            await attempt.wait_end(SIGKILL_WAIT)
        return attempt


def _repeated(job: Job, spec: JobSpec) -> bool:
    """True when `spec` is the job's current attempt (a repeated Start); raises
    AlreadyExists when it names any attempt but the next one after an ended one."""
    current = job.current
    if spec.restart_count == current.restart_count:
        if spec.same_job_as(current.spec):
            return True
        raise AlreadyExists(
            f"job {spec.job_id!r} attempt {spec.restart_count} already exists with "
            "a different spec; pick another job id or kill it and start the next "
            "attempt (restart_count + 1)"
        )
    if spec.restart_count < current.restart_count:
        raise AlreadyExists(
            f"job {spec.job_id!r} is already at attempt {current.restart_count}; "
            f"attempt {spec.restart_count} cannot run again"
        )
    if not current.ended:
        raise AlreadyExists(
            f"job {spec.job_id!r} attempt {current.restart_count} is still running; "
            "kill it before starting the next attempt"
        )
    return False


def _log_started(attempt: Attempt) -> None:
    spec = attempt.spec
    logger.info(
        "job %s attempt %d started: %d ranks of %s, logs in %s%s",
        spec.job_id,
        spec.restart_count,
        spec.nprocs,
        spec.entrypoint,
        attempt.logs.attempt_dir,
        binding.describe(spec.numa_binding or spec.cpu_bind, [r.cpus for r in attempt.ranks]),
        extra=attempt.log_extra(),
    )


def _bind_parts(
    loop: asyncio.AbstractEventLoop,
    terminator: Terminator,
    watcher: LogWatcher,
    guardian: Guardian | None,
) -> None:
    """Bind the supervisor's parts to `loop`, all or nothing: raises LimitExceeded (out
    of descriptors) or OSError with nothing bound."""
    try:
        terminator.start(loop)
        try:
            watcher.attach(loop)
            if guardian is not None:
                guardian.watch(loop, protect=terminator.protect, release=terminator.release)
        except BaseException:
            watcher.detach()
            terminator.close()
            raise
    except OSError as err:
        limit = resources.exhausted(err, "setting up the supervisor")
        if limit is None:
            raise
        raise limit from None
