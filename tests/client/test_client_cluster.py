"""Cluster.launch across real agents on loopback: env, prefixes, fail-fast, report,
restarts, output routing, dead nodes, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers.agents import ENV_DUMP, PYTHON, Agent, agents, closed_port
from helpers.wait import wait_until

from rankd.client import (
    AgentClient,
    AgentUnavailable,
    AsyncCluster,
    Cluster,
    ClusterError,
    JobFailed,
    JobNotFound,
    OutputLine,
)
from rankd.client.report import fold
from rankd.v1 import agent_pb2

TORCHRUN_KEYS = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "OMP_NUM_THREADS",
    "TORCHELASTIC_ERROR_FILE",
    "USER_VAR",
]

# Rank 3 fails with a torch-style error file; every other rank sleeps and ignores
# SIGTERM, so stopping it needs the SIGKILL escalation.
FAIL_ONE = """\
import json, os, signal, sys, time
rank = int(os.environ["RANK"])
ready = sys.argv[3] if len(sys.argv) > 3 else None  # a dir: fail once the others are set
if rank == int(sys.argv[1]):
    others = int(os.environ["WORLD_SIZE"]) - 1
    deadline = time.monotonic() + 20
    while ready and len(os.listdir(ready)) < others and time.monotonic() < deadline:
        time.sleep(0.01)
    trace = ('Traceback (most recent call last):\\n  File "train.py", line 9, in step\\n'
             'ValueError: bad batch 42')
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        json.dump({"message": {"message": "ValueError: bad batch 42",
                   "extraInfo": {"py_callstack": trace, "timestamp": str(int(time.time()))}}}, f)
    print("about to fail", file=sys.stderr, flush=True)
    sys.exit(1)
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if ready:
    open(os.path.join(ready, str(rank)), "w").close()
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

READY_THEN_SLEEP = """\
import time
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

RESTART = """\
import os, sys, time
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
if attempt == "0":
    if os.environ["RANK"] == "2":
        sys.exit(5)
    while True:
        time.sleep(0.05)
