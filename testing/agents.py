"""Real `rankd-agent` processes on loopback: start them, read their address, stop them.

This is the one way rankd's own tests and users' tests start agents. An agent is a
child process in its own session, bound to 127.0.0.1 on a free port; its first stdout
line (`listening on HOST:PORT`) gives the address. Both of its pipes are drained on
threads: the agent mirrors `tee` output on stdout, and an undrained pipe would block
it. Stdout lines are kept (`LocalAgent.output`), stderr's last lines too (for errors),
and stderr is echoed on this process's fd 2 (so pytest shows it with a failed test).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

import psutil

__all__ = [
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "AgentStartError",
    "LeftoverProcessWarning",
    "LocalAgent",
    "agent_command",
    "local_agents",
    "start_agent",
    "stop_agents",
]

logger = logging.getLogger(__name__)

#: Seconds an agent may take to print its address (a cold start on a loaded host: ~1 s).
START_TIMEOUT = 30.0
#: Seconds an agent may take to exit after SIGTERM before it gets SIGKILL; above the
#: agent's own default `--shutdown-timeout` (10 s) for its ranks.
STOP_TIMEOUT = 30.0
#: Seconds the processes of stopped agents (guardian, ranks) may take to be gone.
LEFTOVER_TIMEOUT = 10.0
#: Stderr lines kept per agent for error messages.
STDERR_KEPT = 200
_TAIL = 20  # stderr lines an AgentStartError quotes
_LISTENING = "listening on "


class AgentStartError(RuntimeError):
    """An agent exited or stayed silent instead of printing its address.

    ``stderr`` holds the last lines the agent wrote there, ``returncode`` its exit code
    (negative: killed by that signal, after ``START_TIMEOUT``)."""

    def __init__(self, message: str, *, stderr: str, returncode: int | None) -> None:
        self.stderr = stderr
        self.returncode = returncode
        super().__init__(f"{message}\n--- rankd-agent stderr (last lines) ---\n{stderr}".rstrip())


class LeftoverProcessWarning(RuntimeWarning):
    """A process of a stopped agent (guardian, rank) outlived it and had to be killed."""


def agent_command(*, script: bool = True) -> list[str]:
    """How to run `rankd-agent` with this interpreter: the script beside
    ``sys.executable`` (unless ``script`` is False or there is none), else
    ``python -P -m rankd.agent.server`` (``-P`` keeps the working directory, which may
    hold a ``rankd/`` folder, off ``sys.path``)."""
    path = Path(sys.executable).with_name("rankd-agent")
    if script and path.is_file() and os.access(path, os.X_OK):
        return [str(path)]
    return [sys.executable, "-P", "-m", "rankd.agent.server"]


@dataclass(eq=False)
class LocalAgent:
    """A running `rankd-agent` child process and what it printed.

    ``output``: its stdout lines after the address line (the mirrored ``tee`` output),
    filled by a thread while it runs."""

    proc: subprocess.Popen[str]
    address: str
    log_dir: Path
    output: list[str] = field(default_factory=list)
    stderr_lines: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_KEPT))

    @classmethod
    def adopt(cls, agent: LocalAgent) -> Self:
        """The same running agent as an instance of ``cls`` (a subclass adding helpers);
        it shares ``agent``'s output buffers, which the drain threads keep filling."""
        return cls(agent.proc, agent.address, agent.log_dir, agent.output, agent.stderr_lines)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, lines: int = _TAIL) -> str:
        """The last ``lines`` lines the agent wrote on stderr (up to ``STDERR_KEPT``)."""
        return "".join(list(self.stderr_lines)[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (unless the agent has exited), wait up to ``timeout`` seconds, then
        SIGKILL its process group; returns the exit code (``-N``: killed by signal N).
        Idempotent. Its ranks are the agent's to stop (SIGTERM) or its guardian's
        (SIGKILL): this does not touch them."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        return self._wait(time.monotonic() + timeout)

    def _wait(self, deadline: float) -> int:
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("rankd-agent %s (pid %d) did not stop: SIGKILL", self.address, self.pid)
            # Not yet reaped, so the group id is still the agent's own (new session).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def start_agent(
    log_dir: Path | str,
    *args: str,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log_level: str = "WARNING",
    echo_stderr: bool = True,
    timeout: float = START_TIMEOUT,
    command: Sequence[str] | None = None,
) -> LocalAgent:
    """Start one agent on 127.0.0.1 (free port) with logs under ``log_dir`` and the extra
    command-line ``args``; returns once it listens. ``command`` runs the agent (default
    :func:`agent_command`); ``env`` replaces the environment it inherits. Raises
    :class:`AgentStartError` (with its stderr tail) when it exits or stays silent for
    ``timeout`` s; it is not left running then."""
    (agent,) = start_agents(
        [Path(log_dir)],
        *args,
        cwd=cwd,
        env=env,
        log_level=log_level,
        echo_stderr=echo_stderr,
        timeout=timeout,
        command=command,
    )
    return agent


def start_agents(
    log_dirs: Sequence[Path],
    *args: str,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log_level: str = "WARNING",
    echo_stderr: bool = True,
    timeout: float = START_TIMEOUT,
    command: Sequence[str] | None = None,
) -> list[LocalAgent]:
    """One agent per log dir, started side by side: all of them, or none (when one fails
    to start, the others are stopped and its :class:`AgentStartError` is raised)."""
    command = agent_command() if command is None else list(command)
    pending: list[_Pending] = []
    try:
        for log_dir in log_dirs:
            argv = [*command, "--port", "0", "--log-dir", str(log_dir)]
            argv += ["--log-level", log_level, *args]
            pending.append(_Pending.spawn(argv, Path(log_dir), cwd, env, echo_stderr))
        deadline = time.monotonic() + timeout
        return [p.ready(deadline, timeout) for p in pending]
    except BaseException:
        stop_agents([p.agent for p in pending])
        raise


class _Pending:
    """An agent between spawn and its address line."""

    def __init__(
        self, agent: LocalAgent, argv: list[str], first: _FirstLine, threads: list[threading.Thread]
    ) -> None:
        self.agent = agent
        self._argv = argv
        self._first = first
        self._threads = threads

    @classmethod
    def spawn(
        cls,
        argv: list[str],
        log_dir: Path,
        cwd: Path | str | None,
        env: Mapping[str, str] | None,
        echo_stderr: bool,
    ) -> _Pending:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,  # a Ctrl-C at the terminal is for the test run, not it
        )
        assert proc.stdout is not None and proc.stderr is not None
        agent = LocalAgent(proc, "", log_dir)
        first = _FirstLine()
        threads = [
            threading.Thread(
                target=_drain_stdout, args=(proc.stdout, first, agent.output), daemon=True
            ),
            threading.Thread(
                target=_drain_stderr,
                args=(proc.stderr, agent.stderr_lines, echo_stderr),
                daemon=True,
            ),
        ]
        for thread in threads:
            thread.start()
        return cls(agent, argv, first, threads)

    def ready(self, deadline: float, timeout: float) -> LocalAgent:
        """The agent once it printed its address; AgentStartError otherwise."""
        arrived, line = self._first.get(max(0.0, deadline - time.monotonic()))
        if line is not None and line.startswith(_LISTENING):
            self.agent.address = _address(line[len(_LISTENING) :].strip())
            return self.agent
        agent = self.agent
        if not arrived:
            why = f"printed no address within {timeout:g} s"
        elif line is None:
            why = "exited before printing its address"
        else:
            why = f"printed {line.rstrip()!r} instead of its address"
        code = agent.stop(signal.SIGKILL)
        for thread in self._threads:  # the stderr tail is complete once its pipe is at EOF
            thread.join(2.0)
        raise AgentStartError(
            f"rankd-agent with log dir {agent.log_dir} did not start: it {why} "
            f"(exit code {code}); command: {shlex.join(self._argv)}",
            stderr=agent.stderr_tail(),
            returncode=code,
        )


