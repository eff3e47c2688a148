"""Python stacks of running ranks, taken by py-spy, for finding the rank that hangs a job.

The agent does not walk frames itself: it runs the field's sampler, `py-spy dump --json`,
once per rank, all ranks in parallel (bounded), each with a deadline, as child processes
awaited on the event loop, so a sampler that hangs costs one rank's answer, never the
agent. A rank that cannot be sampled (exited, not Python, ptrace refused, sampler missing
or too slow) gets an `error` that says why and what to do; it never fails the others.

A rank whose own process is not Python (a shell wrapper, `env`, a launcher) is answered
by its first Python descendant. Each answer also carries what a hang report needs beside
the stack: how long the rank has been silent, its last output line and its CPU use over
the sampling window.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from rankd.agent import rankfiles

__all__ = [
    "Children",
    "Frame",
    "RankStacks",
    "Sampler",
    "StackTarget",
    "ThreadStack",
    "find_sampler",
    "traceable",
]

INSTALL_HINT = "pip install 'rankd[stacks]' (py-spy) where the agent runs"
_DEFAULT_TIMEOUT = 10.0
_TAIL_BYTES = 4096
_MAX_OUTPUT = 16 << 20
# py-spy mostly waits on the kernel (ptrace, process_vm_readv): more than the cores
_PARALLEL = max(
    8, 4 * (os.cpu_count() or 1)
)  # a dump of many threads with deep stacks stays far below this


@dataclass(frozen=True, slots=True)
class Frame:
    function: str
    filename: str
    line: int


@dataclass(frozen=True, slots=True)
class ThreadStack:
    """One thread's stack, outermost frame first."""

    name: str
    thread_id: int  # the OS thread id
    active: bool  # running (not idle in a wait), as the sampler judged
    owns_gil: bool
    frames: tuple[Frame, ...]


@dataclass(frozen=True, slots=True)
class StackTarget:
    local_rank: int
    pid: int
    stdout_path: str
    stderr_path: str


@dataclass(slots=True)
class RankStacks:
    local_rank: int
    pid: int  # the process sampled (a Python descendant of the rank's own, maybe)
    threads: list[ThreadStack] = field(default_factory=list)
    error: str = ""  # why it could not be sampled; threads are then empty
    silent_for: float = -1.0  # seconds since the rank last wrote output (-1: never wrote)
    last_line: str = ""
    cpu_percent: float = -1.0  # over the sampling window, its whole process tree (-1: unknown)


def find_sampler(explicit: str | None = None) -> str | None:
    """The py-spy executable: `explicit`, else one beside this Python (a venv's bin),
    else on PATH. None when there is none."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("py-spy")


class Children(Protocol):
    """The agent's orphan reaper (`Terminator`): told of each sampler process, so that
    it leaves that process's exit to its owner."""

    def protect(self, pid: int) -> None: ...

    def release(self, pid: int) -> None: ...


class _Unwatched:
    def protect(self, pid: int) -> None:
        pass

    def release(self, pid: int) -> None:
        pass


