"""Real ``rankd-agent`` processes for the benchmarks, and the few RPCs they need.

Each agent runs as it would on a node (``rankd-agent --port 0 --log-dir DIR``); the
benchmark talks to it over loopback with the generated stubs, so every rankd figure
includes the RPC round trips. The agent's console (where ``tee`` mirrors go) is drained
by a thread; its log goes to ``agent-<n>.log`` beside its log dir.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import grpc

from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc as pb_grpc

__all__ = [
    "REPO",
    "Agent",
    "job_id",
    "launch_agents",
    "make_spec",
    "stop_all",
    "wait_exec",
    "wait_files",
]

REPO = Path(__file__).resolve().parents[1]
_START_TIMEOUT = 60.0
_RPC_TIMEOUT = 60.0
_ids = itertools.count()


def _agent_command() -> list[str]:
    beside = Path(sys.executable).with_name("rankd-agent")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("rankd-agent")
    return [found] if found else [sys.executable, "-m", "rankd.agent.server"]


def _drain(stream: IO[bytes], first: queue.Queue[bytes]) -> None:
    """Hand the first line over, then swallow the rest (the agent's tee'd console)."""
    first.put(stream.readline())
    while stream.read1(65536):
        pass


class Agent:
    """One running ``rankd-agent`` and a channel to it. ``stop()`` is idempotent.

    `command` replaces the agent by another server with the same start-up line and
    service (the bare stream server)."""

    def __init__(self, root: Path, name: str, command: Sequence[str] | None = None) -> None:
        self.log_dir = root / name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        if command is None:
            command = [*_agent_command(), "--port", "0", "--log-dir", str(self.log_dir)]
        self.proc = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,  # `python -m bench...` servers import from the checkout
            start_new_session=True,  # a Ctrl-C of the benchmark reaches it through stop()
        )
        self.pid = self.proc.pid
        self._first: queue.Queue[bytes] = queue.Queue()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=_drain, args=(self.proc.stdout, self._first), daemon=True
        )
        self._reader.start()
        self.address = ""
        self.channel: grpc.Channel | None = None
        self.stub: Any = None

    def connect(self, timeout: float = _START_TIMEOUT) -> None:
        """Wait for 'listening on HOST:PORT' and a ready channel."""
        try:
            line = self._first.get(timeout=timeout).decode().strip()
        except queue.Empty:
            raise RuntimeError(f"rankd-agent pid {self.pid} did not start in {timeout}s") from None
        if not line.startswith("listening on "):
            raise RuntimeError(f"rankd-agent pid {self.pid} said {line!r}, not 'listening on'")
        self.address = line.removeprefix("listening on ")
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        self.stub = pb_grpc.NodeAgentStub(self.channel)

    # -- RPCs ---------------------------------------------------------------------------

    def start(self, spec: pb.JobSpec) -> pb.JobStatus:
        resp = self.stub.Start(pb.StartRequest(spec=spec), timeout=_RPC_TIMEOUT)
        job = resp.job
        if len(job.ranks) != spec.nprocs or not all(r.pid > 0 for r in job.ranks):
            raise RuntimeError(f"Start of {spec.job_id} answered without every pid")
        return job

    def poll(self, job_id: str) -> pb.JobStatus:
        return self.stub.Poll(pb.PollRequest(job_id=job_id), timeout=_RPC_TIMEOUT).job

    def wait_end(self, job_id: str, *, streams: Sequence[int] = ()) -> pb.JobStatus:
        """Follow the job's stream until its end message; the final status."""
        req = pb.StreamRequest(job_id=job_id, follow=True, streams=list(streams))
        for resp in self.stub.Stream(req, timeout=_RPC_TIMEOUT):
            if resp.end:
                return resp.job
        raise RuntimeError(f"stream of {job_id} ended without its end message")

    def poll_until_ended(self, job_id: str) -> pb.JobStatus:
        """Poll in a tight loop until the job is no longer RUNNING."""
        request = pb.PollRequest(job_id=job_id)
        poll = self.stub.Poll
        while True:
            job = poll(request, timeout=_RPC_TIMEOUT).job
            if job.state != pb.RUNNING:
                return job

    def kill(self, job_id: str, *, timeout: float = 30.0) -> pb.JobStatus:
        req = pb.KillRequest(job_id=job_id, signal="SIGTERM", timeout=timeout)
        job = self.stub.Kill(req, timeout=_RPC_TIMEOUT + timeout).job
        if any(r.state == pb.RANK_RUNNING for r in job.ranks):
            raise RuntimeError(f"Kill of {job_id} returned with ranks still running")
        return job

    def terminate(self) -> None:
        """Ask the agent to stop (SIGTERM: it kills its jobs, then exits)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def launch_agents(root: Path, count: int, *, prefix: str = "agent") -> list[Agent]:
    """Start `count` agents at once and wait until every one serves; all or none."""
    agents: list[Agent] = []
    try:
        for i in range(count):
            agents.append(Agent(root, f"{prefix}-{i}"))
        for agent in agents:
            agent.connect()
    except BaseException:
        stop_all(agents)
        raise
    return agents


def stop_all(agents: Iterable[Agent]) -> None:
    """Stop agents in parallel: signal all, then wait for each."""
    agents = list(agents)
    for agent in agents:
        agent.terminate()
    for agent in agents:
        agent.stop()


def job_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


def make_spec(
    job: str,
    nprocs: int,
    entrypoint: str,
    args: Sequence[str] = (),
    *,
    rank_args: Mapping[int, Sequence[str]] | None = None,
    tee: str = "",
) -> pb.JobSpec:
    spec = pb.JobSpec(job_id=job, nprocs=nprocs, entrypoint=entrypoint, args=list(args), tee=tee)
    for rank, extra in (rank_args or {}).items():
        spec.rank_args[rank].args.extend(extra)
    return spec


def wait_exec(pids: Iterable[int], comm: str, timeout: float = 30.0) -> None:
    """Wait until every pid runs the program `comm` (exec done), so that two sides are
    measured from the same steady state."""
    pending = set(pids)

    def done() -> bool:
        for pid in list(pending):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == comm:
                        pending.discard(pid)
            except OSError:
                pending.discard(pid)  # already gone: nothing to wait for
        return not pending

    _poll_until(done, timeout, lambda: f"pids {sorted(pending)} did not exec {comm} in {timeout}s")


def wait_files(directory: Path, count: int, timeout: float = 60.0) -> None:
    """Wait until `directory` holds `count` entries (ranks that said they are ready)."""
    _poll_until(
        lambda: len(os.listdir(directory)) >= count,
        timeout,
        lambda: f"{directory}: {count} ranks not ready in {timeout}s",
    )


def _poll_until(done: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    """Check `done` every 2 ms; TimeoutError(why()) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(why())
        time.sleep(0.002)