print(f"attempt {attempt} rank {os.environ['RANK']} ok", flush=True)
"""

OUT_AND_ERR = """\
import os, sys
print("o", flush=True)
print("e", file=sys.stderr, flush=True)
"""


@pytest.fixture
def start_nodes(tmp_path: Path) -> Iterator[Callable[[int], list[Agent]]]:
    with contextlib.ExitStack() as stack:
        clusters = itertools.count()

        def start(count: int) -> list[Agent]:
            return stack.enter_context(agents(tmp_path / f"cluster{next(clusters)}", count))

        yield start


def write(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def collect() -> tuple[list[OutputLine], Callable[[OutputLine], None]]:
    lines: list[OutputLine] = []
    return lines, lines.append


@pytest.mark.parametrize("nnodes", [2, 4])
def test_env_and_prefixes_of_every_rank(
    nnodes: int, start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(nnodes)
    script = write(tmp_path, "env.py", ENV_DUMP)
    nproc = 2
    world = nnodes * nproc
    lines, on_line = collect()
    with Cluster([a.address for a in nodes], timeout=5) as cluster:
        result = cluster.launch(
            [PYTHON, script, ",".join(TORCHRUN_KEYS)],
            nproc_per_node=nproc,
            run_id=f"env-{nnodes}",
            max_restarts=2,
            env={"USER_VAR": "hello"},
            on_line=on_line,
        )
    assert result.job_id == f"env-{nnodes}" and result.restart_count == 0
    assert result.world_size == world
    assert all(s.state == agent_pb2.SUCCEEDED for s in result.statuses)

    envs = {}
    for line in lines:
        if line.stream == "stdout" and line.text.startswith("ENV "):
            env = json.loads(line.text[4:])
            assert line.prefix == f"[default{line.global_rank}]:"
            assert env["RANK"] == str(line.global_rank)
            envs[line.global_rank] = env
    assert sorted(envs) == list(range(world))
    ports = {env["MASTER_PORT"] for env in envs.values()}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for rank, env in envs.items():
        node_rank, local_rank = divmod(rank, nproc)
        assert env["LOCAL_RANK"] == str(local_rank)
        assert env["WORLD_SIZE"] == str(world)
        assert env["LOCAL_WORLD_SIZE"] == str(nproc)
        assert env["GROUP_RANK"] == str(node_rank)
        assert env["GROUP_WORLD_SIZE"] == str(nnodes)
        assert env["ROLE_RANK"] == str(rank)
        assert env["ROLE_WORLD_SIZE"] == str(world)
        assert env["ROLE_NAME"] == "default"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["TORCHELASTIC_RUN_ID"] == f"env-{nnodes}"
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "2"
        assert env["OMP_NUM_THREADS"] == "1"
        assert env["USER_VAR"] == "hello"
        assert env["TORCHELASTIC_ERROR_FILE"].endswith(f"attempt_0/{local_rank}/error.json")
        assert str(nodes[node_rank].log_dir) in env["TORCHELASTIC_ERROR_FILE"]
    stderr_lines = sorted((ln.global_rank, ln.text) for ln in lines if ln.stream == "stderr")
    assert stderr_lines == [(r, f"to-stderr rank {r}") for r in range(world)]


def test_default_sink_writes_prefixed_lines_to_stdout_and_stderr(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "env.py", ENV_DUMP)
    out, err = io.StringIO(), io.StringIO()
    with Cluster([a.address for a in nodes]) as cluster:
        cluster.launch(
            [PYTHON, script, "RANK"],
            nproc_per_node=1,
            master_port=12345,
            master_addr="h0",
            stdout=out,
            stderr=err,
        )
    assert sorted(out.getvalue().splitlines()) == [
        '[default0]:ENV {"RANK": "0"}',
        '[default1]:ENV {"RANK": "1"}',
    ]
    assert sorted(err.getvalue().splitlines()) == [
        "[default0]:to-stderr rank 0",
        "[default1]:to-stderr rank 1",
    ]


@pytest.mark.timeout(60)
def test_fail_fast_report_and_escalation(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "fail.py", FAIL_ONE)
    ready = tmp_path / "ready"  # rank 3 fails only once the others ignore SIGTERM
    ready.mkdir()
    events: list[str] = []
    began = time.monotonic()
    with (
        Cluster([a.address for a in nodes], timeout=5) as cluster,
        pytest.raises(JobFailed) as failed,
    ):
        cluster.launch(
            [PYTHON, script, "3", "stubborn", str(ready)],
            nproc_per_node=2,
            run_id="failfast",
            kill_timeout=1.0,
            on_line=lambda line: None,
            on_event=events.append,
        )
    assert time.monotonic() - began < 30
    report = failed.value.report
    root = report.root_cause
    assert root is not None
    assert (root.global_rank, root.local_rank, root.node_rank) == (3, 1, 1)
    assert root.exit_code == 1 and not root.terminated
    assert "ValueError: bad batch 42" in root.traceback
    # Node 0's ranks ignored SIGTERM: stopped by SIGKILL after the grace time.
    node0 = [f for f in report.failures if f.node_rank == 0]
    assert sorted(f.global_rank for f in node0) == [0, 1]
    assert all(f.terminated and f.signal_name == "SIGKILL" for f in node0)
    assert {f.global_rank for f in report.terminated} == {0, 1, 2}
    text = str(failed.value)
    assert text == report.format()
    assert "rankd job failfast FAILED (attempt 0, 4 ranks on 2 nodes)" in text
    assert "rank      : 3 (local_rank: 1)" in text
    assert 'File "train.py", line 9, in step' in text
    assert "Terminated by rankd" in text
    assert any("stopping job failfast on every node" in e for e in events)
    for agent in nodes:
        wait_until(lambda a=agent: not a.workers(script), timeout=10, what="no worker left")


@pytest.mark.timeout(90)
def test_32_ranks_terminated_alike_fold_into_one_entry(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(4)
    script = write(tmp_path, "fail.py", FAIL_ONE)
    with (
        Cluster([a.address for a in nodes], timeout=10) as cluster,
        pytest.raises(JobFailed) as failed,
    ):
        cluster.launch(
            [PYTHON, script, "0", "polite"],
            nproc_per_node=8,
            kill_timeout=10,
            on_line=lambda line: None,
        )
    report = failed.value.report
    assert report.root_cause is not None and report.root_cause.global_rank == 0
    assert len(report.failures) == 32
    groups = fold(report.terminated)
    assert len(groups) == 1 and groups[0].ranks == list(range(1, 32))
    hosts = ", ".join(cluster.names)
    assert f"[1]: global ranks 1-31 ({hosts}): Signal 15 (SIGTERM)" in report.format()
    assert len(report.format().splitlines()) < 30


@pytest.mark.timeout(60)
def test_restart_after_failure_uses_a_new_attempt_dir(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "restart.py", RESTART)
    lines, on_line = collect()
    events: list[str] = []
    with Cluster([a.address for a in nodes], timeout=5) as cluster:
        result = cluster.launch(
            [PYTHON, script],
            nproc_per_node=2,
            run_id="again",
            max_restarts=1,
            kill_timeout=2,
            on_line=on_line,
            on_event=events.append,
        )
    assert result.restart_count == 1
    assert all(s.restart_count == 1 for s in result.statuses)
    assert sorted(ln.text for ln in lines) == [f"attempt 1 rank {r} ok" for r in range(4)]
    assert {ln.restart_count for ln in lines} == {1}
    assert any("attempt 0 failed" in e and "restart 1 of 1" in e for e in events)
    for agent in nodes:
        (run_dir,) = agent.log_dir.glob("again_*")
        assert (run_dir / "attempt_0").is_dir() and (run_dir / "attempt_1").is_dir()


def test_restarts_exhausted_raise_the_last_report(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "fail.py", "import sys\nsys.exit(4)\n")
    with Cluster([a.address for a in nodes]) as cluster, pytest.raises(JobFailed) as failed:
        cluster.launch([PYTHON, script], max_restarts=2, run_id="never", kill_timeout=2)
    assert failed.value.report.restart_count == 2
    assert failed.value.report.root_cause is not None
    assert failed.value.report.root_cause.exit_code == 4


def test_output_routing_filters_and_templates(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "oe.py", OUT_AND_ERR)
    with Cluster([a.address for a in nodes]) as cluster:

        def run(**options: object) -> list[tuple[str, str, str]]:
            lines, on_line = collect()
            cluster.launch([PYTHON, script], nproc_per_node=2, on_line=on_line, **options)
            return sorted((ln.prefix, ln.stream, ln.text) for ln in lines)

        assert run(local_ranks_filter=[1]) == [
            ("[default1]:", "stderr", "e"),
            ("[default1]:", "stdout", "o"),
            ("[default3]:", "stderr", "e"),
            ("[default3]:", "stdout", "o"),
        ]
        # Everything redirected; local rank 0's stderr teed back.
        assert run(redirects="3", tee="0:2") == [
            ("[default0]:", "stderr", "e"),
            ("[default2]:", "stderr", "e"),
        ]
        assert run(redirects="1") == [(f"[default{r}]:", "stderr", "e") for r in range(4)]
        hosts = cluster.names
        got = run(
            log_line_prefix_template="<${host}|${rank}|${local_rank}|${role_name}> ",
            role_name="trainer",
            redirects="2",
        )
        want = [(f"<{hosts[r // 2]}|{r}|{r % 2}|trainer> ", "stdout", "o") for r in range(4)]
        assert got == sorted(want)
        with pytest.raises(ValueError, match="placeholder"):
            cluster.launch([PYTHON, script], log_line_prefix_template="${nope}")
        with pytest.raises(ValueError, match="redirects"):
            cluster.launch([PYTHON, script], redirects="7")


def test_dead_node_is_a_clear_error_and_starts_nothing(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    (live,) = start_nodes(1)
    dead = f"127.0.0.1:{closed_port()}"
    script = write(tmp_path, "oe.py", OUT_AND_ERR)
    began = time.monotonic()
    with Cluster([live.address, dead], timeout=5) as cluster:
        with pytest.raises(ClusterError) as err:
            cluster.launch([PYTHON, script])
        assert time.monotonic() - began < 5
        assert dead in str(err.value) and "unreachable" in str(err.value)
        assert isinstance(err.value.errors[dead], AgentUnavailable)
        assert "1 of 2 nodes failed" in str(err.value)
        polled = cluster.info()
        assert polled[0].ok and isinstance(polled[1].error, AgentUnavailable)
        assert cluster.list()[0].unwrap() == []


@pytest.mark.timeout(60)
async def test_async_launch_cancelled_kills_every_node(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "sleep.py", READY_THEN_SLEEP)
    ready: list[int] = []
    async with AsyncCluster([a.address for a in nodes]) as cluster:
        task = asyncio.create_task(
            cluster.launch(
                [PYTHON, script],
                nproc_per_node=2,
                run_id="cancel-me",
                kill_timeout=2,
                on_line=lambda line: ready.append(line.global_rank),
            )
        )
        deadline = time.monotonic() + 30
        while sorted(ready) != [0, 1, 2, 3]:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        polled = await cluster.poll("cancel-me")
        assert [r.unwrap().state for r in polled] == [agent_pb2.KILLED] * 2
    for agent in nodes:
        assert not agent.workers(script)


def test_a_used_run_id_is_refused_without_touching_the_old_job(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "oe.py", OUT_AND_ERR)
    with Cluster([a.address for a in nodes]) as cluster:
        options = {"run_id": "dup", "master_port": 12345, "on_line": lambda line: None}
        cluster.launch([PYTHON, script], **options)
        with pytest.raises(ClusterError, match="already in use"):
            cluster.launch([PYTHON, script], **options)  # same spec: the old, ended job
        with pytest.raises(ClusterError, match="ALREADY_EXISTS"):
            cluster.launch([PYTHON, script, "x"], **options)  # another spec
        assert [r.unwrap().state for r in cluster.poll("dup")] == [agent_pb2.SUCCEEDED] * 2


@pytest.mark.timeout(60)
def test_an_on_line_error_stops_the_job_and_propagates(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "sleep.py", READY_THEN_SLEEP)

    def broken(line: OutputLine) -> None:
        if line.global_rank == 0:  # the other node's follower must be stopped too
            raise KeyError("callback bug")

    with Cluster([a.address for a in nodes]) as cluster:
        with pytest.raises(KeyError, match="callback bug"):
            cluster.launch(
                [PYTHON, script],
                run_id="cb",
                kill_timeout=2,
                on_line=broken,
                on_event=lambda message: None,
            )
        assert [r.unwrap().state for r in cluster.poll("cb")] == [agent_pb2.KILLED] * 2
    for agent in nodes:
        assert not agent.workers(script)


@pytest.mark.timeout(60)
def test_an_agent_dying_mid_job_fails_the_job_and_frees_the_others(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "sleep.py", READY_THEN_SLEEP)
    ready: list[int] = []

    def on_line(line: OutputLine) -> None:
        ready.append(line.global_rank)
        if len(ready) == 4:
            os.kill(nodes[1].proc.pid, signal.SIGKILL)

    began = time.monotonic()
    try:
        with (
            Cluster([a.address for a in nodes], timeout=3) as cluster,
            pytest.raises(JobFailed) as failed,
        ):
            cluster.launch(
                [PYTHON, script],
                nproc_per_node=2,
                run_id="orphan",
                kill_timeout=2,
                on_line=on_line,
                on_event=lambda message: None,
            )
        assert time.monotonic() - began < 30
        report = failed.value.report
        assert [n.node for n in report.lost_nodes] == [cluster.names[1]]
        assert report.root_node is report.lost_nodes[0] and report.root_cause is None
        assert report.root_node.why.startswith("connection refused")
        assert report.root_node.global_ranks == (2, 3)
        assert "Root Cause (first observed failure): a lost node" in report.format()
        assert {f.global_rank for f in report.failures} == {0, 1}
        assert all(f.terminated for f in report.failures)
        assert not nodes[0].workers(script)
    finally:  # the dead agent's ranks are not ours to leave behind
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if script in " ".join(proc.cmdline()):
                    proc.kill()


def test_fan_out_wait_poll_and_kill(
    start_nodes: Callable[[int], list[Agent]], tmp_path: Path
) -> None:
    nodes = start_nodes(2)
    script = write(tmp_path, "oe.py", OUT_AND_ERR)
    for agent in nodes:
        with AgentClient(agent.address) as client:
            client.start(
                agent_pb2.JobSpec(job_id="fan", nprocs=1, entrypoint=PYTHON, args=[script])
            )
    with Cluster([a.address for a in nodes]) as cluster:
        finals = cluster.wait("fan", timeout=30)
        assert [r.unwrap().state for r in finals] == [agent_pb2.SUCCEEDED] * 2
        assert all(r.ok for r in cluster.kill("fan"))
        missing = cluster.poll("other")
        assert all(isinstance(r.error, JobNotFound) for r in missing)
        with pytest.raises(JobNotFound):
            missing[0].unwrap()
