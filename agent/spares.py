"""Run directories made ahead of time, so that a Start does not wait for them.

A new job of n ranks needs 2 + n directories, 2n output files and its job.json before
Start answers: 27 new inodes for 8 ranks, each a file system operation, and spawn waits
for the output files (opened just before each rank starts, see `agent.procs.spawn`).

After each Start the agent makes the tree for one more attempt of the same size a moment
later, in a thread of its own that pauses while a Start or a Kill runs, under a hidden
name in the log dir (`.spare-*`): `attempt_0/` with the rank directories and their empty
`stdout.log` and `stderr.log`, and an empty `job.json`; directories 0700 and files 0600,
as everything in the log dir (`agent.logdir`), each made relative to its directory's
descriptor.
The next Start of a new job with that many ranks takes it by renaming it to the job's
run directory; a restart takes its `attempt_0/` as its attempt directory. Any other
Start makes its directories as before. The files are the same as spawn would create
(empty, same mode), and only the exact size is taken, so a log dir never shows a rank
that did not run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import shutil
import threading
from collections.abc import AsyncIterator

from rankd.agent.linux import rename_noreplace
from rankd.agent.logdir import DIR_MODE, FILE_MODE, open_dir
from rankd.agent.store import JOB_FILE  # written in place by the job's first record

__all__ = ["DELAY", "PREFIX", "SpareDirs", "make_dir", "sweep"]

logger = logging.getLogger(__name__)

PREFIX = ".spare-"
MAX_RANKS = 512  # larger attempts make their own directories (a spare holds 3n inodes)
# seconds after a Start: the spare's file system work would otherwise compete with the
# Start's answer and its ranks' exec for the CPU
DELAY = 0.005
_FILES = ("stdout.log", "stderr.log")
_ATTEMPT = "attempt_0"
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class SpareDirs:
    """At most one spare run directory under `log_dir`, made in a thread of its own
    that pauses before each creation while the agent holds it (during a Start or a
    Kill), so that it never competes with them for the CPU. Used from the event loop
    only. `delay`: seconds from `prepare` to the start of the making."""

    def __init__(self, log_dir: str, *, delay: float = DELAY) -> None:
        self._log_dir = log_dir
        self._delay = delay
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # at first use
        self._nprocs = 0
        self._pending: concurrent.futures.Future[str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._holds = 0
        self._quiet = threading.Event()  # set while nobody holds: the maker may go on
        self._quiet.set()
        #: Set while the maker (in its thread) waits for a release.
        self.parked = threading.Event()
        self._closed = False  # the maker stops before its next creation
        self._failed = False  # making one failed once (read-only dir, quota): stop trying

    def hold(self) -> None:
        """Pause the making of a spare (before its next creation) until as many
        `release`s."""
        self._holds += 1
        self._quiet.clear()

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0:
            self._quiet.set()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold while this runs and until the loop's next turn (the answer that follows)."""
        self.hold()
        try:
            yield
        finally:
            asyncio.get_running_loop().call_soon(self.release)

    def take_run(self, nprocs: int, run_dir: str, attempt: str) -> bool:
        """Move a ready spare of exactly `nprocs` ranks to `run_dir` (a new job's, which
        must not exist: FileExistsError, the spare is kept), its attempt directory named
        `attempt`. False when none is ready (not made yet, or of another size): the
        caller makes the directories."""
        spare = self._ready(nprocs)
        if spare is None or not self._move(spare, run_dir):
            return False
        if attempt != _ATTEMPT:
            os.rename(os.path.join(run_dir, _ATTEMPT), os.path.join(run_dir, attempt))
        return True

    def take_attempt(self, nprocs: int, attempt_dir: str) -> bool:
        """As `take_run`, for a new attempt of a known job: only the attempt directory is
        used (moved to `attempt_dir`); the rest is removed in the spare thread."""
        spare = self._ready(nprocs)
        if spare is None or not self._move(os.path.join(spare, _ATTEMPT), attempt_dir):
            return False
        assert self._pool is not None  # it made the spare
        self._pool.submit(_remove, spare)
        return True

    def _ready(self, nprocs: int) -> str | None:
        pending = self._pending
        if pending is None or not pending.done() or pending.exception() is not None:
            return None
        if self._nprocs != nprocs:
            self.discard()
            return None
        return pending.result()

    def _move(self, src: str, dst: str) -> bool:
        try:
            rename_noreplace(src, dst)
        except FileExistsError:
            raise
        except OSError as err:  # removed behind our back: make the directories instead
            logger.warning("spare run directory unusable: %s", err)
            self._pending = None
            return False
        self._pending = None
        return True

    def prepare(self, nprocs: int) -> None:
        """Have a spare of `nprocs` ranks made a moment from now, unless one is made or
        being made for that size."""
        if self._failed or self._closed or self._timer is not None:
            return
        if not 0 < nprocs <= MAX_RANKS:
            return
        if self._pending is not None:
            if self._nprocs == nprocs:
                return
            self.discard()
        self._timer = asyncio.get_running_loop().call_later(self._delay, self._make, nprocs)

    def _make(self, nprocs: int) -> None:
        self._timer = None
        if self._pending is not None or self._closed:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rankd-spare")
        self._nprocs = nprocs
        self._pending = self._pool.submit(self._make_tree, nprocs)
        self._pending.add_done_callback(self._check)

    def _make_tree(self, nprocs: int) -> str:
        """In the spare thread: a tree of `nprocs` ranks. Before each of its 3n + 3
        creations it waits while the agent holds it (one creation may already run)."""
        self._go_on()
        spare = make_dir(self._log_dir, PREFIX)
        try:
            with open_dir(spare) as spare_fd:
                self._go_on()
                os.mkdir(_ATTEMPT, DIR_MODE, dir_fd=spare_fd)
                self._go_on()
                os.close(os.open(JOB_FILE, _FILE_FLAGS, FILE_MODE, dir_fd=spare_fd))
                with open_dir(_ATTEMPT, dir_fd=spare_fd) as attempt_fd:
                    for rank in range(nprocs):
                        self._go_on()
                        os.mkdir(str(rank), DIR_MODE, dir_fd=attempt_fd)
                        with open_dir(str(rank), dir_fd=attempt_fd) as rank_fd:
                            for name in _FILES:
                                self._go_on()
                                os.close(os.open(name, _FILE_FLAGS, FILE_MODE, dir_fd=rank_fd))
        except BaseException:
            _remove(spare)
            raise
        return spare

    def _go_on(self) -> None:
        if not self._quiet.is_set():
            self.parked.set()
            self._quiet.wait()
            self.parked.clear()
        if self._closed:
            raise _Stopped

    def _check(self, done: concurrent.futures.Future[str]) -> None:
        err = done.exception()
        if err is not None and not isinstance(err, _Stopped):
            self._failed = True
            logger.warning("cannot make spare attempt directories, not trying again: %s", err)

    def discard(self) -> None:
        """Drop the spare (removed in the spare thread, which made it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None and self._pool is not None:
            self._pool.submit(_remove_made, pending)  # runs after the making: done then

    def close(self) -> None:
        """Stop making spares and remove the one there is (waits for the thread)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._quiet.set()  # a held maker wakes up, sees _closed and stops
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        pending, self._pending = self._pending, None
        if pending is not None:
            _remove_made(pending)


class _Stopped(Exception):
    """The agent stopped while a spare was being made."""


def make_dir(parent: str, prefix: str) -> str:
    """A new directory `<parent>/<prefix><8 random characters>`, mode 0700 (as mkdtemp)."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path, DIR_MODE)
            return path
        except FileExistsError:
            continue


def _remove_made(made: concurrent.futures.Future[str]) -> None:
    if made.done() and made.exception() is None:
        _remove(made.result())


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def sweep(log_dir: str) -> None:
    """Remove the spares an earlier agent left in `log_dir` (it was killed)."""
    with contextlib.suppress(OSError), os.scandir(log_dir) as entries:
        for entry in entries:
            if entry.name.startswith(PREFIX) and entry.is_dir(follow_symlinks=False):
                _remove(entry.path)
