"""Shared fixtures: real `rankd-agent` processes on loopback, worker scripts in tmp_path.

Agents start through :mod:`rankd.testing`, the one way to start them (also what the
``rankd_cluster`` fixture of rankd's pytest plugin uses)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import grpc
import pytest

from rankd.testing import STOP_TIMEOUT, LocalAgent, agent_command
from rankd.testing import start_agent as start_local_agent
from rankd.v1 import agent_pb2_grpc

AGENT_BIN = agent_command()[0]  # the `rankd-agent` script beside the venv's python


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` every 10 ms until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


class AgentProcess(LocalAgent):
    """A local agent with a gRPC channel and a `NodeAgent` stub to it (made on first use,
    closed by `stop`)."""

    @cached_property
    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    @cached_property
    def stub(self) -> agent_pb2_grpc.NodeAgentStub:
        return agent_pb2_grpc.NodeAgentStub(self.channel)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """See `LocalAgent.stop`; also closes the channel."""
        try:
            return super().stop(sig, timeout)
        finally:
            if "channel" in self.__dict__:
                self.channel.close()


def start_agent(log_dir: Path, *extra: str, cwd: Path | None = None) -> AgentProcess:
    """Start a real `rankd-agent` on 127.0.0.1 with a free port (`rankd.testing`)."""
    local = start_local_agent(log_dir, *extra, cwd=cwd)
    return AgentProcess.adopt(local)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    handle = start_agent(tmp_path / "agent-logs")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def script(tmp_path: Path) -> Callable[[str, str], str]:
    """Write a Python worker script into tmp_path; returns its path."""

    def write(name: str, body: str) -> str:
        path = tmp_path / name
        path.write_text(body)
        return str(path)

    return write
