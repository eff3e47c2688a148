"""The gRPC service on a real `rankd-agent` process: every RPC, every error code."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.agents import Agent, start_agent
from helpers.wait import wait_until

from rankd.v1 import agent_pb2 as pb

PY = sys.executable


def spec(job_id: str, nprocs: int, *args: str, **kw: object) -> pb.JobSpec:
    return pb.JobSpec(job_id=job_id, nprocs=nprocs, entrypoint=PY, args=list(args), **kw)


def start(agent: Agent, s: pb.JobSpec) -> pb.StartResponse:
    return agent.stub.Start(pb.StartRequest(spec=s), timeout=10)


def poll(agent: Agent, job_id: str) -> pb.JobStatus:
    return agent.stub.Poll(pb.PollRequest(job_id=job_id), timeout=5).job


def wait_state(agent: Agent, job_id: str, timeout: float = 15.0) -> pb.JobStatus:
    """The status once the job has ended: every rank exited (end_time is set). Its state
    turns FAILED earlier, at the first failure, while the agent still stops the others."""
    wait_until(lambda: poll(agent, job_id).end_time > 0, timeout, f"{job_id} to end")
    return poll(agent, job_id)


def read_stream(
    agent: Agent, **request: object
) -> tuple[list[pb.LogLine], list[pb.StreamResponse]]:
    msgs = list(agent.stub.Stream(pb.StreamRequest(**request), timeout=30))
    return [ln for m in msgs for ln in m.lines], msgs


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def test_start_poll_stream_list_info(agent: Agent, script: Callable[[str, str], str]) -> None:
    worker = script(
        "w.py",
        "import os, sys\n"
        "r = os.environ['LOCAL_RANK']\n"
        "print('out', r, os.environ['COMMON'], os.environ.get('ONLY'), sys.argv[1:], flush=True)\n"
        "print('err', r, file=sys.stderr)\n",
    )
    s = spec("job-1", 2, worker, "a", env={"COMMON": "c"})
    s.rank_args[1].args.append("b")
    s.rank_env[1].env["ONLY"] = "one"
    resp = start(agent, s)
    assert resp.created
    assert [r.local_rank for r in resp.job.ranks] == [0, 1]
    assert all(r.pid > 0 for r in resp.job.ranks)
    assert resp.job.attempt_dir.startswith(str(agent.log_dir))
    assert os.path.basename(resp.job.run_dir).startswith("job-1_")

    status = wait_state(agent, "job-1")
    assert status.state == pb.SUCCEEDED
    assert [r.exit_code for r in status.ranks] == [0, 0]
    assert [r.state for r in status.ranks] == [pb.RANK_SUCCEEDED] * 2
    assert all(r.end_time >= r.start_time > 0 for r in status.ranks)
    assert all(r.last_output_time > 0 and r.stdout_bytes > 0 for r in status.ranks)

    lines, msgs = read_stream(agent, job_id="job-1", follow=True)
    got = sorted((ln.local_rank, ln.stream, ln.prefix, ln.text) for ln in lines)
    assert got == [
        (0, pb.STDOUT, "[default0]:", "out 0 c None ['a']"),
        (0, pb.STDERR, "[default0]:", "err 0"),
        (1, pb.STDOUT, "[default1]:", "out 1 c one ['a', 'b']"),
        (1, pb.STDERR, "[default1]:", "err 1"),
    ]
    assert msgs[-1].end and msgs[-1].job.state == pb.SUCCEEDED
    assert sum(1 for m in msgs if m.end) == 1

    only_err, _ = read_stream(agent, job_id="job-1", streams=[pb.STDERR], ranks=[1])
    assert [(ln.local_rank, ln.text) for ln in only_err] == [(1, "err 1")]
    matched, _ = read_stream(agent, job_id="job-1", regex=r"^out \d c one")
    assert [ln.text for ln in matched] == ["out 1 c one ['a', 'b']"]
    matched, _ = read_stream(agent, job_id="job-1", contains="err")
    assert sorted(ln.text for ln in matched) == ["err 0", "err 1"]

    listed = agent.stub.List(pb.ListRequest(), timeout=5).jobs
    assert [j.job_id for j in listed] == ["job-1"]
    info = agent.stub.Info(pb.InfoRequest(), timeout=5)
    assert info.pid == agent.proc.pid and info.log_dir == str(agent.log_dir)
    assert 0 < info.free_port < 65536 and abs(info.agent_time - time.time()) < 5


def test_prefix_template_and_rank_offset(agent: Agent) -> None:
    s = spec(
        "tpl",
        2,
        "-c",
        "print('hi')",
        log_line_prefix_template="[${role_name}:${rank}/${local_rank}] ",
        rank_offset=4,
        role_name="trainer",
    )
    start(agent, s)
    lines, _ = read_stream(agent, job_id="tpl", follow=True)
    assert sorted(ln.prefix + ln.text for ln in lines) == ["[trainer:4/0] hi", "[trainer:5/1] hi"]


def test_poll_reports_usage_of_live_ranks(agent: Agent) -> None:
    start(agent, spec("busy", 1, "-c", "import time\nwhile True: sum(range(10000))"))
    try:
        wait_until(lambda: poll(agent, "busy").ranks[0].cpu_seconds > 0.05, 10, "cpu use")
        rank = poll(agent, "busy").ranks[0]
        assert rank.state == pb.RANK_RUNNING
        assert rank.rss_bytes > 1_000_000
        assert not rank.HasField("exit_code")
    finally:
        agent.stub.Kill(pb.KillRequest(job_id="busy", timeout=5), timeout=15)


def test_errors_are_clear_status_codes(agent: Agent, tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program")
    plain.chmod(0o644)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 not an executable format")
    garbage.chmod(0o755)
    cases = [
        (spec("bad", 0, "-c", "pass"), "nprocs must be between 1"),
        (spec("../etc", 1, "-c", "pass"), "invalid job id"),
        (spec("a/b", 1, "-c", "pass"), "invalid job id"),
        (pb.JobSpec(job_id="x", nprocs=1, entrypoint="/no/such/binary"), "does not exist"),
        (pb.JobSpec(job_id="x", nprocs=1, entrypoint=str(plain)), "not executable"),
        (pb.JobSpec(job_id="x", nprocs=2, entrypoint=str(garbage)), "Exec format error"),
        (spec("x", 2, redirects="0:9"), "does not match"),
        (spec("x", 2, tee="banana"), "does not match"),
        (spec("x", 1, env={"A=B": "1"}), "invalid environment variable name"),
        (spec("x", 1, cwd="/no/such/dir"), "does not exist"),
        (spec("x", 1, log_line_prefix_template="${nope}"), "unknown placeholder"),
    ]
    for bad, needle in cases:
        code, details = code_of(lambda b=bad: start(agent, b))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, details)
        assert needle in details, (needle, details)
    assert agent.stub.List(pb.ListRequest(), timeout=5).jobs == []
    assert list(agent.log_dir.iterdir()) == []  # nothing started, nothing written

    for call in (
        lambda: agent.stub.Poll(pb.PollRequest(job_id="ghost"), timeout=5),
        lambda: agent.stub.Kill(pb.KillRequest(job_id="ghost"), timeout=5),
        lambda: list(agent.stub.Stream(pb.StreamRequest(job_id="ghost"), timeout=5)),
    ):
        code, details = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "ghost" in details

    start(agent, spec("sleepy", 1, "-c", "import time; time.sleep(60)"))
    code, details = code_of(lambda: start(agent, spec("sleepy", 1, "-c", "pass")))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "different spec" in details
    code, details = code_of(
        lambda: agent.stub.Kill(pb.KillRequest(job_id="sleepy", signal="SIGNOPE"), timeout=5)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown signal" in details
    code, details = code_of(
        lambda: list(agent.stub.Stream(pb.StreamRequest(job_id="sleepy", regex="("), timeout=5))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid regex" in details
    code, details = code_of(
        lambda: list(agent.stub.Stream(pb.StreamRequest(job_id="sleepy", ranks=[3]), timeout=5))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in details
    agent.stub.Kill(pb.KillRequest(job_id="sleepy", signal="KILL"), timeout=10)


def test_start_is_idempotent_and_starts_next_attempt(agent: Agent) -> None:
    s = spec("idem", 2, "-c", "import time; time.sleep(60)")
    first = start(agent, s)
    again = start(agent, s)
    assert first.created and not again.created
    assert [r.pid for r in first.job.ranks] == [r.pid for r in again.job.ranks]
    code, details = code_of(lambda: start(agent, spec("idem", 2, "-c", "pass", restart_count=1)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "still running" in details

    killed = agent.stub.Kill(pb.KillRequest(job_id="idem", timeout=5), timeout=15).job
    assert killed.state == pb.KILLED
    assert [r.exit_code for r in killed.ranks] == [-signal.SIGTERM] * 2
    assert all(r.state == pb.RANK_TERMINATED for r in killed.ranks)
    assert all(f.terminated_by_agent for f in killed.failures)
    for pid in (r.pid for r in first.job.ranks):
        assert not psutil.pid_exists(pid)

    again = agent.stub.Kill(pb.KillRequest(job_id="idem"), timeout=5).job  # no-op when ended
    assert again.state == pb.KILLED and again.end_time == killed.end_time

    nxt = start(agent, spec("idem", 2, "-c", "print('attempt 1')", restart_count=1))
    assert nxt.created and nxt.job.restart_count == 1
    assert nxt.job.attempt_dir.endswith("attempt_1")
    assert os.path.isdir(killed.attempt_dir)  # attempt_0 kept
    assert wait_state(agent, "idem").state == pb.SUCCEEDED
    old, _ = read_stream(agent, job_id="idem", restart_count=0)
    assert old == []
    new, _ = read_stream(agent, job_id="idem")
    assert [ln.text for ln in new] == ["attempt 1", "attempt 1"]


def test_failure_fields_and_fail_fast(agent: Agent, script: Callable[[str, str], str]) -> None:
    worker = script(
        "f.py",
        "import os, sys, time\n"
        "if os.environ['LOCAL_RANK'] == '1':\n"
        "    print('about to fail', file=sys.stderr, flush=True)\n"
        "    sys.exit(7)\n"
        "time.sleep(60)\n",
    )
    start(agent, spec("ff", 3, worker, kill_timeout=5))
    status = wait_state(agent, "ff")
    assert status.state == pb.FAILED
    assert "local rank 1 failed" in status.reason
    root = status.failures[0]
    assert (root.local_rank, root.exit_code, root.terminated_by_agent) == (1, 7, False)
    assert root.stderr_tail == ["about to fail"]
    assert root.error_file == "<N/A>"
    others = status.failures[1:]
    assert sorted(f.local_rank for f in others) == [0, 2]
    assert all(f.terminated_by_agent and f.signal_name == "SIGTERM" for f in others)
    assert all(f.timestamp >= root.timestamp for f in others)


def test_kill_without_escalation_forwards_signal(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    worker = script(
        "usr1.py",
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: print('preempted', flush=True))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n",
    )
    start(agent, spec("usr1", 2, worker))
    wait_until(lambda: len(read_stream(agent, job_id="usr1")[0]) == 2, 10, "ready lines")
    job = agent.stub.Kill(
        pb.KillRequest(job_id="usr1", signal="SIGUSR1", no_escalate=True), timeout=5
    ).job
    assert job.state == pb.RUNNING
    wait_until(lambda: len(read_stream(agent, job_id="usr1", contains="preempted")[0]) == 2, 10)
    assert poll(agent, "usr1").state == pb.RUNNING
    agent.stub.Kill(pb.KillRequest(job_id="usr1", signal="15", timeout=5), timeout=15)


def test_kill_escalates_to_sigkill(agent: Agent, script: Callable[[str, str], str]) -> None:
    worker = script(
        "stubborn.py",
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n",
    )
    start(agent, spec("stubborn", 2, worker))
    wait_until(lambda: len(read_stream(agent, job_id="stubborn")[0]) == 2, 10, "ready lines")
    job = agent.stub.Kill(pb.KillRequest(job_id="stubborn", timeout=0.3), timeout=15).job
    assert job.state == pb.KILLED
    assert [r.exit_code for r in job.ranks] == [-signal.SIGKILL] * 2


@pytest.fixture(params=["auto", "poll"], ids=["inotify", "poll"])
def follower(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Agent]:
    """An agent that follows logs with inotify, or by polling (`--log-follow poll`)."""
    handle = start_agent(tmp_path / "follower-logs", "--log-follow", request.param)
    try:
        mode = handle.stub.Info(pb.InfoRequest(), timeout=5).log_follow
        assert mode == ("inotify" if request.param == "auto" else "poll")
        yield handle
    finally:
        handle.stop()


def test_stream_resume_after_cut_is_exact(
    follower: Agent, script: Callable[[str, str], str]
) -> None:
    agent = follower
    n = 60_000
    worker = script(
        "flood.py",
        "import os, sys\n"
        "r = os.environ['LOCAL_RANK']\n"
        f"sys.stdout.writelines(f'r{{r}} line {{i}}\\n' for i in range({n}))\n",
    )
    start(agent, spec("flood", 2, worker))
    seen: dict[tuple[int, int], list[str]] = {}
    cursors: dict[tuple[int, int], int] = {}
    ended = False
    cuts = 0
    while not ended:
        request = pb.StreamRequest(
            job_id="flood",
            follow=True,
            resume=[pb.Cursor(local_rank=r, stream=s, offset=o) for (r, s), o in cursors.items()],
        )
        call = agent.stub.Stream(request, timeout=60)
        got = 0
        for msg in call:
            for ln in msg.lines:
                seen.setdefault((ln.local_rank, ln.stream), []).append(ln.text)
                cursors[(ln.local_rank, ln.stream)] = ln.offset
            got += len(msg.lines)
            if msg.end:
                ended = True
            elif cuts < 5 and got > 15_000:
                call.cancel()  # cut the connection mid-stream
                cuts += 1
                break
    assert cuts == 5
    for r in (0, 1):
        assert seen[(r, pb.STDOUT)] == [f"r{r} line {i}" for i in range(n)]


def test_concurrent_streams_and_a_stalled_reader(
    follower: Agent, script: Callable[[str, str], str]
) -> None:
    agent = follower
    n = 50_000
    worker = script(
        "talk.py",
        "import os, sys\n"
        "r = os.environ['LOCAL_RANK']\n"
        f"sys.stdout.writelines(f'{{r}}:{{i}}' + 'x' * 80 + '\\n' for i in range({n}))\n",
    )
    start(agent, spec("talk", 2, worker))
    # A client that opens a follow stream and never reads: gRPC flow control holds it.
    stalled = agent.stub.Stream(pb.StreamRequest(job_id="talk", follow=True), timeout=60)
    first = next(stalled)
    assert first.lines
    results = []
    for _ in range(2):
        lines, msgs = read_stream(agent, job_id="talk", follow=True)
        results.append(lines)
        assert msgs[-1].end
    for lines in results:
        for r in (0, 1):
            texts = [ln.text.split("x")[0] for ln in lines if ln.local_rank == r]
            assert texts == [f"{r}:{i}" for i in range(n)]
    assert poll(agent, "talk").state == pb.SUCCEEDED
    stalled.cancel()


def test_agent_sigterm_kills_running_jobs(
    tmp_path: Path, script: Callable[[str, str], str]
) -> None:
    handle = start_agent(tmp_path / "logs2", "--shutdown-timeout", "2")
    try:
        worker = script(
            "tree.py",
            "import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
            " start_new_session=True)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
        )
        resp = handle.stub.Start(pb.StartRequest(spec=spec("tree", 2, worker)), timeout=10)
        pids = [r.pid for r in resp.job.ranks]

        def printed() -> list[int]:
            msgs = handle.stub.Stream(pb.StreamRequest(job_id="tree"), timeout=5)
            return [int(ln.text) for m in msgs for ln in m.lines]

        wait_until(lambda: len(printed()) == 2, 10, "grandchild pids")
        grandchildren = printed()
        assert handle.stop(signal.SIGTERM, timeout=20) == -signal.SIGTERM  # ended by it
        for pid in pids + grandchildren:
            wait_until(lambda p=pid: not _alive(p), 5, f"pid {pid} to be gone")
    finally:
        if handle.proc.poll() is None:
            handle.proc.kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_health_and_reflection(agent: Agent) -> None:
    health = health_pb2_grpc.HealthStub(agent.channel)
    for service in ("", "rankd.v1.NodeAgent"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(agent.channel)
    answers = list(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"rankd.v1.NodeAgent", "grpc.health.v1.Health"} <= names
