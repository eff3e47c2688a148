"""Starting, watching and killing rank processes.

Each rank runs in its own session (so its process group is its own); it carries an
environment marker naming its job attempt, so that descendants which left the group,
the session or their parent can still be found and killed with the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Container, Iterable, Iterator
from typing import Generic, TypeVar

import psutil

from rankd.agent.linux import MARKER_ENV, Spawner, descendants, read_environ_marker, task_children
from rankd.agent.logdir import open_append

__all__ = [
    "MARKER_ENV",
    "ExitWatcher",
    "Usage",
    "UsageSampler",
    "agent_children",
    "attempt_processes",
    "reap_orphans",
    "send_signal",
    "signal_others",
    "spawn",
]

logger = logging.getLogger(__name__)

K = TypeVar("K")


def spawn(
    argv: list[str],
    *,
    env: list[bytes],
    cwd: str | None,
    stdout_path: str,
    stderr_path: str,
    cpus: Collection[int] = (),
) -> int:
    """Start one rank (argv[0] an absolute path; `env` as "KEY=value" bytes) in a new
    session, its output appended straight to its files, and return its pid (reaped by
    `ExitWatcher`). The files are created 0600 if missing and must be regular files,
    reached without a symbolic link at their end (`logdir.open_append`). With `cpus`,
    the rank starts pinned to them. Raises OSError when it cannot start. posix_spawn
    where glibc has what it needs, else Popen."""
    out = open_append(stdout_path)
    try:
        err = open_append(stderr_path)
        try:
            with _pinned(cpus):
                spawner = _spawner()
                if spawner is not None:
                    return spawner.spawn(argv[0], argv, env, stdout_fd=out, stderr_fd=err, cwd=cwd)
                return _popen(argv, env, cwd, out, err)
        finally:
            os.close(err)
    finally:
        os.close(out)


@contextlib.contextmanager
def _pinned(cpus: Collection[int]) -> Iterator[None]:
    """The calling thread runs on `cpus` inside (a child it starts inherits its
    affinity: posix_spawn's clone and Popen's fork copy the thread's), as before after.
    Per thread, so spawn threads pinning side by side do not meet. Nothing for no cpus."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)  # 0: this thread
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _popen(argv: list[str], env: list[bytes], cwd: str | None, out: int, err: int) -> int:
    """`spawn` where posix_spawn cannot be had."""
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        env=dict(item.split(b"=", 1) for item in env),
        cwd=cwd or None,
        start_new_session=True,
        close_fds=True,
    )
    # Never waited for through Popen (ExitWatcher reaps the pid): a returncode keeps its
    # finalizer from queueing the pid for subprocess' own reaping, which would race ours.
    popen.returncode = 0
    return popen.pid


@functools.cache
def _spawner() -> Spawner | None:
    try:
        return Spawner()
    except (AttributeError, OSError) as err:  # glibc < 2.34, or not glibc
        logger.info("posix_spawn unavailable (%s); starting ranks with subprocess", err)
        return None


class ExitWatcher(Generic[K]):
    """Reaps child processes the moment they exit and reports them in batches:
    `on_exits([(key, exit_code, exit_time), ...])`, exit_code negative -N for death by
    signal N. The pidfds sit in an epoll set of their own, one-shot, which the loop
    watches as one reader: a burst of exits (a kill of many ranks) costs one wake-up and
    no per-process deregistration."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_exits: Callable[[list[tuple[K, int, float]]], None],
    ) -> None:
        self._loop = loop
        self._on_exits = on_exits
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[int, K]] = {}  # pidfd -> (pid, key)
        self._spent: list[int] = []  # pidfds of reaped processes, to close
        loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, pid: int, key: K) -> None:
        """Watch a child. Raises OSError (EMFILE: no descriptor for its pidfd)."""
        # The pid cannot be reused before we reap it, so the pidfd names our child.
        self.watch_fd(os.pidfd_open(pid), pid, key)

    def watch_fd(self, fd: int, pid: int, key: K) -> None:
        """Watch a child through its pidfd `fd`, which this watcher now owns (and closes
        once the child was reaped). An exit before this call is reported too."""
        self._watched[fd] = (pid, key)
        self._epoll.register(fd, _ONE_EXIT)

    def _ready(self) -> None:
        exit_time = time.time()
        exits: list[tuple[K, int, float]] = []
        for fd, _ in self._epoll.poll(0):
            pid, key = self._watched[fd]
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: the exit status is lost
                got, status = pid, 255 << 8
            if got == 0:  # not gone after all: wait on
                self._epoll.modify(fd, _ONE_EXIT)
                continue
            del self._watched[fd]
            self._spent.append(fd)
            exits.append((key, os.waitstatus_to_exitcode(status), exit_time))
        if self._spent:  # closed after the exits are handled (off a Kill's answer)
            self._loop.call_soon(self._close_spent)
        if exits:
            self._on_exits(exits)

    def _close_spent(self) -> None:
        spent, self._spent = self._spent, []
        for fd in spent:
            os.close(fd)

    def close(self) -> None:
        """Stop watching (the processes are left as they are)."""
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._epoll.fileno())
        for fd in self._watched:
            os.close(fd)
        self._watched.clear()
        self._close_spent()
        self._epoll.close()


_ONE_EXIT = select.EPOLLIN | select.EPOLLONESHOT


def send_signal(pgids: Iterable[int], pids: Iterable[int], sig: int) -> None:
    """Signal process groups and single processes; the gone ones are ignored."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def agent_children() -> set[int]:
    """Direct children of this process that matter to the agent: those of the calling
    thread (the loop's, which starts the ranks of small attempts) and of the main thread
    (the kernel hands orphans to a subreaper's first live thread, the main one). Two
    reads, not one per thread of the process. Ranks started by the spawn threads are
    not here; they are known by pid, and the orphans they leave come to the main
    thread."""
    pid = os.getpid()
    found = set(task_children(pid, pid))
    tid = threading.get_native_id()
    if tid != pid:
        found.update(task_children(pid, tid))
    return found


