"""The guardian: kills every process of an agent's jobs when the agent dies, even by SIGKILL.

The agent starts one guardian and keeps the write end of a pipe whose read end is the
guardian's stdin. When the agent exits for any reason the kernel closes that end; the
guardian reads EOF and SIGKILLs every process whose environment carries the agent's
marker (`RANKD_ATTEMPT=<agent tag>/...`): ranks, their children, grandchildren that
called setsid or were orphaned. Only a process that scrubbed its own environment and
re-exec'd escapes; that is documented.

It runs isolated (`python -I`): neither the agent's working directory nor PYTHONPATH nor
the user's site-packages reach its `sys.path`, so no folder there can shadow rankd's
modules or run code in it. It imports rankd from where the agent's own came from
(`_rankd_root`), so an agent run from a PYTHONPATH checkout gets a working guardian too.
Once its signal handling is set up the guardian writes `armed` on stdout; an agent whose
guardian does not say so within `ARM_TIMEOUT` refuses to start (`GuardianError`).

`Guardian` is the agent's side: it watches its guardian through a pidfd on the event
loop (no polling) and starts a new one, logging it, when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import rankd
from rankd.agent.errors import RankdError
from rankd.agent.linux import read_environ_marker

__all__ = ["ARM_TIMEOUT", "Guardian", "GuardianError", "kill_marked", "spawn_guardian"]

logger = logging.getLogger(__name__)

ARM_TIMEOUT = 20.0  # a cold interpreter start on a loaded node takes well under a second
_ARMED = b"armed\n"
# Run with `python -I -c _BOOT <rankd root> <agent tag>`: the one path it adds is the
# directory that holds the agent's own `rankd` package.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from rankd.agent.guardian import main; sys.exit(main(sys.argv[1:]))"
)
#: Seconds between attempts to start a new guardian after one failed, doubling up to
#: RETRY_MAX.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


class GuardianError(RankdError):
    """The guardian did not start, so an agent's SIGKILL would leave its ranks behind."""


_ROUNDS = 40  # forks in flight are caught by the next scan; bounded, ~2 s at most
_PAUSE = 0.05


def _rankd_root() -> str:
    """The directory that holds the `rankd` package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.abspath(rankd.__file__ or "")))


def spawn_guardian(
    agent_tag: str, *, timeout: float = ARM_TIMEOUT
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the guardian and wait until it is armed; returns it and the pipe's write end,
    which the agent must keep open (and never pass to a child) for as long as it lives.

    Raises `GuardianError`, naming the cause from the guardian's stderr, when it exits,
    stays silent for `timeout` seconds or cannot be started; nothing is left running then."""
    read_end = write_end = -1
    try:
        read_end, write_end = os.pipe()  # both non-inheritable by default
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _BOOT, _rankd_root(), agent_tag],
                    stdin=read_end,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    start_new_session=True,  # a Ctrl-C meant for the agent must not kill it
                    close_fds=True,
                )
            finally:
                os.close(read_end)
                read_end = -1
            assert proc.stdout is not None
            with proc.stdout:
                ready, _, _ = select.select([proc.stdout], [], [], timeout)
                said = os.read(proc.stdout.fileno(), len(_ARMED)) if ready else b""
            if said == _ARMED:
                return proc, write_end
            proc.kill()  # an armed-late guardian sweeps nothing: no rank exists yet
            proc.wait()
            errors.seek(0)
            raise GuardianError(_why(said, errors.read(), timeout))
    except BaseException as err:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        if isinstance(err, OSError):  # no pipe, no temporary file, no fork: out of something
            raise GuardianError(f"{_PREFIX}: {err}") from None
        raise


_PREFIX = "the guardian (which kills this agent's ranks if it dies) did not start"


def _why(said: bytes, stderr: bytes, timeout: float) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    if lines:
        cause = lines[-1]
    elif said:
        cause = f"it said {said!r} instead of 'armed'"
    else:
        cause = f"it exited or was silent for {timeout:g} s"
    return f"{_PREFIX}: {cause}"


def _nothing(pid: int) -> None:
    pass


