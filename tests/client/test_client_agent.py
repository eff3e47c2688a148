"""AgentClient and AsyncAgentClient against a real `rankd-agent` on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.agents import PYTHON, Agent, Proxy, agents, closed_port, start_agent
from helpers.wait import wait_until

from rankd.client import (
    AgentClient,
    AgentError,
    AgentTimeout,
    AgentUnavailable,
    AlreadyExists,
    AsyncAgentClient,
    InvalidArgument,
    JobNotFound,
)
from rankd.client.cli import main
from rankd.v1 import agent_pb2

LINES = """\
import os, sys
n = int(sys.argv[1])
for i in range(n):
    print(f"out {os.environ['LOCAL_RANK']} {i}")
    print(f"err {os.environ['LOCAL_RANK']} {i}", file=sys.stderr)
"""

SLEEPER = """\
import signal, sys, time
def usr1(signum, frame):
    print("got SIGUSR1", flush=True)
signal.signal(signal.SIGUSR1, usr1)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

GATED = """\
import os, sys, time
n, gate = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    print(f"line {i}")
    if i % 100 == 99:  # bursts over ~1 s: a stream of many messages, to cut
        sys.stdout.flush()
        time.sleep(0.005)
    if i == n // 2:
        sys.stdout.flush()
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Agent]:
    with agents(tmp_path, 1) as (agent,):
        yield agent


def spec(job_id: str, script: Path, *args: str, nprocs: int = 2) -> agent_pb2.JobSpec:
    return agent_pb2.JobSpec(
        job_id=job_id, nprocs=nprocs, entrypoint=PYTHON, args=[str(script), *args]
    )


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def test_start_poll_wait_stream_list_info(node: Agent, tmp_path: Path) -> None:
    script = write(tmp_path, "lines.py", LINES)
    with AgentClient(node.address, timeout=5) as client:
        started = client.start(spec("job-1", script, "50"))
        assert started.created and started.job.job_id == "job-1"
        assert all(r.pid > 0 for r in started.job.ranks)
        again = client.start(spec("job-1", script, "50"))
        assert not again.created

        final = client.wait("job-1", timeout=30)
        assert final.state == agent_pb2.SUCCEEDED
        assert client.poll("job-1").state == agent_pb2.SUCCEEDED

        lines = list(client.stream("job-1"))
        got = {(ln.local_rank, ln.stream, ln.text) for ln in lines}
        expected = {
            (r, kind, f"{name} {r} {i}")
            for r in range(2)
            for kind, name in ((agent_pb2.STDOUT, "out"), (agent_pb2.STDERR, "err"))
            for i in range(50)
        }
        assert got == expected and len(lines) == 200
        assert {ln.prefix for ln in lines if ln.local_rank == 1} == {"[default1]:"}

        only = list(client.stream("job-1", ranks=[1], streams=["stderr"], contains=" 4"))
        assert [ln.text for ln in only] == ["err 1 4"] + [f"err 1 {i}" for i in range(40, 50)]
        rx = list(client.stream("job-1", streams=["stdout"], regex=r"^out 0 4[89]$"))
        assert [ln.text for ln in rx] == ["out 0 48", "out 0 49"]

        # Resume from a cursor in the middle: exactly the rest.
        first = list(client.stream("job-1", ranks=[0], streams=["stdout"]))
        rest = list(
            client.stream(
                "job-1",
                ranks=[0],
                streams=["stdout"],
                resume=[
                    agent_pb2.Cursor(local_rank=0, stream=agent_pb2.STDOUT, offset=first[19].offset)
                ],
            )
        )
        assert [ln.text for ln in rest] == [f"out 0 {i}" for i in range(20, 50)]

        assert "job-1" in [job.job_id for job in client.list()]
        info = client.info()
        assert info.hostname and info.free_port > 0


def test_errors_are_typed(node: Agent, tmp_path: Path) -> None:
    script = write(tmp_path, "sleep.py", SLEEPER)
    with AgentClient(node.address, timeout=5) as client:
        with pytest.raises(JobNotFound) as missing:
            client.poll("no-such-job")
        assert missing.value.code == "NOT_FOUND" and missing.value.address == node.address
        assert node.address in str(missing.value)
        with pytest.raises(InvalidArgument):
            client.start(spec("bad", script, nprocs=0))
        with pytest.raises(InvalidArgument):
            client.start(spec("../escape", script))
        client.start(spec("busy", script, nprocs=1))
        with pytest.raises(AlreadyExists):
            client.start(spec("busy", script, "other-arg", nprocs=1))
        with pytest.raises(InvalidArgument):
            client.kill("busy", signal="SIGNOPE")
        with pytest.raises(JobNotFound):
            list(client.stream("no-such-job"))
        client.kill("busy", timeout=1)


def test_dead_address_fails_fast_and_clearly() -> None:
    address = f"127.0.0.1:{closed_port()}"
    began = time.monotonic()
    with AgentClient(address, timeout=5) as client, pytest.raises(AgentUnavailable) as err:
        client.info()
    assert time.monotonic() - began < 5
    assert address in str(err.value) and "unreachable" in str(err.value)


def test_kill_wait_timeout_and_no_escalate(node: Agent, tmp_path: Path) -> None:
    script = write(tmp_path, "sleep.py", SLEEPER)
    with AgentClient(node.address, timeout=5) as client:
        client.start(spec("sleepy", script))
        with pytest.raises(AgentTimeout):
            client.wait("sleepy", timeout=0.3)
        # SIGUSR1 without escalation: delivered, the job runs on.
        ready = client.stream("sleepy", follow=True, contains="ready", timeout=30)
        assert {next(ready).local_rank, next(ready).local_rank} == {0, 1}
        ready.close()
        status = client.kill("sleepy", signal="SIGUSR1", escalate=False)
        assert status.state == agent_pb2.RUNNING
        with client.stream("sleepy", follow=True, contains="SIGUSR1", timeout=30) as got:
            assert {next(got).local_rank, next(got).local_rank} == {0, 1}
        assert client.poll("sleepy").state == agent_pb2.RUNNING

        final = client.kill("sleepy", timeout=2)
        assert final.state == agent_pb2.KILLED
        assert {r.state for r in final.ranks} == {agent_pb2.RANK_TERMINATED}
        assert client.wait("sleepy", timeout=10).state == agent_pb2.KILLED
        again = client.kill("sleepy")  # idempotent on an ended job
        assert again.state == agent_pb2.KILLED


@pytest.mark.timeout(90)
def test_stream_reconnects_after_cut_connections(node: Agent, tmp_path: Path) -> None:
    """A follow stream survives broken connections: every line once, in order."""
    n = 20_000
    gate = tmp_path / "gate"
    script = write(tmp_path, "gated.py", GATED)
    proxy = Proxy(node.address)
    try:
        with AgentClient(proxy.address, timeout=5) as client:
            client.start(spec("cut", script, str(n), str(gate), nprocs=1))
            stream = client.stream("cut", follow=True, streams=["stdout"], timeout=60)
            texts = []
            cuts = 0
            for line in stream:
                texts.append(line.text)
                # cut each new connection once: lines already in flight still arrive,
                # then UNAVAILABLE and a reconnect from the cursors
                if cuts < 5 and len(texts) >= 1000 * (cuts + 1) and proxy.accepted == cuts + 1:
                    proxy.cut()
                    cuts += 1
                if len(texts) == n // 2 + 1:
                    gate.touch()  # the rank waited here: the rest comes after the cuts
            assert texts == [f"line {i}" for i in range(n)]
            assert stream.final is not None and stream.final.state == agent_pb2.SUCCEEDED
            assert cuts == 5 and proxy.accepted == 6  # five cuts, five reconnects
            # what the client merged is exactly what the rank's file holds
            path = client.poll("cut").ranks[0].stdout_path
            assert texts == Path(path).read_text().splitlines()
    finally:
        proxy.close()


def test_clock_offset_from_real_round_trips(node: Agent) -> None:
    with AgentClient(node.address) as client:
        assert client.clock.best is None
        for _ in range(5):
            client.info()
        best = client.clock.best
        assert best is not None and client.clock.samples == 5
        # Same host, same clock: the offset is within the measured uncertainty (+ slack).
        assert abs(best.offset) <= best.uncertainty + 0.05
        assert 0 <= best.rtt < 1.0


async def test_async_client_paths(node: Agent, tmp_path: Path) -> None:
    script = write(tmp_path, "lines.py", LINES)
    sleeper = write(tmp_path, "sleep.py", SLEEPER)
    async with AsyncAgentClient(node.address, timeout=5) as client:
        started = await client.start(spec("a-job", script, "20"))
        assert started.created
        texts = []
        async with client.stream("a-job", follow=True, streams=["stdout"], timeout=30) as s:
            async for line in s:
                texts.append((line.local_rank, line.text))
        assert s.final.state == agent_pb2.SUCCEEDED
        assert sorted(texts) == sorted((r, f"out {r} {i}") for r in range(2) for i in range(20))
        assert (await client.wait("a-job", timeout=10)).state == agent_pb2.SUCCEEDED
        assert (await client.poll("a-job")).state == agent_pb2.SUCCEEDED
        assert "a-job" in [j.job_id for j in await client.list()]
        assert (await client.info()).free_port > 0
        assert client.clock.best is not None

        await client.start(spec("a-sleep", sleeper, nprocs=1))
        with pytest.raises(AgentTimeout):
            await client.wait("a-sleep", timeout=0.3)
        killed = await client.kill("a-sleep", timeout=1)
        assert killed.state == agent_pb2.KILLED
        with pytest.raises(JobNotFound):
            await client.poll("nope")

    dead = AsyncAgentClient(f"127.0.0.1:{closed_port()}", timeout=5)
    with pytest.raises(AgentUnavailable):
        await dead.info()
    await dead.close()


def test_wait_for_helper_times_out() -> None:
    with pytest.raises(AssertionError, match="never"):
        wait_until(lambda: False, timeout=0.05, what="never")


def test_bearer_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = "0123456789abcdef0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    agent = start_agent(tmp_path / "logs", "--token-file", str(token_file))
    try:
        with AgentClient(agent.address, timeout=5) as anonymous, pytest.raises(AgentError) as err:
            anonymous.info()
        assert err.value.code == "UNAUTHENTICATED"
        with AgentClient(agent.address, timeout=5, token=token) as client:
            assert client.info().free_port > 0
        assert main(["status", "--nodes", agent.address], environ={}) == 3  # refused
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        argv = ["status", "--nodes", agent.address, "--token-file", str(token_file)]
        assert main(argv, environ={}) == 0
        assert capsys.readouterr().out.startswith("JOB ")
    finally:
        agent.stop()
