"""The node's worker groups: start a job's local ranks, watch them, stop them.

Behaves as torch's `SubprocessContext` with `DefaultLogsSpecs` and `TailLog`, on one
asyncio loop and without sleep loops: a rank's exit is seen through its pidfd the moment
it happens, output through inotify. All-or-nothing: the first rank that fails on its
own makes the agent terminate the others (SIGTERM, SIGKILL after the spec's
kill_timeout); those are marked `terminated_by_agent` and never taken for a root cause.

This module never imports grpc: the service adapts it to the wire.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TextIO

from rankd.agent import procs, spares, store
from rankd.agent.errors import (
    AlreadyExists,
    JobNotFound,
    LimitExceeded,
    PermissionDenied,
    SpecError,
)
from rankd.agent.failures import Failure, read_failure, stderr_tail
from rankd.agent.guardian import spawn_guardian
from rankd.agent.linux import set_child_subreaper
from rankd.agent.logs import STDERR, STDOUT, AttemptLogs, LogReader, LogWatcher
from rankd.agent.specs import JobSpec, Limits, Std, validate_job_id

__all__ = ["Attempt", "Job", "JobState", "Rank", "RankState", "Supervisor"]

logger = logging.getLogger(__name__)

# After SIGKILL a rank normally dies within milliseconds; one stuck in uninterruptible
# sleep (D state) may not, and must not wedge the caller.
SIGKILL_WAIT = 5.0


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

    @property
    def alive(self) -> bool:
        return self.exit_code is None


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
    # futures resolved at the end, for waits with a timeout (no task per wait)
    end_waiters: list[asyncio.Future[None]] = field(default_factory=list, repr=False)
    mirrors: list[asyncio.Task[None]] = field(default_factory=list)
    # Carried in every rank's environment (RANKD_ATTEMPT) so that descendants which left
    # the process group or their parent are still known: "<agent tag>/<job>/<attempt>".
    marker: str = ""
    terminating: asyncio.Task[None] | None = None
    live: int = 0  # ranks that have not exited
    spec_record: dict[str, Any] | None = field(default=None, repr=False)  # job.json's, cached
    env_common: dict[str, bytes] | None = field(default=None, repr=False)  # see _rank_env
    recorded: concurrent.futures.Future[None] | None = None  # the final job.json write
    # Wire forms that no longer change (the spec's, ended ranks'), kept by agent.convert.
    wire: dict[Any, Any] = field(default_factory=dict, repr=False)

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

    async def drained(self) -> None:
        """Wait until the attempt ended and its console/filter mirrors wrote every line."""
        await self.done.wait()
        if self.mirrors:
            await asyncio.gather(*self.mirrors, return_exceptions=True)


@dataclass
class Job:
    job_id: str
    run_dir: str
    attempts: list[Attempt] = field(default_factory=list)
    # Bumped on every change a Poll would show (attempt started, rank exited, state
    # changed, attempt ended); `Supervisor.changed` waits for the next bump.
    version: int = 0
    _next: asyncio.Future[int] | None = field(default=None, repr=False)

    @property
    def current(self) -> Attempt:
        return self.attempts[-1]

    def attempt(self, restart_count: int | None) -> Attempt:
        if restart_count is None:
            return self.current
        for attempt in self.attempts:
            if attempt.restart_count == restart_count:
                return attempt
        have = ", ".join(str(a.restart_count) for a in self.attempts)
        raise JobNotFound(f"job {self.job_id!r} has no attempt {restart_count} (has: {have})")


class _Deferred:
    """Callbacks put off by `delay` seconds, at most one per key: putting another under
    a key runs the waiting one first, and `flush` runs one key's, or all, at once."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._waiting: dict[str, tuple[asyncio.TimerHandle, Callable[[], None]]] = {}

    def put(self, key: str, callback: Callable[[], None]) -> None:
        self.flush(key)
        handle = asyncio.get_running_loop().call_later(self._delay, self._run, key)
        self._waiting[key] = (handle, callback)

    def flush(self, key: str | None = None) -> None:
        for each in [key] if key is not None else list(self._waiting):
            self._run(each)

    def _run(self, key: str) -> None:
        handle, callback = self._waiting.pop(key, (None, None))
        if handle is not None and callback is not None:
            handle.cancel()
            callback()


