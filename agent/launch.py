"""Starting an attempt's ranks: plan, then act (as torchx computes a request in its dry
run and only `schedule` starts anything).

`plan_ranks` computes every rank's argv, environment and paths from the spec: pure code,
testable without a process. `Launcher.launch` makes (or takes from the spares) the
attempt's directories, watches its logs, and starts the planned ranks; if that fails
half-way it takes everything back (`Launcher.undo`): what it started is killed and
reaped, what it made removed. From the launch on, the ranks belong to the
`agent.terminator.Terminator`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rankd.agent import logdir, procs, resources, spares, stacks
from rankd.agent.binding import plan_binding
from rankd.agent.errors import AlreadyExists, FailedPrecondition, LimitExceeded, SpecError
from rankd.agent.follow import LogWatcher
from rankd.agent.logs import STDERR, STDOUT, AttemptLogs
from rankd.agent.model import Attempt, Rank
from rankd.agent.specs import JobSpec
from rankd.agent.topology import TopologySource, agent_source

__all__ = ["AGENT_ONLY_ENV", "Launcher", "Placement", "RankPlan", "plan_ranks"]

SPAWN_SERIAL = 8  # ranks an attempt starts from the calling thread alone
SPAWN_THREADS = 8  # threads starting the ranks of a larger attempt
SPAWN_PER_LANE = 4  # ranks per spawn thread, up to SPAWN_THREADS threads
#: What the service manager hands the agent alone, never passed on to its ranks:
#: systemd's credentials directory (LoadCredential=: the token and TLS key), its
#: notification socket (a rank could report the agent ready or stopping, or name another
#: main pid), and the watchdog and socket-activation variables (they name the agent's pid
#: and descriptors). A Start may still set any of them in its env.
AGENT_ONLY_ENV = frozenset(
    {
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "WATCHDOG_PID",
        "WATCHDOG_USEC",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PID",
    }
)


@dataclass(frozen=True, slots=True)
class RankPlan:
    """What starting one rank takes: nothing here depends on a process."""

    local_rank: int
    argv: list[str]  # argv[0]: the entrypoint, an absolute path
    env: list[bytes]  # "KEY=value", as exec takes it
    cwd: str  # "" for the agent's
    stdout_path: str
    stderr_path: str
    error_file: str  # TORCHELASTIC_ERROR_FILE
    cpus: tuple[int, ...] = ()  # to pin it to; () = the agent's affinity


def plan_ranks(
    spec: JobSpec,
    logs: AttemptLogs,
    *,
    base_env: Mapping[str, str],
    marker: str,
    cpus: Sequence[frozenset[int]] | None = None,
) -> list[RankPlan]:
    """Every rank's plan, by local rank. The environment, later layers winning:
    `spec.default_env`, `base_env` (the agent's, but AGENT_ONLY_ENV), `spec.env`, the
    rank's `rank_env`, then LOCAL_RANK, TORCHELASTIC_ERROR_FILE and the attempt's marker
    (RANKD_ATTEMPT). `cpus`: each rank's CPUs (`binding.plan_binding`), None = unpinned."""
    merged = dict(spec.default_env)
    merged.update((k, v) for k, v in base_env.items() if k not in AGENT_ONLY_ENV)
    merged.update(spec.env)
    common = {k: _env_item(k, v) for k, v in merged.items()}  # encoded once per attempt
    mark = _env_item(procs.MARKER_ENV, marker)
    plans = []
    for local_rank in range(spec.nprocs):
        error_file = logs.error_file(local_rank)
        env = dict(common)
        for key, value in spec.rank_env.get(local_rank, {}).items():
            env[key] = _env_item(key, value)
        env["LOCAL_RANK"] = _env_item("LOCAL_RANK", str(local_rank))
        env["TORCHELASTIC_ERROR_FILE"] = _env_item("TORCHELASTIC_ERROR_FILE", error_file)
        env[procs.MARKER_ENV] = mark
        plans.append(
            RankPlan(
                local_rank=local_rank,
                argv=spec.argv(local_rank),
                env=list(env.values()),
                cwd=spec.cwd,
                stdout_path=logs.path(local_rank, STDOUT),
                stderr_path=logs.path(local_rank, STDERR),
                error_file=error_file,
                cpus=tuple(sorted(cpus[local_rank])) if cpus else (),
            )
        )
    return plans


def _env_item(key: str, value: str) -> bytes:
    return os.fsencode(key) + b"=" + os.fsencode(value)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an attempt's files go, and what a failed launch must remove."""

    run_dir: str
    attempt_dir: str
    ready: bool  # the rank directories exist (a spare's)
    new_run: bool  # the run directory is this launch's own

    @property
    def undo_dir(self) -> str:
        return self.run_dir if self.new_run else self.attempt_dir


class Launcher:
    """Makes attempts' directories and starts their ranks, from the loop's thread (and
    from spawn threads of its own for large attempts)."""

    def __init__(
        self,
        log_dir: str,
        spare_dirs: spares.SpareDirs,
        topology: TopologySource | None = None,
    ) -> None:
        self._log_dir = log_dir
        self._spares = spare_dirs
        self._topology = topology or agent_source()
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None  # at first use

    def launch(
        self,
        spec: JobSpec,
        run_dir: str | None,
        *,
        base_env: Mapping[str, str],
        marker: str,
        watcher: LogWatcher,
    ) -> Attempt:
        """Start the attempt `spec` in the job's `run_dir` (None: a new job's, made here)
        with every rank running, each with its pidfd open (`Rank.pidfd`). Raises
        AlreadyExists (that attempt's directory exists), LimitExceeded (out of
        descriptors or disk space), SpecError (a rank could not start) or the OSError of a
        run directory that could not be made; then nothing it started or made is left.
        A binding (spec.numa_binding, cpu_bind) this node cannot give raises
        FailedPrecondition before anything is made."""
        cpus = self.binding(spec)
        try:
            where = self.place(spec, run_dir)
        except OSError as err:
            limit = self._exhausted(err, spec)
            if limit is None:
                raise
            raise limit from None
        logs = AttemptLogs(
            where.attempt_dir, spec.nprocs, [spec.prefix(r) for r in range(spec.nprocs)]
        )
        attempt = Attempt(spec=spec, logs=logs, start_time=time.time(), marker=marker)
        try:
            plans = plan_ranks(spec, logs, base_env=base_env, marker=marker, cpus=cpus)
            if not where.ready:  # the files are created by spawn
                with logdir.open_dir(where.attempt_dir) as attempt_fd:
                    for rank in range(spec.nprocs):
                        os.mkdir(str(rank), logdir.DIR_MODE, dir_fd=attempt_fd)
            watcher.watch(logs)  # before the ranks write
            self.spawn(plans, attempt.ranks)
        except OSError as err:
            self.undo(attempt.ranks, where, logs, watcher)
            limit = self._exhausted(err, spec)
            if limit is not None:
                raise limit from None
            raise SpecError(f"cannot start {spec.entrypoint}: {err.strerror or err}") from None
        except BaseException:  # a bug: no rank it started is left behind
            self.undo(attempt.ranks, where, logs, watcher)
            raise
        attempt.live = len(attempt.ranks)
        return attempt

    def binding(self, spec: JobSpec) -> list[frozenset[int]] | None:
        """Each rank's CPUs on this node now, or None when the spec pins nothing (then
        the topology is not even read: a Start without binding pays nothing). Raises
        FailedPrecondition naming the node and its topology."""
        if not spec.numa_binding and spec.cpu_bind in ("", "none"):
            return None
        try:
            topo = self._topology.read()
        except (OSError, ValueError) as err:
            raise FailedPrecondition(f"cannot read this node's CPU topology: {err}") from None
        return plan_binding(topo, spec.nprocs, spec.numa_binding, spec.cpu_bind)

    def _exhausted(self, err: OSError, spec: JobSpec) -> LimitExceeded | None:
        return resources.exhausted(
            err, f"starting {spec.nprocs} ranks", nprocs=spec.nprocs, log_dir=self._log_dir
        )

    def place(self, spec: JobSpec, run_dir: str | None) -> Placement:
        """The attempt's directory in `run_dir`, or a new job's run directory with it;
        from the spare when one fits. An attempt's directory is never reused (torch
        rmtree's it; we keep every attempt): AlreadyExists."""
        name = f"attempt_{spec.restart_count}"
        if run_dir is None:
            run_dir, ready = self._new_run_dir(spec, name)
            return Placement(run_dir, os.path.join(run_dir, name), ready, new_run=True)
        attempt_dir = os.path.join(run_dir, name)
        try:
            ready = self._spares.take_attempt(spec.nprocs, attempt_dir)
            if not ready:
                os.mkdir(attempt_dir, logdir.DIR_MODE)
        except FileExistsError:
            raise AlreadyExists(
                f"log directory {attempt_dir} exists already; attempts are never overwritten"
            ) from None
        return Placement(run_dir, attempt_dir, ready, new_run=False)

    def _new_run_dir(self, spec: JobSpec, attempt_name: str) -> tuple[str, bool]:
        """A new job's run directory `<job_id>_<random>` with its attempt directory, from
        the spare if one fits; True if so (the rank directories are made too)."""
        prefix = f"{spec.job_id}_"
        while True:
            run_dir = os.path.join(self._log_dir, prefix + secrets.token_hex(4))
            try:
                if self._spares.take_run(spec.nprocs, run_dir, attempt_name):
                    return run_dir, True
            except FileExistsError:  # that name is taken: draw another
                continue
            break
        run_dir = spares.make_dir(self._log_dir, prefix)
        try:
            os.mkdir(os.path.join(run_dir, attempt_name), logdir.DIR_MODE)
        except OSError:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return run_dir, False

    def spawn(self, plans: list[RankPlan], ranks: list[Rank]) -> None:
        """Start the planned ranks, appended to `ranks` by local rank; on an error, after
        every rank that could start did, raise it (those are in `ranks`, for `undo`).
        Up to SPAWN_SERIAL ranks this thread starts them one by one. More are started by
        up to SPAWN_THREADS threads side by side: a spawn waits for its child's exec, and
        each rank started before it (a Python interpreter importing, each in a session and
        so a scheduler group of its own) takes a share of the CPUs, so one spawner slows
        down with every rank it starts; for a few small ranks the hand-over to threads
        costs more than the overlap gains."""
        if len(plans) <= SPAWN_SERIAL:
            for plan in plans:
                ranks.append(_spawn(plan))
            return
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(
                SPAWN_THREADS, thread_name_prefix="rankd-spawn"
            )
        lanes = min(SPAWN_THREADS, -(-len(plans) // SPAWN_PER_LANE))
        chunks = [self._threads.submit(_spawn_lane, plans[lane::lanes]) for lane in range(lanes)]
        started: list[Rank] = []
        error: Exception | None = None
        for chunk in chunks:  # every lane's outcome, so that all it started is undone
            lane_ranks, failed = chunk.result()
            started.extend(lane_ranks)
            error = error or failed
        ranks.extend(sorted(started, key=lambda r: r.local_rank))
        if error is not None:
            raise error

    def undo(
        self, ranks: list[Rank], where: Placement, logs: AttemptLogs, watcher: LogWatcher
    ) -> None:
        """Take back a launch that failed half-way: kill and reap the ranks it started,
        close their pidfds, stop watching its logs, remove its directory."""
        for rank in ranks:
            procs.send_signal([rank.pid], [], signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(rank.pid, 0)
            if rank.pidfd >= 0:
                os.close(rank.pidfd)
                rank.pidfd = -1
        watcher.unwatch(logs)
        _remove_tree(where.undo_dir)

    def close(self) -> None:
        """Wait for the spawn threads to finish."""
        if self._threads is not None:
            self._threads.shutdown(wait=True)


def _remove_tree(path: str) -> None:
    """Remove a directory tree, also when descriptors are scarce (a launch undone for
    want of them): rmtree holds one per level, the walk below one at a time."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for parent, dirs, files in os.walk(path, topdown=False):  # symlinks: not followed
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(parent, name))
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(parent, name))
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _spawn(plan: RankPlan) -> Rank:
    """Start one rank with its pidfd open; if the pidfd cannot be had (no descriptor
    left), the rank is killed and reaped, and the OSError raised."""
    pid = procs.spawn(
        stacks.traceable(plan.argv),  # under Yama scope 1, names the agent its tracer
        env=plan.env,
        cwd=plan.cwd,
        stdout_path=plan.stdout_path,
        stderr_path=plan.stderr_path,
        cpus=plan.cpus,
    )
    # here, not when its exit is first watched: a rank never runs without one
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        procs.send_signal([pid], [], signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    return Rank(
        local_rank=plan.local_rank,
        pid=pid,
        start_time=time.time(),
        stdout_path=plan.stdout_path,
        stderr_path=plan.stderr_path,
        error_file=plan.error_file,
        pidfd=pidfd,
        cpus=plan.cpus,
    )


def _spawn_lane(plans: list[RankPlan]) -> tuple[list[Rank], Exception | None]:
    """In a spawn thread: start the ranks one by one, up to the first error."""
    started: list[Rank] = []
    for plan in plans:
        try:
            started.append(_spawn(plan))
        except Exception as err:  # an OSError, or a bug: the caller undoes the launch
            return started, err
    return started, None
