"""Shared fixtures: real `rankd-agent` processes on loopback, worker scripts in tmp_path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from rankd.v1 import agent_pb2_grpc

AGENT_BIN = str(Path(sys.executable).with_name("rankd-agent"))


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` every 10 ms until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


@dataclass
class AgentProcess:
    proc: subprocess.Popen[str]
    address: str
    log_dir: Path
    channel: grpc.Channel
    stub: agent_pb2_grpc.NodeAgentStub

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.channel.close()


def start_agent(log_dir: Path, *extra: str, cwd: Path | None = None) -> AgentProcess:
    """Start a real `rankd-agent` on 127.0.0.1 with a free port; read its address from
    the first stdout line."""
    proc = subprocess.Popen(
        [AGENT_BIN, "--port", "0", "--log-dir", str(log_dir), "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        start_new_session=True,
        cwd=cwd,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the agent prints it first, flushed; EOF if it died
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        raise AssertionError(f"rankd-agent did not start: first line {line!r}")
    address = line.split()[-1]
    channel = grpc.insecure_channel(address)
    return AgentProcess(proc, address, log_dir, channel, agent_pb2_grpc.NodeAgentStub(channel))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    handle = start_agent(tmp_path / "agent-logs")
    try:
        yield handle
    finally:
        if handle.proc.poll() is None:
            handle.stop()
        if handle.proc.poll() is None:
            os.killpg(handle.proc.pid, signal.SIGKILL)
            handle.proc.wait()


@pytest.fixture
def script(tmp_path: Path) -> Callable[[str, str], str]:
    """Write a Python worker script into tmp_path; returns its path."""

    def write(name: str, body: str) -> str:
        path = tmp_path / name
        path.write_text(body)
        return str(path)

    return write