class Guardian:
    """An agent's running guardian (started here, armed: or GuardianError), and a new
    one each time it dies while watched (`watch`). Call from one event loop.

    `protect(pid)` / `release(pid)` are told of each guardian process before it can
    die and after it was reaped, so that the agent's orphan reaper leaves it to this
    class (whose pidfd reports its exit)."""

    def __init__(self, tag: str, *, timeout: float = ARM_TIMEOUT) -> None:
        self.tag = tag
        self._timeout = timeout
        self._proc: subprocess.Popen[bytes] | None
        self._proc, self._fd = spawn_guardian(tag, timeout=timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pidfd = -1
        self._protect: Callable[[int], None] = _nothing
        self._release: Callable[[int], None] = _nothing
        self._restarting: asyncio.Future[None] | None = None
        self._retry = RETRY_FIRST
        self._timer: asyncio.TimerHandle | None = None
        self._problem = ""  # why there is no guardian now
        self._closed = False
        #: Guardians started after the first one.
        self.restarts = 0

    @property
    def pid(self) -> int:
        """The running guardian's pid; 0 while there is none."""
        return self._proc.pid if self._proc is not None else 0

    def watch(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        protect: Callable[[int], None] = _nothing,
        release: Callable[[int], None] = _nothing,
    ) -> None:
        """Watch the guardian on `loop` and start a new one when it dies. Raises OSError
        (no descriptor for its pidfd); then nothing is watched."""
        if self._loop is not None:
            return
        self._protect, self._release = protect, release
        if self._proc is not None:
            self._follow(loop, self._proc)
        self._loop = loop

    def _follow(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes]) -> None:
        pidfd = os.pidfd_open(proc.pid)  # it cannot have been reaped: nobody else reaps it
        try:
            self._protect(proc.pid)
            loop.add_reader(pidfd, self._died)
        except BaseException:
            self._release(proc.pid)
            os.close(pidfd)
            raise
        self._pidfd = pidfd

    async def armed(self) -> None:
        """Return once a guardian runs (at once, unless one is being started); raises
        GuardianError when there is none and the last start failed."""
        if self._restarting is not None:
            await asyncio.shield(self._restarting)
        if self._proc is None:
            raise GuardianError(
                f"no guardian (which kills this agent's ranks if it dies) runs now, so no "
                f"job may start: {self._problem}; the agent keeps trying to start one"
            )

    def _died(self) -> None:
        proc, loop = self._proc, self._loop
        assert proc is not None and loop is not None
        self._unfollow()
        status = proc.wait()  # it has exited: at once
        self._release(proc.pid)
        self._proc = None
        os.close(self._fd)
        self._fd = -1
        how = f"signal {signal.Signals(-status).name}" if status < 0 else f"exit code {status}"
        self._problem = f"the guardian (pid {proc.pid}) died ({how})"
        logger.warning("%s; starting a new one", self._problem)
        self._restart()

    def _unfollow(self) -> None:
        if self._pidfd >= 0:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError, RuntimeError):
                    self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _restart(self) -> None:
        """Start a new guardian in a thread (its interpreter takes a moment to arm);
        `armed` waits for it."""
        loop = self._loop
        assert loop is not None
        self._timer = None
        done: asyncio.Future[None] = loop.create_future()
        self._restarting = done

        def spawn() -> None:
            try:
                result: tuple[subprocess.Popen[bytes], int] | BaseException = spawn_guardian(
                    self.tag, timeout=self._timeout
                )
            except BaseException as err:
                result = err
            with contextlib.suppress(RuntimeError):  # the loop is closed: agent gone
                loop.call_soon_threadsafe(self._spawned, result, done)

        threading.Thread(target=spawn, name="rankd-guardian", daemon=True).start()

    def _spawned(
        self,
        result: tuple[subprocess.Popen[bytes], int] | BaseException,
        done: asyncio.Future[None],
    ) -> None:
        self._restarting = None
        done.set_result(None)
        if isinstance(result, BaseException):
            self._problem = str(result)
            if not self._closed:
                logger.error("%s; trying again in %g s", result, self._retry)
                assert self._loop is not None
                self._timer = self._loop.call_later(self._retry, self._restart)
                self._retry = min(self._retry * 2, RETRY_MAX)
            return
        proc, fd = result
        if self._closed:  # the agent stopped meanwhile: this one sweeps and exits
            os.close(fd)
            return
        assert self._loop is not None
        try:
            self._follow(self._loop, proc)
        except OSError as err:  # no pidfd: it runs, unwatched
            logger.error("cannot watch the new guardian (pid %d): %s", proc.pid, err)
        self._proc, self._fd = proc, fd
        self._retry = RETRY_FIRST
        self._problem = ""
        self.restarts += 1
        logger.warning("a new guardian (pid %d) is armed", proc.pid)

    def close(self) -> None:
        """Stop watching and let the guardian go: it sweeps this agent's stragglers and
        exits. Idempotent."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unfollow()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def kill_marked(agent_tag: str) -> int:
    """SIGKILL every process marked as belonging to `agent_tag`; returns how many."""
    prefix = agent_tag.encode() + b"/"
    me = os.getpid()
    killed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        marker = read_environ_marker(int(name))
        if marker is not None and marker.startswith(prefix):
            try:
                os.kill(int(name), signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -I -c '{_BOOT}' <rankd root> <agent tag>", file=sys.stderr)
        return 2
    tag = argv[0]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)  # only the agent's end tells it to act
    os.write(1, _ARMED)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the agent stopped reading
    while os.read(0, 4096):  # blocks until the agent is gone
        pass
    for _ in range(_ROUNDS):
        if kill_marked(tag) == 0:
            break
        time.sleep(_PAUSE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