class Sampler:
    """Takes stacks with `program` (None: none installed, every rank answers so), at most
    `parallel` samplers at a time, each given `timeout` seconds. `children`: the agent's
    orphan reaper, if it has one."""

    def __init__(
        self,
        program: str | None,
        *,
        children: Children | None = None,
        timeout: float = _DEFAULT_TIMEOUT,
        parallel: int = 0,
    ) -> None:
        self.program = program
        self.timeout = timeout
        self._children: Children = children or _Unwatched()
        parallel = parallel or _PARALLEL
        self._slots = asyncio.Semaphore(parallel)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            parallel, thread_name_prefix="rankd-stacks"
        )

    async def sample(
        self, targets: Sequence[StackTarget], *, native: bool, timeout: float | None = None
    ) -> list[RankStacks]:
        """One answer per target, in order. The /proc and file reads run in a thread:
        a few milliseconds per rank that the event loop must not carry."""
        before = await asyncio.to_thread(_tree_cpus, targets)
        start = time.monotonic()
        deadline = start + (timeout or self.timeout)  # one for the whole call
        answers = await asyncio.gather(*(self._one(t, native, deadline) for t in targets))
        window = max(time.monotonic() - start, 1e-3)
        after = await asyncio.to_thread(_tree_cpus, targets)
        outputs = await asyncio.to_thread(lambda: [_last_output(t) for t in targets])
        for answer, was, used, output in zip(answers, before, after, outputs, strict=True):
            if used >= 0 and was >= 0:
                answer.cpu_percent = round(100.0 * (used - was) / window, 1)
            answer.silent_for, answer.last_line = output
        return list(answers)

    async def _one(self, target: StackTarget, native: bool, deadline: float) -> RankStacks:
        answer = RankStacks(target.local_rank, target.pid)
        if self.program is None:
            answer.error = f"no stack sampler on this agent: {INSTALL_HINT}"
            return answer
        async with self._slots:
            threads, error = await self._dump(target.pid, native, deadline)
            if error == _NOT_PYTHON:  # a wrapper: its first Python descendant answers
                for pid in await asyncio.to_thread(_descendants, target.pid):
                    threads, error = await self._dump(pid, native, deadline)
                    if error != _NOT_PYTHON:
                        answer.pid = pid
                        break
        if threads is None:
            answer.error = (
                f"process {target.pid} and its descendants are not Python"
                if error == _NOT_PYTHON
                else error
            )
        else:
            answer.threads = threads
        return answer

    async def _dump(
        self, pid: int, native: bool, deadline: float
    ) -> tuple[list[ThreadStack] | None, str]:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return None, "not sampled: the call's time was used up by other ranks"
        argv = [str(self.program), "dump", "--pid", str(pid), "--json"]
        if native:
            argv.append("--native")
        env = {**os.environ, "RUST_BACKTRACE": "0"}
        try:
            # Started from the loop's thread and protected in the same step, before the
            # agent's orphan reaper (a SIGCHLD callback on this loop) can see it exit.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        except OSError as err:
            return None, f"cannot run the stack sampler {self.program}: {err.strerror or err}"
        self._children.protect(proc.pid)
        try:
            loop = asyncio.get_running_loop()
            out, err_out = await loop.run_in_executor(self._threads, _collect, proc, timeout)
        finally:
            self._children.release(proc.pid)
        if out is None:
            return None, f"the stack sampler gave no answer within {timeout:.1f} s"
        if proc.returncode != 0:
            return None, _explain(pid, err_out.decode(errors="replace"))
        try:
            return _parse(out[:_MAX_OUTPUT], pid), ""
        except (ValueError, KeyError, TypeError) as bad:
            return None, f"the stack sampler's answer could not be read: {bad}"

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def _collect(proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes | None, bytes]:
    """The sampler's output, reaped; (None, ...) when it overran `timeout` (killed)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, b""
    return out, err


_NOT_PYTHON = "not a Python process"


def _explain(pid: int, stderr: str) -> str:
    """One line for py-spy's failure, with the fix where there is one."""
    text = stderr.lower()
    if "python version" in text or "python interpreter" in text:
        return _NOT_PYTHON
    if "permission denied" in text or "operation not permitted" in text:
        return f"not permitted to read process {pid}: {_ptrace_fix()}"
    if "no such file" in text or "no such process" in text or not psutil.pid_exists(pid):
        return "the rank exited before it could be sampled"
    first = next((ln.strip() for ln in stderr.splitlines() if ln.strip()), "no message")
    return f"the stack sampler failed: {first.removeprefix('Error: ')}"


