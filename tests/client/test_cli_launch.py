"""`rankd launch` as a user runs it: a real subprocess against real agents."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers.agents import ENV_DUMP, PYTHON, RANKD_BIN, Agent, closed_port
from helpers.wait import wait_until
from helpers.workers import write

from rankd.client import AgentClient
from rankd.v1 import agent_pb2

SLEEPER = """\
import time
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

FAIL_RANK_1 = """\
import os, sys
print("hello from", os.environ["RANK"], flush=True)
if os.environ["RANK"] == "1":
    raise RuntimeError("rank 1 gives up")
"""

SLOW_OK = """\
import time
time.sleep(1.6)
print("done", flush=True)
"""


def rankd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"}
    return subprocess.run(
        [RANKD_BIN, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def node_list(nodes: list[Agent]) -> str:
    return ",".join(a.address for a in nodes)


def test_launch_success_prints_prefixed_lines(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "hi.py", "import os\nprint('hi', os.environ['RANK'])\n")
    done = rankd(
        "launch",
        "--nodes",
        node_list(nodes),
        "--nproc-per-node",
        "2",
        "--run-id",
        "cli-ok",
        "--",
        PYTHON,
        script,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [f"[default{r}]:hi {r}" for r in range(4)]
    assert "starting job cli-ok" in done.stderr and "succeeded" in done.stderr
    assert "\x1b[K" not in done.stderr  # piped: plain lines, no live status line


def test_launch_failure_exits_1_with_the_report(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "fail.py", FAIL_RANK_1)
    done = rankd(
        "launch",
        "--nodes",
        node_list(nodes),
        "--kill-timeout",
        "2",
        "--run-id",
        "cli-fail",
        "--",
        PYTHON,
        script,
    )
    assert done.returncode == 1
    err = done.stderr
    assert "rankd job cli-fail FAILED (attempt 0, 2 ranks on 2 nodes)" in err
    assert "Root Cause (first observed failure):" in err
    assert "rank      : 1 (local_rank: 0)" in err
    assert "RuntimeError: rank 1 gives up" in err  # from the stderr tail
    assert "[default1]:Traceback (most recent call last):" in err  # the live stderr line
    assert "Traceback" not in done.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_kills_every_node(
    nodes: list[Agent], tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    script = write(tmp_path, "sleep.py", SLEEPER)
    run_id = f"cli-{sig.name.lower()}"
    proc = subprocess.Popen(
        [
            RANKD_BIN,
            "launch",
            "--nodes",
            node_list(nodes),
            "--nproc-per-node",
            "2",
            "--run-id",
            run_id,
            "--kill-timeout",
            "2",
            "--",
            PYTHON,
            script,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: ready.extend(stdout), daemon=True).start()
    try:
        wait_until(lambda: len(ready) == 4, timeout=30, what="4 ranks ready")
        assert all(a.workers(script) for a in nodes)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted: killing job" in proc.stderr.read()
    for agent in nodes:
        assert not agent.workers(script)
        with AgentClient(agent.address) as client:
            assert client.poll(run_id).state == agent_pb2.KILLED


def test_dead_node_exits_2_with_one_line(nodes: list[Agent], tmp_path: Path) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    began = time.monotonic()
    done = rankd(
        "launch",
        "--nodes",
        f"{nodes[0].address},{dead}",
        "--timeout",
        "5",
        "--",
        PYTHON,
        "-c",
        "pass",
    )
    assert time.monotonic() - began < 10
    assert done.returncode == 2
    assert done.stderr.startswith("rankd: error: cannot reach every node: 1 of 2 nodes failed")
    assert dead in done.stderr and "unreachable" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["launch", "--nodes", "a:1"], "no command"),
        (["launch", "--", "true"], "no nodes given"),
        (["launch", "--nodes", "a[1-", "--", "true"], "unbalanced"),
        (["launch", "--nodes", "a:1", "--nproc-per-node", "0", "--", "true"], "nproc_per_node"),
        (["launch", "--nodes", "a:1", "--local-ranks-filter", "x", "--", "true"], "integers"),
        (["launch", "--hostfile", "/no/such/file", "--", "true"], "cannot read"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_without_traceback(args: list[str], message: str) -> None:
    done = rankd(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_help_has_examples() -> None:
    done = rankd("launch", "--help")
    assert done.returncode == 0
    assert "examples:" in done.stdout and "--nproc-per-node" in done.stdout
    assert "SLURM_JOB_NODELIST" in done.stdout


@pytest.mark.timeout(60)
def test_live_status_line_on_a_terminal(nodes: list[Agent], tmp_path: Path) -> None:
    script = write(tmp_path, "slow.py", SLOW_OK)
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [RANKD_BIN, "launch", "--nodes", node_list(nodes), "--", PYTHON, script],
        stdout=subprocess.PIPE,
        stderr=child_fd,
        text=True,
    )
    os.close(child_fd)
    chunks: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            readable, _, _ = select.select([main_fd], [], [], 0.5)
            if readable:
                try:
                    data = os.read(main_fd, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(main_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = b"".join(chunks).decode(errors="replace")
    assert "\r\x1b[K" in err
    assert "attempt 0: 2 ranks:" in err and "running" in err


def test_every_launch_flag_reaches_the_ranks(nodes: list[Agent], tmp_path: Path) -> None:
    write(tmp_path, "env.py", ENV_DUMP)  # run as a relative path: checks --cwd
    keys = "RANK,ROLE_NAME,MASTER_ADDR,MASTER_PORT,TORCHELASTIC_MAX_RESTARTS,EXTRA,OMP_NUM_THREADS"
    done = rankd(
        "launch", "--nodes", node_list(nodes), "--nproc_per_node", "2", "--run-id", "flags",
        "--max-restarts", "3", "--master-addr", "10.1.2.3", "--master-port", "23456",
        "--role", "worker", "--env", "EXTRA=a=b", "--env", "OMP_NUM_THREADS=4",
        "--cwd", str(tmp_path), "--redirects", "3", "--tee", "1",
        "--local-ranks-filter", "1", "--log-line-prefix-template", "${role_name}/${rank}> ",
        "--kill-timeout", "5", "--", PYTHON, "env.py", keys,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert [line.split(" ENV ")[0] for line in lines] == ["worker/1>", "worker/3>"]
    for line in lines:
        env = json.loads(line.split(" ENV ", 1)[1])
        assert env == {
            "RANK": line.split("/")[1][0], "ROLE_NAME": "worker", "MASTER_ADDR": "10.1.2.3",
            "MASTER_PORT": "23456", "TORCHELASTIC_MAX_RESTARTS": "3", "EXTRA": "a=b",
            "OMP_NUM_THREADS": "4",
        }  # fmt: skip
    assert "to-stderr" not in done.stderr  # stderr redirected and not teed
