"""The Watch RPC on a real `rankd-agent`: the status at once, then each change, folded,
versioned; until_ended; heartbeats and resource refreshes; errors; the agent's gauge."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers.agents import Agent
from helpers.workers import GATED

from rankd.client import AgentClient, AsyncAgentClient, JobNotFound
from rankd.v1 import agent_pb2 as pb

PY = sys.executable


# Each rank exits (with argv[2], default 0) once the file "<argv[1]>-<LOCAL_RANK>" exists.
def start(agent: Agent, job_id: str, nprocs: int, entrypoint: str, *args: str) -> None:
    spec = pb.JobSpec(job_id=job_id, nprocs=nprocs, entrypoint=entrypoint, args=list(args))
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)


def watch(agent: Agent, job_id: str, **request: Any) -> Any:
    """A Watch call: an iterator of WatchResponse with code() and cancel()."""
    return agent.stub.Watch(pb.WatchRequest(job_id=job_id, **request), timeout=30)


def states(msg: pb.WatchResponse) -> list[int]:
    return [r.state for r in msg.job.ranks]


def next_change(call: Any, seen: pb.WatchResponse) -> pb.WatchResponse:
    """The next message whose ranks or job state differ from `seen` (resource refreshes
    resend the same state with the same version)."""
    for msg in call:
        if not msg.HasField("job"):
            continue
        if msg.version == seen.version:
            assert states(msg) == states(seen) and msg.job.state == seen.job.state
            continue
        return msg
    raise AssertionError("the watch ended before the change")


@pytest.mark.timeout(60)
def test_status_at_once_then_every_change_with_increasing_versions(
    agent: Agent, script: Callable[[str, str], str], tmp_path: Path
) -> None:
    gate = str(tmp_path / "go")
    start(agent, "steps", 2, PY, script("gated.py", GATED), gate)
    call = watch(agent, "steps", until_ended=True)
    first = next(call)
    assert first.HasField("job") and not first.ended
    assert first.job.job_id == "steps" and first.job.state == pb.RUNNING
    assert states(first) == [pb.RANK_RUNNING] * 2
    assert first.agent_time == pytest.approx(time.time(), abs=5)

    Path(f"{gate}-0").touch()
    one_done = next_change(call, first)
    assert one_done.version > first.version
    assert states(one_done) == [pb.RANK_SUCCEEDED, pb.RANK_RUNNING]
    assert one_done.job.ranks[0].exit_code == 0 and not one_done.ended

    Path(f"{gate}-1").touch()
    final = next_change(call, one_done)
    assert final.version > one_done.version
    assert final.ended and final.job.state == pb.SUCCEEDED
    assert states(final) == [pb.RANK_SUCCEEDED] * 2
    assert list(call) == []  # until_ended: nothing after the final state
    assert call.code() == grpc.StatusCode.OK

    # An ended job: one message, the final state, then the end.
    (again,) = list(watch(agent, "steps", until_ended=True))
    assert again.ended and again.job.state == pb.SUCCEEDED and again.version == final.version


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outcome", ["SUCCEEDED", "FAILED", "KILLED"])
def test_until_ended_ends_with_the_final_state(
    agent: Agent, script: Callable[[str, str], str], tmp_path: Path, outcome: str
) -> None:
    gate = str(tmp_path / "go")
    code = "3" if outcome == "FAILED" else "0"
    start(agent, "fin", 2, PY, script("gated.py", GATED), gate, code)
    call = watch(agent, "fin", until_ended=True)
    first = next(call)
    assert first.job.state == pb.RUNNING
    if outcome == "KILLED":
        agent.stub.Kill(pb.KillRequest(job_id="fin", timeout=5), timeout=20)
    else:
        for rank in (0, 1):
            Path(f"{gate}-{rank}").touch()
    msgs = [first, *call]
    assert call.code() == grpc.StatusCode.OK
    final = msgs[-1]
    assert final.ended and pb.JobState.Name(final.job.state) == outcome
    assert all(r.HasField("exit_code") for r in final.job.ranks)
    assert not any(m.ended for m in msgs[:-1])
    versions = [m.version for m in msgs if m.HasField("job")]
    assert versions == sorted(versions)
    if outcome == "FAILED":
        assert final.job.failures and final.job.failures[0].exit_code == 3


@pytest.mark.timeout(60)
def test_a_32_rank_kill_is_folded_into_few_messages(agent: Agent) -> None:
    start(agent, "wide", 32, "/bin/sleep", "60")
    call = watch(agent, "wide", until_ended=True)
    first = next(call)
    assert states(first) == [pb.RANK_RUNNING] * 32
    agent.stub.Kill(pb.KillRequest(job_id="wide", timeout=5), timeout=20)
    after = list(call)
    assert call.code() == grpc.StatusCode.OK
    # The state changes, then 32 ranks exit (reaped in a few batches, a version each);
    # consecutive changes are folded.
    exited = [sum(r.HasField("exit_code") for r in m.job.ranks) for m in after]
    assert 1 <= len(after) <= 16, f"exits seen per message: {exited}"
    assert exited == sorted(exited)
    final = after[-1]
    assert final.ended and final.job.state == pb.KILLED
    assert states(final) == [pb.RANK_TERMINATED] * 32
    assert final.version >= first.version + 2


@pytest.mark.timeout(30)
def test_unknown_job_and_bad_requests(agent: Agent) -> None:
    with pytest.raises(grpc.RpcError) as err:
        next(watch(agent, "no-such-job"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "no-such-job" in err.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as err:
        next(watch(agent, "../etc"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    start(agent, "hb", 1, "/bin/sleep", "60")
    for heartbeat in (0.001, -1.0, float("nan"), 1e9):
        with pytest.raises(grpc.RpcError) as err:
            next(watch(agent, "hb", heartbeat=heartbeat))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "heartbeat" in err.value.details()  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_heartbeats_and_resource_refreshes_while_ranks_run(agent: Agent) -> None:
    start(agent, "hb", 1, "/bin/sleep", "60")
    call = agent.stub.Watch(pb.WatchRequest(job_id="hb", heartbeat=0.2), timeout=15)
    first = next(call)
    heartbeats, refreshes = 0, []
    for msg in call:
        assert msg.version == first.version  # nothing changed
        if msg.HasField("job"):
            refreshes.append(msg)
        else:
            heartbeats += 1
        if heartbeats >= 3 and len(refreshes) >= 2:
            break
    call.cancel()
    assert all(m.job.ranks[0].rss_bytes > 0 for m in refreshes)
    gap = refreshes[1].agent_time - refreshes[0].agent_time
    assert 0.9 <= gap < 5, gap  # at most once per second

    # Ended and without heartbeats: nothing more is sent (no timer runs).
    agent.stub.Kill(pb.KillRequest(job_id="hb", timeout=5), timeout=20)
    quiet = agent.stub.Watch(pb.WatchRequest(job_id="hb"), timeout=1.5)
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for msg in quiet:
            got.append(msg)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert len(got) == 1 and got[0].ended


@pytest.mark.timeout(60)
def test_a_new_attempt_is_pushed_to_a_watch(
    agent: Agent, script: Callable[[str, str], str], tmp_path: Path
) -> None:
    gate = str(tmp_path / "go")
    worker = script("gated.py", GATED)
    start(agent, "again", 1, PY, worker, gate)
    call = watch(agent, "again")
    first = next(call)
    Path(f"{gate}-0").touch()
    ended = next_change(call, first)
    assert ended.ended and ended.job.restart_count == 0
    spec = pb.JobSpec(job_id="again", nprocs=1, entrypoint=PY, args=[worker, gate])
    spec.restart_count = 1
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    restarted = next_change(call, ended)
    assert restarted.job.restart_count == 1 and not restarted.ended
    call.cancel()


@pytest.mark.timeout(60)
def test_agent_clients_watch(
    agent: Agent, script: Callable[[str, str], str], tmp_path: Path
) -> None:
    gate = str(tmp_path / "go")
    start(agent, "cw", 1, PY, script("gated.py", GATED), gate)
    with AgentClient(agent.address) as client:
        with client.watch("cw", until_ended=True) as updates:
            first = next(updates)
            assert first.job.state == pb.RUNNING
            Path(f"{gate}-0").touch()
            rest = list(updates)
        assert rest[-1].ended and rest[-1].job.state == pb.SUCCEEDED
        with pytest.raises(JobNotFound, match="no-job"):
            next(client.watch("no-job"))
        watching = client.watch("cw")
        next(watching)
        watching.close()
        assert list(watching) == []


@pytest.mark.timeout(60)
async def test_async_agent_clients_watch(agent: Agent) -> None:
    start(agent, "aw", 1, "/bin/sleep", "60")
    async with AsyncAgentClient(agent.address) as client:
        async with client.watch("aw", until_ended=True) as updates:
            first = await anext(updates)
            assert first.job.state == pb.RUNNING
            killed = await client.kill("aw", timeout=5)
            msgs = [m async for m in updates]
        assert msgs[-1].ended and msgs[-1].job.state == pb.KILLED
        assert msgs[-1].job.ranks[0].exit_code == killed.ranks[0].exit_code
        with pytest.raises(JobNotFound):
            await anext(client.watch("nothing-here"))