def ptrace_scope() -> int:
    """kernel.yama.ptrace_scope (-1: no Yama on this kernel)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", "rb") as f:
            return int(f.read().strip() or b"-1")
    except (OSError, ValueError):
        return -1


def _ptrace_fix() -> str:
    scope = ptrace_scope()
    if scope == 1:
        return (
            "kernel.yama.ptrace_scope is 1 and the rank does not let this agent trace it "
            "(started by an earlier agent, a wrapper's child, or undumpable); "
            "run the agent with CAP_SYS_PTRACE (systemd: AmbientCapabilities=CAP_SYS_PTRACE; "
            "Kubernetes: securityContext.capabilities.add: [SYS_PTRACE])"
        )
    if scope >= 2:
        return (
            f"kernel.yama.ptrace_scope is {scope}, which allows only CAP_SYS_PTRACE "
            "(scope 2) or nobody (3) to attach; run the agent with CAP_SYS_PTRACE "
            "(systemd: AmbientCapabilities=CAP_SYS_PTRACE; Kubernetes: "
            "securityContext.capabilities.add: [SYS_PTRACE]) or, at scope 2, lower it to 1"
        )
    return (
        "ptrace was refused (a container without CAP_SYS_PTRACE, or a rank that made "
        "itself undumpable); run the agent with CAP_SYS_PTRACE (systemd: "
        "AmbientCapabilities=CAP_SYS_PTRACE; Kubernetes: securityContext.capabilities.add: "
        "[SYS_PTRACE])"
    )


# Yama (kernel.yama.ptrace_scope=1) lets a process be traced only by its ancestors, or by
# a process it names (PR_SET_PTRACER) and that process's descendants. py-spy runs as the
# agent's child, not as an ancestor of the ranks, so under scope 1 each rank names the
# agent first: a short step of the agent's Python in the rank's own process (same pid),
# which then execs the rank's command. posix_spawn has no hook to do it before exec.
_PR_SET_PTRACER = 0x59616D61
_CAP_SYS_PTRACE = 19
_PTRACER_STEP = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None).prctl({_PR_SET_PTRACER}, int(sys.argv[1]), 0, 0, 0)\n"
    "try:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "except OSError as err:\n"
    "    sys.exit(f'rankd: cannot run {sys.argv[2]}: {err.strerror}')\n"
)


def traceable(
    argv: list[str], *, scope: int | None = None, can_ptrace: bool | None = None
) -> list[str]:
    """The argv to spawn a rank with (argv[0] absolute) so that this agent's samplers
    may read it: `argv` itself, unless Yama's ptrace_scope is 1 and the agent lacks
    CAP_SYS_PTRACE (`scope`, `can_ptrace`: as found on this host when None); then the
    PR_SET_PTRACER step above, which names this process and execs `argv` in place."""
    if (ptrace_scope() if scope is None else scope) != 1:
        return argv
    if _can_ptrace() if can_ptrace is None else can_ptrace:
        return argv
    return [sys.executable, "-I", "-S", "-c", _PTRACER_STEP, str(os.getpid()), *argv]


@functools.cache
def _can_ptrace() -> bool:
    """Whether this process has CAP_SYS_PTRACE in its effective set."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            caps = next(ln for ln in f if ln.startswith("CapEff:")).split()[1]
        return bool(int(caps, 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, StopIteration, IndexError, ValueError):
        return False


def _parse(raw: bytes, pid: int) -> list[ThreadStack]:
    """py-spy's JSON as threads. py-spy names a thread only once the program has imported
    `threading`; the one whose OS thread id is the pid is the main thread."""
    threads = []
    for item in json.loads(raw):
        thread_id = int(item.get("os_thread_id") or item.get("thread_id") or 0)
        frames = tuple(
            Frame(str(f["name"]), str(f["filename"]), int(f.get("line") or 0))
            for f in reversed(item["frames"])  # py-spy gives the innermost first
        )
        threads.append(
            ThreadStack(
                name=str(item.get("thread_name") or ("MainThread" if thread_id == pid else "")),
                thread_id=thread_id,
                active=bool(item.get("active")),
                owns_gil=bool(item.get("owns_gil")),
                frames=frames,
            )
        )
    return threads


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _tree_cpus(targets: Sequence[StackTarget]) -> list[float]:
    return [_tree_cpu(t.pid) for t in targets]


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants (-1: it is gone)."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in (root, *root.children(recursive=True)):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total
    except psutil.Error:
        return -1.0


def _last_output(target: StackTarget) -> tuple[float, str]:
    """Seconds since the rank's newest output and its last complete line."""
    newest, line = -1.0, ""
    for path in (target.stdout_path, target.stderr_path):
        tail = _tail(path)
        if tail is None:
            continue
        mtime, data = tail
        if mtime > newest and data.strip():
            newest = mtime
            lines = data.rstrip(b"\n").rsplit(b"\n", 1)
            line = lines[-1].decode(errors="replace")[:500]
    if newest < 0:
        return -1.0, ""
    return round(max(0.0, time.time() - newest), 3), line


def _tail(path: str) -> tuple[float, bytes] | None:
    """(mtime, last bytes) of a regular file, never following a link or opening a FIFO
    that a rank may have put in its place."""
    try:
        fd = rankfiles.open_regular(path)
    except OSError:  # missing, or not a regular file (NotRegularFile)
        return None
    try:
        info = os.fstat(fd)
        if info.st_size == 0:
            return None
        start = max(0, info.st_size - _TAIL_BYTES)
        return info.st_mtime, os.pread(fd, info.st_size - start, start)
    except OSError:
        return None
    finally:
        os.close(fd)
