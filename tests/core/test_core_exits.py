"""agent.procs.ExitWatcher: every exit reaped and reported once, with its code, in
batches when many processes die together; nothing left open after close()."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from rankd.agent import procs

pytestmark = pytest.mark.timeout(30)


def _spawn(code: str) -> int:
    popen = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    popen.returncode = 0  # reaped by the watcher, never by subprocess
    return popen.pid


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


class _Batches(list[list[tuple[str, int, float]]]):
    """The watcher's callback: keeps the batches, wakes whoever waits for a count."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(self, batch: list[tuple[str, int, float]]) -> None:
        self.append(batch)
        self.changed.set()

    async def reach(self, count: int) -> None:
        while sum(len(batch) for batch in self) < count:
            self.changed.clear()
            await self.changed.wait()


def test_many_exits_are_each_reported_once_with_their_code() -> None:
    async def main() -> tuple[_Batches, int]:
        loop = asyncio.get_running_loop()
        before = _open_fds()
        batches = _Batches()
        watcher: procs.ExitWatcher[str] = procs.ExitWatcher(loop, batches)
        sleepers = [_spawn("import time; time.sleep(60)") for _ in range(16)]
        for i, pid in enumerate(sleepers):
            watcher.watch(pid, f"sleeper-{i}")
        quitter = _spawn("raise SystemExit(7)")
        watcher.watch(quitter, "quitter")
        await asyncio.wait_for(batches.reach(1), 10)
        for pid in sleepers:  # all at once: reported in fewer wake-ups than exits
            os.killpg(pid, signal.SIGTERM)
        await asyncio.wait_for(batches.reach(17), 10)
        watcher.close()
        leaked = len(_open_fds() - before)
        return batches, leaked

    batches, leaked = asyncio.run(main())
    exits = {key: code for batch in batches for key, code, _ in batch}
    assert sum(len(batch) for batch in batches) == 17  # each exactly once
    assert exits["quitter"] == 7
    assert all(exits[f"sleeper-{i}"] == -signal.SIGTERM for i in range(16))
    assert all(t > 0 for batch in batches for _, _, t in batch)
    assert leaked == 0
    with pytest.raises(ChildProcessError):  # every one was reaped
        os.waitpid(-1, os.WNOHANG)


def test_close_leaves_watched_processes_alone_and_releases_their_pidfds() -> None:
    async def main() -> tuple[int, list[list[tuple[int, int, float]]]]:
        loop = asyncio.get_running_loop()
        before = _open_fds()
        batches: list[list[tuple[int, int, float]]] = []
        watcher: procs.ExitWatcher[int] = procs.ExitWatcher(loop, batches.append)
        pid = _spawn("import time; time.sleep(60)")
        watcher.watch(pid, pid)
        watcher.close()
        leaked = len(_open_fds() - before)
        os.kill(pid, signal.SIGKILL)
        gone = loop.create_future()
        fd = os.pidfd_open(pid)
        loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
        await asyncio.wait_for(gone, 10)  # exited: a watcher still attached would run now
        loop.remove_reader(fd)
        os.close(fd)
        for _ in range(3):
            await asyncio.sleep(0)
        _, status = os.waitpid(pid, 0)  # still ours to reap: the watcher let go
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        return leaked, batches

    leaked, batches = asyncio.run(main())
    assert leaked == 0
    assert batches == []