def attempt_processes(
    rank_pids: Iterable[int], marker: str, *, skip_groups: Iterable[int] = ()
) -> set[int]:
    """Every process of an attempt but its ranks: the ranks' descendants (also those in
    other sessions), and the agent's children that carry the attempt's marker (orphans
    adopted by the agent as subreaper) with all of their descendants. Processes in
    `skip_groups` (process groups already signalled) are left out, so that nobody gets
    the same signal twice."""
    ranks = set(rank_pids)
    mark = marker.encode()
    adopted = [
        pid for pid in agent_children() if pid not in ranks and read_environ_marker(pid) == mark
    ]
    found = set(adopted)
    found.update(descendants([*ranks, *adopted]))
    found -= ranks
    skip = set(skip_groups)
    if skip:
        found = {pid for pid in found if _pgid(pid) not in skip}
    return found


def signal_others(pgids: Iterable[int], marker: str, sig: int) -> None:
    """Send `sig` to every process of the attempt outside the ranks' process groups
    (already signalled). Safe to run in a thread; never raises."""
    groups = list(pgids)
    try:
        send_signal((), attempt_processes(groups, marker, skip_groups=groups), sig)
    except Exception:
        logger.exception("signalling the processes of %s failed", marker)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def reap_orphans(ours: Container[int]) -> bool:
    """Reap exited children that are not ranks (orphans adopted as subreaper). Peeks
    with WNOWAIT so a rank's exit status is left for its own `ExitWatcher`. Returns False
    when a rank's exit stopped the sweep (orphans behind it may still wait)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is None:
            return True
        if info.si_pid in ours:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, os.WNOHANG)


class Usage:
    __slots__ = ("cpu_percent", "cpu_seconds", "rss")

    def __init__(self, rss: int = 0, cpu_seconds: float = 0.0, cpu_percent: float = 0.0) -> None:
        self.rss = rss
        self.cpu_seconds = cpu_seconds
        self.cpu_percent = cpu_percent


class UsageSampler:
    """RSS and CPU of live ranks via psutil, sampled at most once per `max_age` seconds so
    that Poll answers from memory."""

    def __init__(self, max_age: float = 1.0) -> None:
        self._max_age = max_age
        self._procs: dict[int, psutil.Process] = {}
        self._usage: dict[int, Usage] = {}
        self._taken = 0.0

    def usage(self, live_pids: Iterable[int]) -> dict[int, Usage]:
        pids = set(live_pids)
        now = time.monotonic()
        if now - self._taken >= self._max_age or not pids <= self._usage.keys():
            self._sample(pids)
            self._taken = now
        return self._usage

    def _sample(self, pids: set[int]) -> None:
        for gone in self._procs.keys() - pids:
            self._procs.pop(gone, None)
        usage: dict[int, Usage] = {}
        for pid in pids:
            try:
                proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                with proc.oneshot():
                    times = proc.cpu_times()
                    usage[pid] = Usage(
                        proc.memory_info().rss,
                        times.user + times.system,
                        proc.cpu_percent(interval=None),
                    )
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                usage[pid] = Usage()
        self._usage = usage
