"""Real `rankd-agent` processes on loopback for the tests.

Agents start through :mod:`rankd.testing` (the one way to start them): each agent's
stdout is drained on a thread and kept in `Agent.output`; `agents()` always stops them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import grpc
import psutil

from rankd.testing import STOP_TIMEOUT, LocalAgent, agent_command, local_agents
from rankd.testing import start_agent as start_local_agent
from rankd.v1 import agent_pb2_grpc

AGENT_BIN = agent_command()[0]  # the `rankd-agent` script beside the venv's python
RANKD_BIN = str(Path(sys.executable).with_name("rankd"))
PYTHON = sys.executable


class Agent(LocalAgent):
    """A local agent (`rankd.testing.LocalAgent`) that can name its ranks, with a gRPC
    channel and a `NodeAgent` stub to it (made on first use, closed by `stop`)."""

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

    def workers(self, marker: str) -> list[psutil.Process]:
        """Live descendants of the agent whose command line contains ``marker`` (a
        worker script's path): the ranks, not the agent's own helpers."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [k for k in kids if _alive(k) and marker in " ".join(_cmdline(k))]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_agent(log_dir: Path, *extra: str, cwd: Path | None = None) -> Agent:
    """One agent on 127.0.0.1 with a free port, logging to ``log_dir``; the caller stops it."""
    return Agent.adopt(start_local_agent(log_dir, *extra, cwd=cwd))


@contextmanager
def agents(tmp_path: Path, count: int) -> Iterator[list[Agent]]:
    """Start ``count`` agents (agent i logs to ``tmp_path/node<i>``); stop them all
    afterwards, with whatever they started."""
    with local_agents(count, log_dir=tmp_path) as started:
        yield [Agent.adopt(a) for a in started]


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ENV_DUMP = """\
import json, os, sys
keys = sys.argv[1].split(",")
print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
print("to-stderr rank " + os.environ["RANK"], file=sys.stderr, flush=True)
"""


class Proxy:
    """A loopback TCP proxy in front of an agent whose connections can be cut."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Break every open connection (both directions)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()


def start_launch(
    nodes: list[Agent], script: str, run_id: str, *flags: str, ranks_per_node: int = 2
) -> subprocess.Popen[str]:
    """`rankd launch` (a subprocess; no SLURM_JOB_NODELIST of the test's own) of `script`
    over `nodes` with `flags`, returned once every rank printed a line with "ready"."""
    proc = subprocess.Popen(
        [
            RANKD_BIN,
            "launch",
            "--nodes",
            ",".join(a.address for a in nodes),
            "--nproc-per-node",
            str(ranks_per_node),
            "--run-id",
            run_id,
            *flags,
            "--",
            PYTHON,
            script,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"},
    )
    assert proc.stdout is not None
    ready = 0
    deadline = time.monotonic() + 30
    while ready < ranks_per_node * len(nodes):
        assert time.monotonic() < deadline, "the ranks did not start"
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=30)[1]
        ready += "ready" in line
    return proc