class Supervisor:
    """Holds every job of the node. Call from one asyncio loop.

    `base_env` is the environment ranks inherit (the agent's, minus its secrets);
    `console` receives the tee'd lines; `subreaper=True` (for the agent process, not
    for library use inside a process that runs other children) adopts and reaps orphaned
    descendants so that nothing a rank started escapes the job.
    """

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
    ) -> None:
        if os.path.exists(log_dir) and not os.path.isdir(log_dir):
            raise SpecError(f"log dir {log_dir!r} exists and is not a directory")
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = os.path.abspath(log_dir)
        self.limits = limits or Limits()
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._out = console_out or sys.stdout
        self._err = console_err or sys.stderr
        self._subreaper = subreaper
        self.tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._guardian_fd = -1
        if guardian:
            self._guardian, self._guardian_fd = spawn_guardian(self.tag)
        self._max_jobs = max_jobs
        self._max_running_ranks = max_running_ranks
        self._allowed = (
            None
            if allowed_entrypoints is None
            else frozenset(os.path.realpath(p) for p in allowed_entrypoints)
        )
        self._jobs: dict[str, Job] = {}
        # ids of the jobs whose current attempt has ended, in the order they ended: the
        # first is the one to forget at --max-jobs (no scan of every job per Start)
        self._ended: dict[str, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: LogWatcher | None = None
        self._exits: procs.ExitWatcher[tuple[Attempt, Rank]] | None = None
        self._rank_pids: set[int] = set()
        self._orphans_waiting = False  # see _reap_orphans
        self._start_lock = asyncio.Lock()
        # the chores of an attempt's end put off for a moment, by job id: its job.json
        # record (see _after_end), and its log line and leftover kill (see _end_chores)
        self._records = _Deferred(_RECORD_DELAY)
        self._ending = _Deferred(_END_DELAY)
        # Called with (attempt, rank) right after a rank exited (the service caches the
        # rank's final wire form there, while the other ranks are still dying).
        self.exit_hooks: list[Callable[[Attempt, Rank], None]] = []
        # One thread for the job.json writes kept off the loop, in submission order (an
        # older state never overwrites a newer one).
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rankd-io")
        # Threads that start the ranks of large attempts side by side (see _spawn_ranks),
        # made at the first such attempt.
        self._spawners: concurrent.futures.ThreadPoolExecutor | None = None
        spares.sweep(self.log_dir)
        self._spares = spares.SpareDirs(self.log_dir)
        self.usage = procs.UsageSampler()
        self.exit_counts: collections.Counter[str] = collections.Counter()
        self._restore()

    # -- lifecycle ---------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._watcher = LogWatcher(self._loop)
            self._exits = procs.ExitWatcher(self._loop, self._on_exits)
            if self._subreaper:
                set_child_subreaper()
                self._loop.add_signal_handler(signal.SIGCHLD, self._reap_orphans)
        return self._loop

    def _reap_orphans(self) -> None:
        # A rank's zombie ahead of an orphan's stops the sweep; the next rank exit
        # finishes it (SIGCHLDs merge, so there may be no other signal for that orphan).
        self._orphans_waiting = not procs.reap_orphans(self._rank_pids)

    async def close(self, timeout: float = 10.0) -> None:
        """Kill every running job (SIGTERM, SIGKILL after `timeout`) and release the
        watchers. Returns within about `timeout` + SIGKILL_WAIT seconds."""
        running = [j.job_id for j in self._jobs.values() if not j.current.ended]
        await asyncio.gather(
            *(
                self.kill(job_id, signal.SIGTERM, timeout, reason="agent shutting down")
                for job_id in running
            ),
            return_exceptions=True,
        )
        self._ending.flush()
        for job in self._jobs.values():
            for task in job.current.mirrors:
                task.cancel()
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._exits is not None:
            self._exits.close()
            self._exits = None
        if self._loop is not None and self._subreaper:
            self._loop.remove_signal_handler(signal.SIGCHLD)
        self._records.flush()  # the loop may not run much longer
        self._io.shutdown(wait=True)  # the last job.json writes land before we return
        if self._spawners is not None:
            self._spawners.shutdown(wait=True)
        self._spares.close()
        if self._guardian_fd >= 0:  # the guardian sweeps for stragglers and exits
            os.close(self._guardian_fd)
            self._guardian_fd = -1

    # -- the record on disk ----------------------------------------------------------

    def _record(self, job: Job) -> concurrent.futures.Future[None]:
        """Write job.json from a snapshot taken now, in the io thread."""
        data = _job_record(job)
        try:
            return self._io.submit(store.write_job_file, job.run_dir, data)
        except RuntimeError:  # after close(): a straggler's exit; write it here
            store.write_job_file(job.run_dir, data)
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done

    def _after_end(self, job: Job | None, attempt: Attempt) -> None:
        """The chores of an attempt's end that nobody waits for (stop watching its logs,
        write job.json), a moment later: they do not compete with the answers of Kill
        and Poll. A crash in that moment restores the attempt as FAILED ("the agent
        stopped"), never as RUNNING."""
        recorded: concurrent.futures.Future[None] = concurrent.futures.Future()
        attempt.recorded = recorded
        key = job.job_id if job is not None else attempt.marker

        def chores() -> None:
            if self._watcher is not None:
                self._watcher.unwatch(attempt.logs)
            if job is None:
                recorded.set_result(None)
                return
            self._record(job).add_done_callback(lambda _: recorded.set_result(None))

        self._records.put(key, chores)  # an earlier attempt's run first, if waiting

    def _restore(self) -> None:
        """Load the jobs recorded under the log dir by an earlier agent. An attempt that
        was running when that agent died is reported FAILED, never RUNNING."""
        # the newest max_jobs records; older ones stay on disk, unserved
        for run_dir, data in store.load_job_files(self.log_dir)[-self._max_jobs :]:
            try:
                job = Job(data["job_id"], run_dir)
                for item in data["attempts"]:
                    job.attempts.append(_attempt_from_dict(item))
            except (KeyError, TypeError, ValueError) as err:
                logger.warning("skipping job record in %s: %s", run_dir, err)
                continue
            if job.job_id in self._jobs:
                logger.warning("job %s recorded twice; keeping %s", job.job_id, run_dir)
            self._jobs[job.job_id] = job
            if any(a.reason.startswith(_LOST) for a in job.attempts):
                self._record(job).result()
        for job in sorted(self._jobs.values(), key=lambda j: j.current.end_time):
            self._ended[job.job_id] = None  # a restored attempt has always ended
        if self._jobs:
            logger.info("restored %d jobs from %s", len(self._jobs), self.log_dir)

    # -- queries -------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} on this agent")
        return job

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    async def wait(self, job_id: str) -> Attempt:
        """Wait for the current attempt to end and its mirrors to drain."""
        attempt = self.job(job_id).current
        await attempt.drained()
        if attempt.recorded is not None:
            await asyncio.wrap_future(attempt.recorded)
        return attempt

    async def changed(self, job_id: str, seen: int) -> int:
        """Wait until the job's version differs from `seen` (at once if it does already)
        and return the new version. Raises JobNotFound."""
        job = self.job(job_id)
        if job.version != seen:
            return job.version
        if job._next is None:
            job._next = asyncio.get_running_loop().create_future()
        # shielded: one cancelled waiter must not cancel the future the others share
        return await asyncio.shield(job._next)

    def _bump(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.version += 1
        waiters, job._next = job._next, None
        if waiters is not None and not waiters.done():
            waiters.set_result(job.version)

    # -- start -----------------------------------------------------------------------

    async def start(self, spec: JobSpec) -> tuple[Job, bool]:
        """Start an attempt. Idempotent: the same spec returns the job and False.
        Raises SpecError (nothing started), AlreadyExists, LimitExceeded."""
        self._ensure_loop()
        validate_job_id(spec.job_id)
        spec = spec.validate(self.limits)
        if self._allowed is not None and os.path.realpath(spec.entrypoint) not in self._allowed:
            raise PermissionDenied(
                f"entrypoint {spec.entrypoint} is not allowed on this agent "
                f"(allowed: {', '.join(sorted(self._allowed))}; see --allow-entrypoint)"
            )
        async with self._start_lock, self._holding_spares():
            self._ending.flush(spec.job_id)  # a restart never meets the last leftovers
            job = self._jobs.get(spec.job_id)
            if job is not None:
                current = job.current
                if spec.restart_count == current.restart_count:
                    if spec.same_job_as(current.spec):
                        return job, False
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
            elif len(self._jobs) >= self._max_jobs and not self._forget_oldest_ended():
                raise LimitExceeded(
                    f"this agent runs {len(self._jobs)} jobs, its limit (--max-jobs); "
                    "wait for one to end or kill one"
                )
            running = len(self._rank_pids)
            if running + spec.nprocs > self._max_running_ranks:
                raise LimitExceeded(
                    f"starting {spec.nprocs} ranks would exceed this agent's limit of "
                    f"{self._max_running_ranks} running ranks ({running} running)"
                )
            attempt = self._launch(job, spec)
            self._spares.prepare(spec.nprocs)  # for the next Start of this size
            fresh = job is None
            if job is None:
                job = Job(spec.job_id, os.path.dirname(attempt.logs.attempt_dir))
                self._jobs[spec.job_id] = job
            job.attempts.append(attempt)
            self._ended.pop(job.job_id, None)
            self._bump(job.job_id)
            # on disk before Start answers: a crash cannot lose the job. Written here,
            # not in the io thread: the hand-over would cost more than the write.
            store.write_job_file(job.run_dir, _job_record(job), fresh=fresh)
            return job, True

    @contextlib.asynccontextmanager
    async def _holding_spares(self) -> AsyncIterator[None]:
        """No spare is made while this runs, nor until the loop's next turn (the answer)."""
        self._spares.hold()
        try:
            yield
        finally:
            asyncio.get_running_loop().call_soon(self._spares.release)

    def _forget_oldest_ended(self) -> bool:
        """Drop the job that ended longest ago from memory (its files and job.json stay on
        disk), so a long-lived agent holds at most max_jobs jobs. False if all run."""
        for job_id in self._ended:
            del self._ended[job_id]
            del self._jobs[job_id]
            logger.info("forgetting job %s (ended longest ago) to stay within --max-jobs", job_id)
            return True
        return False

    def _launch(self, job: Job | None, spec: JobSpec) -> Attempt:
        new_run_dir = job is None
        attempt_name = f"attempt_{spec.restart_count}"
        if job is None:
            run_dir, made = self._new_run_dir(spec, attempt_name)
            attempt_dir = os.path.join(run_dir, attempt_name)
        else:
            run_dir = job.run_dir
            attempt_dir = os.path.join(run_dir, attempt_name)
            try:  # never reuse one (torch rmtree's it; we keep every attempt)
                made = self._spares.take_attempt(spec.nprocs, attempt_dir)
                if not made:
                    os.mkdir(attempt_dir)
            except FileExistsError:
                raise AlreadyExists(
                    f"log directory {attempt_dir} exists already; attempts are never overwritten"
                ) from None
        logs = AttemptLogs(attempt_dir, spec.nprocs, [spec.prefix(r) for r in range(spec.nprocs)])
        attempt = Attempt(
            spec=spec,
            logs=logs,
            start_time=time.time(),
            marker=f"{self.tag}/{spec.job_id}/{spec.restart_count}",
        )
        try:
            if not made:
                for rank in range(spec.nprocs):
                    os.mkdir(logs.rank_dir(rank))  # the files are created by spawn
            assert self._watcher is not None
            self._watcher.watch(logs)
            self._spawn_ranks(attempt)
        except OSError as err:
            self._undo_launch(attempt, run_dir if new_run_dir else attempt_dir)
            raise SpecError(f"cannot start {spec.entrypoint}: {err.strerror or err}") from None
        except BaseException:  # a bug: no rank it started is left behind
            self._undo_launch(attempt, run_dir if new_run_dir else attempt_dir)
            raise
        # The exit watches and the log line on the loop's next turn, after Start's
        # answer: a rank's exit waits for its watch as a zombie (nobody else reaps it).
        loop = asyncio.get_running_loop()
        loop.call_soon(self._watch_exits, attempt)
        self._start_mirrors(attempt)
        _log_soon(
            loop,
            logging.INFO,
            "job %s attempt %d started: %d ranks of %s, logs in %s",
            spec.job_id,
            spec.restart_count,
            spec.nprocs,
            spec.entrypoint,
            attempt_dir,
            extra=_ctx(attempt),
        )
        return attempt

    def _watch_exits(self, attempt: Attempt) -> None:
        if self._exits is None:  # closed meanwhile
            return
        for rank in attempt.ranks:
            self._exits.watch(rank.pid, (attempt, rank))

    def _new_run_dir(self, spec: JobSpec, attempt_name: str) -> tuple[str, bool]:
        """A new job's run directory `<job_id>_<random>` with its attempt directory, from
        the spare if one fits; True if so (the rank directories are made too)."""
        prefix = f"{spec.job_id}_"
        while True:
            run_dir = os.path.join(self.log_dir, prefix + secrets.token_hex(4))
            try:
                if self._spares.take_run(spec.nprocs, run_dir, attempt_name):
                    return run_dir, True
            except FileExistsError:  # that name is taken: draw another
                continue
            break
        run_dir = spares.make_dir(self.log_dir, prefix)
        try:
            os.mkdir(os.path.join(run_dir, attempt_name))
        except OSError:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return run_dir, False

    def _undo_launch(self, attempt: Attempt, remove_dir: str) -> None:
        """A launch failed half-way (exec error): leave nothing behind."""
        for rank in attempt.ranks:
            procs.send_signal([rank.pid], [], signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(rank.pid, 0)
            self._rank_pids.discard(rank.pid)
        if self._watcher is not None:
            self._watcher.unwatch(attempt.logs)
        shutil.rmtree(remove_dir, ignore_errors=True)

    def _rank_env(self, attempt: Attempt, local_rank: int, error_file: str) -> list[bytes]:
        """The rank's environment as "KEY=value" bytes. The part every rank shares is
        encoded once per attempt."""
        spec = attempt.spec
        common = attempt.env_common
        if common is None:
            merged = dict(spec.default_env)
            merged.update(self._base_env)
            merged.update(spec.env)
            common = attempt.env_common = {k: _env_item(k, v) for k, v in merged.items()}
        env = dict(common)
        for key, value in spec.rank_env.get(local_rank, {}).items():
            env[key] = _env_item(key, value)
        env["LOCAL_RANK"] = _env_item("LOCAL_RANK", str(local_rank))
        env["TORCHELASTIC_ERROR_FILE"] = _env_item("TORCHELASTIC_ERROR_FILE", error_file)
        env[procs.MARKER_ENV] = _env_item(procs.MARKER_ENV, attempt.marker)
        return list(env.values())

    def _spawn_ranks(self, attempt: Attempt) -> None:
        """Start every rank of `attempt`, in `attempt.ranks` by local rank. Up to
        _SPAWN_SERIAL ranks this thread starts them one by one. More are started by up
        to _SPAWN_THREADS threads side by side: a spawn waits for its child's exec, and
        each rank started before it (a Python interpreter importing, each in a session
        and so a scheduler group of its own) takes a share of the CPUs, so one spawner
        slows down with every rank it starts. Measured on 2 cores: 32 Python ranks in
        94 ms with 8 threads, 138 ms with 4, 272 ms alone; but 8 /bin/true in 4.0 ms
        alone, 5.0 ms with 2 (the hand-over costs more than the overlap gains).
        On an error the ranks already started are in `attempt.ranks` (for the undo)."""
        nprocs = attempt.spec.nprocs
        if nprocs <= _SPAWN_SERIAL:
            for local_rank in range(nprocs):
                attempt.ranks.append(self._spawn_rank(attempt, local_rank))
                attempt.live += 1
            return
        if self._spawners is None:
            self._spawners = concurrent.futures.ThreadPoolExecutor(
                _SPAWN_THREADS, thread_name_prefix="rankd-spawn"
            )
        lanes = min(_SPAWN_THREADS, -(-nprocs // _SPAWN_PER_LANE))
        chunks = [
            self._spawners.submit(self._spawn_lane, attempt, range(lane, nprocs, lanes))
            for lane in range(lanes)
        ]
        started: dict[int, Rank] = {}
        error: Exception | None = None
        for chunk in chunks:  # every lane's outcome, so that all it started is undone
            ranks, failed = chunk.result()
            started.update(ranks)
            error = error or failed
        for local_rank in sorted(started):
            attempt.ranks.append(started[local_rank])
            attempt.live += 1
        if error is not None:
            raise error

    def _spawn_lane(
        self, attempt: Attempt, local_ranks: range
    ) -> tuple[dict[int, Rank], Exception | None]:
        """In a spawn thread: start `local_ranks` one by one, up to the first error."""
        started: dict[int, Rank] = {}
        for local_rank in local_ranks:
            try:
                started[local_rank] = self._spawn_rank(attempt, local_rank)
            except Exception as err:  # an OSError, or a bug: the caller undoes the launch
                return started, err
        return started, None

    def _spawn_rank(self, attempt: Attempt, local_rank: int) -> Rank:
        spec, logs = attempt.spec, attempt.logs
        error_file = logs.error_file(local_rank)
        pid = procs.spawn(
            spec.argv(local_rank),
            env=self._rank_env(attempt, local_rank, error_file),
            cwd=spec.cwd,
            stdout_path=logs.path(local_rank, STDOUT),
            stderr_path=logs.path(local_rank, STDERR),
        )
        self._rank_pids.add(pid)
        rank = Rank(
            local_rank=local_rank,
            pid=pid,
            start_time=time.time(),
            stdout_path=logs.path(local_rank, STDOUT),
            stderr_path=logs.path(local_rank, STDERR),
            error_file=error_file,
        )
        return rank

    # -- exits and the failure policy ------------------------------------------------------

    def _on_exits(self, exits: list[tuple[tuple[Attempt, Rank], int, float]]) -> None:
        """Ranks have exited (a batch, when many died at once): record each, then end the
        attempts that have no rank left, and tell the watchers once per job."""
        if self._watcher is not None:
            self._watcher.drain()  # every write the ranks made is known (AttemptLogs.size)
        touched: dict[int, Attempt] = {}
        for (attempt, rank), code, exit_time in exits:
            self._rank_exited(attempt, rank, code, exit_time)
            touched[id(attempt)] = attempt
        for attempt in touched.values():
            if not attempt.ended and attempt.live == 0:
                self._finish(attempt)
            self._bump(attempt.spec.job_id)
        if self._orphans_waiting:  # after the answers these exits may complete
            asyncio.get_running_loop().call_soon(self._reap_orphans)

    def _rank_exited(self, attempt: Attempt, rank: Rank, code: int, exit_time: float) -> None:
        self._rank_pids.discard(rank.pid)
        attempt.live -= 1
        rank.exit_code = code
        rank.end_time = exit_time
        rank.stdout_bytes = attempt.logs.size(rank.local_rank, STDOUT)
        rank.stderr_bytes = attempt.logs.size(rank.local_rank, STDERR)
        if code == 0:
            rank.state = RankState.SUCCEEDED
        else:
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
                error_file_absent=not attempt.logs.may_have_error_file(rank.local_rank),
            )
        self.exit_counts[_COUNTED[rank.state]] += 1
        for hook in self.exit_hooks:
            hook(attempt, rank)
        if rank.state is RankState.FAILED and attempt.state is JobState.RUNNING:
            attempt.state = JobState.FAILED
            assert rank.failure is not None
            attempt.reason = f"local rank {rank.local_rank} failed: {rank.failure.message}"
            logger.warning(
                "job %s: %s", attempt.spec.job_id, attempt.reason, extra=_ctx(attempt, rank)
            )
            attempt.terminating = asyncio.ensure_future(
                self._terminate(attempt, signal.SIGTERM, attempt.spec.kill_timeout)
            )

    def _finish(self, attempt: Attempt) -> None:
        """Every rank has exited: publish the end now; log it and kill what the ranks
        left behind a moment later (see _end_chores)."""
        if attempt.state is JobState.RUNNING:
            attempt.state = JobState.SUCCEEDED
            attempt.reason = "every rank exited with code 0"
        attempt.end_time = time.time()
        if self._jobs.get(attempt.spec.job_id) is not None:
            self._ended.pop(attempt.spec.job_id, None)
            self._ended[attempt.spec.job_id] = None
        attempt.logs.mark_ended()
        attempt.done.set()
        for waiter in attempt.end_waiters:
            _resolve(waiter)
        attempt.end_waiters.clear()
        self._after_end(self._jobs.get(attempt.spec.job_id), attempt)
        self._ending.put(attempt.spec.job_id, functools.partial(self._end_chores, attempt))

    def _end_chores(self, attempt: Attempt) -> None:
        """An attempt's end, logged, and what its ranks left behind, killed: _END_DELAY
        after the end, so that neither delays the answers that follow it (the Poll that
        sees the end; measured: rank exit → Poll 0.15-0.2 ms sooner). Run at once when a
        Start of the same job, its next end, or close() comes first."""
        logger.info(
            "job %s attempt %d ended: %s",
            attempt.spec.job_id,
            attempt.restart_count,
            attempt.state.value,
            extra=_ctx(attempt),
        )
        self._kill_leftovers(attempt)

    def _kill_leftovers(self, attempt: Attempt) -> None:
        leftovers = procs.attempt_processes([], attempt.marker)
        if leftovers:
            logger.info(
                "job %s: killing %d leftover processes",
                attempt.spec.job_id,
                len(leftovers),
                extra=_ctx(attempt),
            )
            procs.send_signal((), leftovers, signal.SIGKILL)

    async def _terminate(
        self, attempt: Attempt, sig: int, timeout: float, *, escalate: bool = True
    ) -> None:
        """Signal every live rank's process group and every other process of the attempt;
        if `escalate`, SIGKILL what is still alive after `timeout`, and wait a bounded time.
        Idempotent; ignores processes that are already gone."""
        alive = [r for r in attempt.ranks if r.alive]
        if escalate:
            for rank in alive:
                rank.terminated_by_agent = True
        pgids = [r.pid for r in alive]
        if self._subreaper:
            # Process groups first (as torch does), so the walk below does not delay
            # them; descendants orphaned meanwhile are adopted by us and found by marker.
            # Process groups only: what left a group is adopted by us when its rank
            # dies, and _finish kills it then (or the SIGKILL below, if the rank does
            # not die). A walk of the process tree here would delay every exit.
            procs.send_signal(pgids, (), sig)
            if not escalate:  # a signal that is not a kill reaches them now
                procs.signal_others(pgids, attempt.marker, sig)
        else:
            # Without the subreaper, a dead rank's descendants move to init and would be
            # lost: find them while the ranks still hold them.
            others = procs.attempt_processes(pgids, attempt.marker, skip_groups=pgids)
            procs.send_signal(pgids, others, sig)
        if not escalate or not alive:
            return
        pending = await _wait_ranks(attempt, timeout)
        if pending:
            logger.warning(
                "job %s: local ranks %s survived signal %d for %.1fs; sending SIGKILL",
                attempt.spec.job_id,
                [r.local_rank for r in pending],
                sig,
                timeout,
                extra=_ctx(attempt),
            )
            others = procs.attempt_processes([r.pid for r in pending], attempt.marker)
            procs.send_signal([r.pid for r in pending], others, signal.SIGKILL)
            stuck = await _wait_ranks(attempt, SIGKILL_WAIT)
            if stuck:
                note = (
                    f"local ranks {[r.local_rank for r in stuck]} did not die within "
                    f"{SIGKILL_WAIT:g}s of SIGKILL (uninterruptible sleep?)"
                )
                logger.error("job %s: %s", attempt.spec.job_id, note, extra=_ctx(attempt))
                attempt.reason = f"{attempt.reason}; {note}" if attempt.reason else note

    # -- kill -------------------------------------------------------------------------------

    async def kill(
        self,
        job_id: str,
        sig: int = signal.SIGTERM,
        timeout: float = 30.0,
        *,
        escalate: bool = True,
        reason: str | None = None,
    ) -> Attempt:
        """Stop the current attempt: `sig` to every rank's process tree, SIGKILL after
        `timeout`. Returns with the final states (bounded by timeout + SIGKILL_WAIT).
        A finished attempt is left as it is. With `escalate=False` only the signal is
        delivered and the job runs on."""
        attempt = self.job(job_id).current
        if attempt.ended:
            return attempt
        if not escalate:
            await self._terminate(attempt, sig, timeout, escalate=False)
            return attempt
        if attempt.state is JobState.RUNNING:
            attempt.state = JobState.KILLED
            attempt.reason = reason or f"killed by Kill({signal.Signals(sig).name})"
            self._bump(job_id)
        async with self._holding_spares():  # the ranks' exits get both CPUs
            await self._terminate(attempt, sig, timeout)
            await _until_ended(attempt, SIGKILL_WAIT)
        return attempt

    # -- mirrors: tee to the console, duplicate filters to files ---------------------------

    def _start_mirrors(self, attempt: Attempt) -> None:
        spec, logs = attempt.spec, attempt.logs
        tee = spec.tee_map()
        shown = spec.local_ranks_filter or frozenset(range(spec.nprocs))
        for stream, flag, console in ((STDOUT, Std.OUT, self._out), (STDERR, Std.ERR, self._err)):
            keys = [(r, stream) for r in range(spec.nprocs) if tee[r] & flag and r in shown]
            if keys:
                attempt.mirrors.append(
                    asyncio.ensure_future(_mirror(logs, keys, console, None, close=False))
                )
        for stream, needles, name in (
            (STDOUT, spec.duplicate_stdout_filters, "filtered_stdout.log"),
            (STDERR, spec.duplicate_stderr_filters, "filtered_stderr.log"),
        ):
            if needles:
                keys = [(r, stream) for r in range(spec.nprocs)]
                sink = open(os.path.join(logs.attempt_dir, name), "a", encoding="utf-8")  # noqa: SIM115
                match = _any_of(needles)
                attempt.mirrors.append(
                    asyncio.ensure_future(_mirror(logs, keys, sink, match, close=True))
                )


_LOST = "the agent stopped while this attempt ran"
_COUNTED = {state: state.value.lower() for state in RankState}  # exit_counts' keys
_RECORD_DELAY = 0.01  # seconds from an attempt's end to its job.json write
_END_DELAY = 0.002  # seconds from an attempt's end to its log line and leftover kill
_SPAWN_SERIAL = 8  # ranks an attempt starts from the loop's thread alone
_SPAWN_THREADS = 8  # threads starting the ranks of a larger attempt
_SPAWN_PER_LANE = 4  # ranks per spawn thread, up to _SPAWN_THREADS threads


def _ctx(attempt: Attempt, rank: Rank | None = None) -> dict[str, object]:
    """Structured fields of a log record about a job (see agent.logfmt)."""
    ctx: dict[str, object] = {
        "job_id": attempt.spec.job_id,
        "restart_count": attempt.restart_count,
    }
    if rank is not None:
        ctx["local_rank"] = rank.local_rank
        ctx["pid"] = rank.pid
    return ctx


def _env_item(key: str, value: str) -> bytes:
    return os.fsencode(key) + b"=" + os.fsencode(value)


def _job_record(job: Job) -> dict[str, Any]:
    return {"job_id": job.job_id, "attempts": [_attempt_to_dict(a) for a in job.attempts]}


def _attempt_to_dict(attempt: Attempt) -> dict[str, Any]:
    """A snapshot for job.json: nothing in it is mutated later by the loop."""
    if attempt.spec_record is None:
        attempt.spec_record = store.spec_to_dict(attempt.spec)
    return {
        "spec": attempt.spec_record,
        "attempt_dir": attempt.logs.attempt_dir,
        "state": attempt.state.value,
        "reason": attempt.reason,
        "start_time": attempt.start_time,
        "end_time": attempt.end_time,
        "ranks": [
            {
                "local_rank": r.local_rank,
                "pid": r.pid,
                "start_time": r.start_time,
                "end_time": r.end_time,
                "exit_code": r.exit_code,
                "state": r.state.value,
                "terminated_by_agent": r.terminated_by_agent,
                # shallow: a Failure is not changed once made
                "failure": dict(vars(r.failure)) if r.failure else None,
            }
            for r in attempt.ranks
        ],
    }


def _attempt_from_dict(data: dict[str, Any]) -> Attempt:
    spec = store.spec_from_dict(data["spec"])
    logs = AttemptLogs(
        data["attempt_dir"], spec.nprocs, [spec.prefix(r) for r in range(spec.nprocs)]
    )
    logs.ended = True
    attempt = Attempt(
        spec=spec,
        logs=logs,
        state=JobState(data["state"]),
        reason=data.get("reason", ""),
        start_time=float(data.get("start_time", 0.0)),
        end_time=float(data.get("end_time", 0.0)),
    )
    lost = attempt.state is JobState.RUNNING
    for item in data["ranks"]:
        failure = item.get("failure")
        rank = Rank(
            local_rank=int(item["local_rank"]),
            pid=int(item["pid"]),
            start_time=float(item["start_time"]),
            stdout_path=logs.path(int(item["local_rank"]), STDOUT),
            stderr_path=logs.path(int(item["local_rank"]), STDERR),
            error_file=logs.error_file(int(item["local_rank"])),
            end_time=float(item.get("end_time", 0.0)),
            exit_code=item.get("exit_code"),
            state=RankState(item["state"]),
            terminated_by_agent=bool(item.get("terminated_by_agent")),
            failure=store.failure_from_dict(failure) if failure else None,
        )
        if rank.exit_code is None:  # it was running when the agent died
            rank.state = RankState.TERMINATED
            rank.failure = Failure(
                local_rank=rank.local_rank,
                pid=rank.pid,
                exit_code=-signal.SIGKILL,
                signal_name="SIGKILL",
                message=(
                    f"{_LOST}: the rank (PID {rank.pid}) was killed by the agent's guardian; "
                    "its exit status is unknown"
                ),
                terminated_by_agent=True,
                stderr_tail=stderr_tail(rank.stderr_path),
            )
            rank.exit_code = -signal.SIGKILL
        attempt.ranks.append(rank)
    if lost:
        attempt.state = JobState.FAILED
        attempt.reason = f"{_LOST} (it crashed or was killed); its ranks were killed with it"
        attempt.end_time = attempt.end_time or max(
            (r.start_time for r in attempt.ranks), default=attempt.start_time
        )
    attempt.done.set()
    return attempt


def _log_soon(
    loop: asyncio.AbstractEventLoop, level: int, msg: str, *args: object, extra: dict[str, object]
) -> None:
    """Log on the loop's next turn: off the path of the answer being built."""
    if logger.isEnabledFor(level):
        loop.call_soon(functools.partial(logger.log, level, msg, *args, extra=extra))


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _until_ended(attempt: Attempt, timeout: float) -> None:
    """Wait up to `timeout` for the attempt's end."""
    if attempt.ended:
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    attempt.end_waiters.append(waiter)
    # resolved by the end or by the timer: one wake-up, no task
    timer = loop.call_later(timeout, _resolve, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
        if waiter in attempt.end_waiters:
            attempt.end_waiters.remove(waiter)


async def _wait_ranks(attempt: Attempt, timeout: float) -> list[Rank]:
    """Wait up to `timeout` for every rank of a running attempt to exit (its end);
    return those still alive."""
    await _until_ended(attempt, timeout)
    return [r for r in attempt.ranks if r.alive]


def _any_of(needles: tuple[str, ...]) -> Callable[[str], bool]:
    pattern = re.compile("|".join(re.escape(n) for n in needles))
    return lambda text: pattern.search(text) is not None


async def _mirror(
    logs: AttemptLogs,
    keys: list[tuple[int, int]],
    sink: TextIO,
    line_filter: Callable[[str], bool] | None,
    *,
    close: bool,
) -> None:
    """Copy lines, prefixed with their rank's header, to `sink` until the attempt ends."""
    try:
        async for batch in LogReader(logs, keys, follow=True, line_filter=line_filter).batches():
            prefixes = logs.prefixes
            sink.write("".join(f"{prefixes[ln.local_rank]}{ln.text}\n" for ln in batch))
            sink.flush()
    except Exception:
        logger.exception("mirroring the output of %s failed", logs.attempt_dir)
    finally:
        if close:
            sink.close()