def _address(printed: str) -> str:
    """A gRPC target from the agent's ``HOST:PORT`` (an IPv6 host gets brackets)."""
    host, port = printed.rsplit(":", 1)
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else printed


class _FirstLine:
    """The agent's first stdout line, handed over by the drain thread (None: EOF)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._line: str | None = None

    def set(self, line: str | None) -> None:
        """Keep ``line`` unless a line was already set."""
        if not self._event.is_set():
            self._line = line
            self._event.set()

    def get(self, timeout: float) -> tuple[bool, str | None]:
        """(whether the drain thread answered within ``timeout`` s, the line)."""
        arrived = self._event.wait(timeout)
        return arrived, self._line


def _drain_stdout(pipe: IO[str], first: _FirstLine, output: list[str]) -> None:
    try:
        with pipe:
            first.set(pipe.readline() or None)
            for line in pipe:
                output.append(line)
    finally:
        first.set(None)  # a read error before the first line must not leave ready() waiting


def _drain_stderr(pipe: IO[str], kept: deque[str], echo: bool) -> None:
    with pipe:
        for line in pipe:
            kept.append(line)
            if echo:
                # fd 2, not sys.stderr: what a child with an inherited stderr would do, and
                # pytest's fd capture shows it with the test that was running.
                with contextlib.suppress(OSError):
                    os.write(2, line.encode("utf-8", "replace"))


def stop_agents(
    agents: Iterable[LocalAgent],
    *,
    sig: int = signal.SIGTERM,
    timeout: float = STOP_TIMEOUT,
    sweep: bool = True,
) -> list[int]:
    """Stop every agent at once: ``sig`` to all, one shared ``timeout`` for all to exit,
    then SIGKILL; returns their exit codes. With ``sweep``, the processes they had started
    (guardian, ranks) that are still there ``LEFTOVER_TIMEOUT`` s after them are SIGKILLed
    with a :class:`LeftoverProcessWarning`, since an agent must have stopped them itself."""
    agents = list(agents)
    family = [p for a in agents for p in _descendants(a.pid)] if sweep else []
    for agent in agents:
        if agent.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                agent.proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    codes = [agent._wait(deadline) for agent in agents]
    if family:
        _sweep(family, time.monotonic() + LEFTOVER_TIMEOUT)
    return codes


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:  # NoSuchProcess; psutil.Process also checks it is not a new one
        return True


def _sweep(procs: list[psutil.Process], deadline: float) -> None:
    while not all(_gone(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)  # not our children (reparented): no wait() to block on
    left = [p for p in procs if not _gone(p)]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if left:
        names = ", ".join(f"{p.pid}" for p in left)
        warnings.warn(
            f"processes of stopped rankd agents were still running, SIGKILLed: {names}",
            LeftoverProcessWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def local_agents(
    n: int = 2,
    *args: str,
    log_dir: Path | str | None = None,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log_level: str = "WARNING",
    echo_stderr: bool = True,
    stop_timeout: float = STOP_TIMEOUT,
    command: Sequence[str] | None = None,
) -> Iterator[list[LocalAgent]]:
    """``n`` agents started side by side with the extra command-line ``args``, agent ``i``
    logging to ``<log_dir>/node<i>`` (``log_dir`` None: a temporary directory, removed
    afterwards). On exit every agent gets SIGTERM (SIGKILL after ``stop_timeout``) and
    nothing they started is left running (see :func:`stop_agents`). When one fails to
    start, the others are stopped and :class:`AgentStartError` is raised."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of agents must be an int >= 1, not {n!r}")
    temp: str | None = None
    if log_dir is None:
        log_dir = temp = tempfile.mkdtemp(prefix="rankd-agents-")
    base = Path(log_dir)
    try:
        agents = start_agents(
            [base / f"node{i}" for i in range(n)],
            *args,
            cwd=cwd,
            env=env,
            log_level=log_level,
            echo_stderr=echo_stderr,
            command=command,
        )
        try:
            yield agents
        finally:
            stop_agents(agents, timeout=stop_timeout)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
