"""Helpers for the tests of the supervision core (`agent.supervisor`, `agent.logs`,
`agent.failures`, `agent.specs`): a Supervisor over `tmp_path` whose console is captured,
worker scripts written into `tmp_path`, and deadline-bound waits."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from helpers.wait import wait_until_async
from rankd.agent import spares
from rankd.agent.logs import STDERR, STDOUT, LogLine, LogReader
from rankd.agent.model import Attempt
from rankd.agent.specs import JobSpec
from rankd.agent.supervisor import Supervisor

__all__ = [
    "PYTHON",
    "Core",
    "file_lines",
    "gone",
    "open_core",
    "read_lines",
    "wait_for_file_line",
]

PYTHON = sys.executable


def file_lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


async def wait_for_file_line(path: str | Path, count: int = 1, timeout: float = 10.0) -> list[str]:
    """Wait until the file holds `count` complete lines; return them."""
    await wait_until_async(
        lambda: len(file_lines(path)) >= count and Path(path).read_text().endswith("\n"),
        timeout,
        f"{count} line(s) in {path}",
    )
    return file_lines(path)


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (it does not exist, or is a zombie)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def read_lines(attempt: Attempt, keys: list[tuple[int, int]], **kw: Any) -> list[LogLine]:
    """Every line a LogReader yields (follow defaults to False)."""
    out: list[LogLine] = []
    async for batch in LogReader(attempt.logs, keys, **kw).batches():
        out.extend(batch)
    return out


@dataclass
class Core:
    """A Supervisor over `<tmp>/logs` with its console captured, and worker scripts."""

    sup: Supervisor
    out: io.StringIO
    err: io.StringIO
    tmp: Path
    log_dir: Path

    def script(self, name: str, body: str) -> str:
        """Write a Python worker script; returns its path."""
        path = self.tmp / name
        path.write_text(textwrap.dedent(body))
        return str(path)

    def shell(self, name: str, body: str) -> str:
        """Write an executable /bin/sh script; returns its path."""
        path = self.tmp / name
        path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
        path.chmod(0o755)
        return str(path)

    def spec(self, job_id: str, script: str, nprocs: int = 1, **kw: Any) -> JobSpec:
        """A job running `python -u <script>` on every rank."""
        return JobSpec(job_id=job_id, nprocs=nprocs, entrypoint=PYTHON, args=("-u", script), **kw)

    async def run(self, spec: JobSpec, timeout: float = 20.0) -> Attempt:
        """Start a job and wait (with a deadline) until it ended and its mirrors drained."""
        job, created = await self.sup.start(spec)
        assert created
        return await asyncio.wait_for(self.sup.wait(job.job_id), timeout)

    def log_entries(self) -> list[str]:
        """The log dir's entries but the spare attempt directory (see agent.spares)."""
        return sorted(e for e in os.listdir(self.log_dir) if not e.startswith(spares.PREFIX))

    @staticmethod
    def out_lines(attempt: Attempt, rank: int, stream: int = STDOUT) -> list[str]:
        return file_lines(attempt.logs.path(rank, stream))

    @staticmethod
    def err_lines(attempt: Attempt, rank: int) -> list[str]:
        return file_lines(attempt.logs.path(rank, STDERR))


@contextlib.asynccontextmanager
async def open_core(tmp_path: Path) -> AsyncIterator[Core]:
    """A Supervisor over `tmp_path/logs` (no subreaper), always closed on exit."""
    out, err = io.StringIO(), io.StringIO()
    log_dir = tmp_path / "logs"
    sup = Supervisor(str(log_dir), console_out=out, console_err=err)
    try:
        yield Core(sup, out, err, tmp_path, log_dir)
    finally:
        await sup.close(timeout=2.0)
