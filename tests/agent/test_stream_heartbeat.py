"""A follow Stream's heartbeats on a real `rankd-agent`: empty messages while the job is
quiet, counted from the stream's own last message (not from other ranks' writes), through
filters too; a bad interval is INVALID_ARGUMENT. Start and Kill answers carry the
agent's clock."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from helpers.agents import Agent

from rankd.client import AgentClient
from rankd.v1 import agent_pb2 as pb

PY = sys.executable

# Rank 0 prints one line, then is silent for argv[1] s; rank 1 (if any) writes a line
# every 10 ms meanwhile.
QUIET_RANK0 = """\
import os, sys, time
rank = int(os.environ["LOCAL_RANK"])
end = time.time() + float(sys.argv[1])
if rank == 0:
    print("hello", flush=True)
    time.sleep(float(sys.argv[1]))
else:
    while time.time() < end:
        print("busy", flush=True)
        time.sleep(0.01)
"""


def _start(agent: Agent, job_id: str, nprocs: int, path: str, quiet: float) -> None:
    spec = pb.JobSpec(job_id=job_id, nprocs=nprocs, entrypoint=PY, args=[path, str(quiet)])
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)


def _follow(agent: Agent, job_id: str, **request: Any) -> list[tuple[float, pb.StreamResponse]]:
    """Every message of a follow stream with its arrival time."""
    call = agent.stub.Stream(pb.StreamRequest(job_id=job_id, follow=True, **request), timeout=30)
    return [(time.monotonic(), msg) for msg in call]


def _beats(messages: list[tuple[float, pb.StreamResponse]]) -> list[float]:
    return [t for t, m in messages if not m.lines and not m.blocks and not m.end]


@pytest.mark.timeout(60)
def test_a_quiet_job_gets_heartbeats_and_its_lines_and_end_as_before(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    _start(agent, "quiet", 1, script("quiet.py", QUIET_RANK0), 1.5)
    messages = _follow(agent, "quiet", heartbeat=0.2, packed=True)
    beats = _beats(messages)
    # 1.5 s of silence at 0.2 s: about 7 beats (a loaded machine may send fewer)
    assert len(beats) >= 3, len(beats)
    data = b"".join(b.data for _, m in messages for b in m.blocks)
    assert data == b"hello\n"
    assert messages[-1][1].end and messages[-1][1].job.state == pb.SUCCEEDED
    # without a heartbeat, none: the stream is as it always was
    plain = _follow(agent, "quiet", packed=True)
    assert _beats(plain) == [] and plain[-1][1].end


@pytest.mark.timeout(60)
def test_heartbeats_count_from_the_streams_own_last_message(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    # rank 1 writes every 10 ms and wakes every reader of the attempt; a stream of
    # rank 0 alone gets nothing from it, so it must still beat
    _start(agent, "busy", 2, script("busy.py", QUIET_RANK0), 1.5)
    messages = _follow(agent, "busy", ranks=[0], heartbeat=0.2)
    assert len(_beats(messages)) >= 3
    assert [line.text for _, m in messages for line in m.lines] == ["hello"]


@pytest.mark.timeout(60)
def test_heartbeats_pass_a_filter_that_matches_nothing(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    _start(agent, "filtered", 1, script("quiet.py", QUIET_RANK0), 1.0)
    messages = _follow(agent, "filtered", regex="^never$", heartbeat=0.2)
    assert len(_beats(messages)) >= 2
    assert not any(m.lines for _, m in messages) and messages[-1][1].end


@pytest.mark.timeout(30)
@pytest.mark.parametrize("heartbeat", [0.01, 5000.0, float("nan"), -1.0])
def test_a_bad_heartbeat_is_invalid_argument(
    agent: Agent, script: Callable[[str, str], str], heartbeat: float
) -> None:
    _start(agent, f"bad{heartbeat}", 1, script("quiet.py", QUIET_RANK0), 0.1)
    with pytest.raises(grpc.RpcError) as err:
        _follow(agent, f"bad{heartbeat}", heartbeat=heartbeat)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "heartbeat" in (err.value.details() or "")


@pytest.mark.timeout(30)
def test_start_and_kill_answers_are_clock_samples(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    before = time.time()
    spec = pb.JobSpec(
        job_id="clock", nprocs=1, entrypoint=PY, args=[script("q.py", QUIET_RANK0), "30"]
    )
    with AgentClient(agent.address) as client:
        client.start(spec)
        assert client.clock.samples == 1
        sample = client.clock.best
        assert sample is not None and abs(sample.offset) < 1.0  # one machine: one clock
        client.kill("clock", timeout=5)
        assert client.clock.samples == 2
    answer = agent.stub.Kill(pb.KillRequest(job_id="clock"), timeout=10)
    assert before <= answer.agent_time <= time.time()
