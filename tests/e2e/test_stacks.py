"""Stacks of hung jobs: `rankd stacks`, `Cluster.stacks` and `rankd launch --hang-timeout`,
with real agents, real ranks, real py-spy; the torch tests hang a real gloo job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.agents import PYTHON, RANKD_BIN, Agent, start_agent, start_launch
from helpers.torchjobs import GLOO_ENV
from helpers.wait import wait_until
from helpers.workers import write

from rankd.agent.stacks import find_sampler
from rankd.client import Cluster
from rankd.testing import agent_command
from rankd.testing import start_agent as start_local_agent

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        find_sampler() is None,
        reason="needs py-spy (the test extra installs it: pip install 'rankd[stacks]')",
    ),
]

# Global rank 3 waits in its data loader; the others wait for it in all_reduce.
HUNG_GLOO = """\
import time

import torch
import torch.distributed as dist


def slow_data_loader():
    time.sleep(3600)


dist.init_process_group("gloo")
rank = dist.get_rank()
print(f"rank {rank} ready", flush=True)
if rank == 3:
    slow_data_loader()
value = torch.ones(1)
dist.all_reduce(value)
"""

SLEEPER = """\
import os
import sys
import time


def wait_here():
    time.sleep(3600)


print("ready", flush=True)
if int(os.environ["LOCAL_RANK"]) == 1:
    sys.exit(0)
wait_here()
"""


def _nodes(nodes: list[Agent]) -> str:
    return ",".join(a.address for a in nodes)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.communicate(timeout=30)


def test_rankd_stacks_folds_a_hung_gloo_job(nodes: list[Agent], tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="a real gloo job; the torch extra installs torch")
    script = write(tmp_path, "hung.py", HUNG_GLOO)
    flags = [f"--env={k}={v}" for k, v in GLOO_ENV.items()]
    launch = start_launch(nodes, script, "hung-gloo", *flags)
    try:
        out = subprocess.run(
            [RANKD_BIN, "stacks", "hung-gloo", "--nodes", _nodes(nodes)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        groups = out.stdout.split("\n\n")
        # the odd one out leads: rank 3 alone, in its data loader
        assert groups[0].startswith("global rank 3 ("), out.stdout
        assert "slow_data_loader (" in groups[0]
        rest = [g for g in groups if g.startswith("global ranks 0-2 (")]
        assert any("all_reduce" in g for g in rest), out.stdout
        # frames innermost last: the module's line comes before the function it called
        lines = groups[0].splitlines()
        assert lines.index(next(ln for ln in lines if "<module>" in ln)) < lines.index(
            next(ln for ln in lines if "slow_data_loader" in ln)
        )
        data = json.loads(
            subprocess.run(
                [
                    RANKD_BIN,
                    "stacks",
                    "hung-gloo",
                    "--json",
                    "--ranks",
                    "3",
                    "--nodes",
                    _nodes(nodes),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        )
        assert {tuple(g["ranks"]) for g in data["groups"]} == {(3,)}  # only the rank asked for
    finally:
        _stop(launch)


def test_launch_hang_timeout_reports_the_hang_and_fails(nodes: list[Agent], tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="a real gloo job; the torch extra installs torch")
    script = write(tmp_path, "hung.py", HUNG_GLOO)
    out = subprocess.run(
        [
            RANKD_BIN,
            "launch",
            "--nodes",
            _nodes(nodes),
            "--nproc-per-node",
            "2",
            "--run-id",
            "hang-watch",
            "--hang-timeout",
            "8",
            "--kill-timeout",
            "5",
            *(f"--env={k}={v}" for k, v in GLOO_ENV.items()),
            "--",
            PYTHON,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 1, out.stderr
    report = out.stderr[out.stderr.index("=" * 20) :]
    assert "rankd job hang-watch HUNG: no output from any rank for 8 s" in report
    assert "4 of 4 ranks sampled" in report
    odd = report.index("global rank 3 (")
    assert odd < report.index("global ranks 0-2 (")
    assert report.index("slow_data_loader", odd) < report.index("global ranks 0-2 (")
    assert "last line: 'rank 3 ready'" in report
    assert "Terminated by rankd" in report
    with Cluster([a.address for a in nodes]) as cluster:
        statuses = [r.unwrap() for r in cluster.poll("hang-watch", fresh=True)]
    assert all(not r.HasField("exit_code") or r.exit_code < 0 for s in statuses for r in s.ranks)
    assert all("HUNG" in s.reason for s in statuses)


def test_exited_ranks_and_wrapped_ranks(agent: Agent, tmp_path: Path) -> None:
    """A rank that has exited is reported as such; a rank behind a shell wrapper is
    sampled through its Python child."""
    script = write(tmp_path, "sleeper.py", SLEEPER)
    wrapper = write(tmp_path, "wrap.sh", f'#!/bin/sh\n"{PYTHON}" "{script}"\necho done\n')
    os.chmod(wrapper, 0o755)
    launch = subprocess.Popen(
        [
            RANKD_BIN,
            "launch",
            "--nodes",
            agent.address,
            "--nproc-per-node",
            "2",
            "--run-id",
            "wrapped",
            "--",
            wrapper,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert launch.stdout is not None
        seen: set[str] = set()
        while len(seen) < 2:  # each rank's "ready" (bounded: the launch ends, or times out)
            line = launch.stdout.readline()
            assert line, launch.communicate(timeout=30)[1]
            if line.endswith(":ready\n"):
                seen.add(line.split(":")[0])
        with Cluster([agent.address]) as cluster:
            wait_until(
                lambda: any(
                    r.HasField("exit_code")
                    for r in cluster.poll("wrapped", fresh=True)[0].unwrap().ranks
                ),
                timeout=30,
                what="local rank 1 to exit",
            )
            folded = cluster.stacks("wrapped")
        (group,) = folded.groups
        assert group.ranks == [0]
        assert any(fn == "wait_here" for fn, _, _ in group.frames)
        assert group.samples[0].pid != 0
        ((reason, ranks, _),) = folded.unsampled
        assert ranks == [1]
        assert "had exited (exit code 0)" in reason
    finally:
        _stop(launch)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops CAP_SYS_PTRACE from a root agent")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_no_ptrace_permission_says_why_and_how(tmp_path: Path) -> None:
    """A real refusal: the agent runs without CAP_SYS_PTRACE and the rank makes itself
    undumpable, so the kernel refuses py-spy."""
    drop = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace"]
    agent = Agent.adopt(start_local_agent(tmp_path / "logs", command=[*drop, *agent_command()]))
    script = write(
        tmp_path,
        "undumpable.py",
        "import ctypes, time\n"
        "ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n",
    )
    launch = start_launch([agent], script, "no-ptrace", ranks_per_node=1)
    try:
        out = subprocess.run(
            [RANKD_BIN, "stacks", "no-ptrace", "--nodes", agent.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1, out.stdout
        assert "global rank 0 (" in out.stdout
        assert "not permitted to read process" in out.stdout
        assert "CAP_SYS_PTRACE" in out.stdout
    finally:
        _stop(launch)
        agent.stop()


def test_an_agent_without_a_sampler_says_how_to_install_one(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "logs", "--stacks-sampler", str(tmp_path / "no-py-spy"))
    script = write(tmp_path, "sleeper.py", SLEEPER)
    launch = start_launch([agent], script, "no-sampler", ranks_per_node=1)
    try:
        with Cluster([agent.address]) as cluster:
            folded = cluster.stacks("no-sampler")
        assert folded.groups == []
        ((reason, ranks, _),) = folded.unsampled
        assert ranks == [0]
        assert "pip install 'rankd[stacks]'" in reason
    finally:
        _stop(launch)
        agent.stop()


def test_native_frames_and_the_sample_timeout_flag(agent: Agent, tmp_path: Path) -> None:
    script = write(tmp_path, "sleeper.py", SLEEPER)
    launch = start_launch([agent], script, "native", ranks_per_node=1)
    try:

        def stacks(*flags: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [RANKD_BIN, "stacks", "native", "--nodes", agent.address, *flags],
                capture_output=True,
                text=True,
                timeout=90,
            )

        def functions(out: subprocess.CompletedProcess[str]) -> set[str]:
            assert out.returncode == 0, out.stderr + out.stdout
            groups = json.loads(out.stdout)["groups"]
            return {f["function"] for g in groups for f in g["frames"]}

        python_only = functions(stacks("--json"))
        assert "wait_here" in python_only and "time_sleep" not in python_only
        native = functions(stacks("--json", "--native", "--sample-timeout", "60"))
        assert {"wait_here", "time_sleep"} <= native  # the C function under time.sleep
        bad = stacks("--sample-timeout", "0")
        assert bad.returncode == 2
        assert (
            bad.stderr.strip() == "rankd: error: --sample-timeout must be between 0 and 300 seconds"
        )
    finally:
        _stop(launch)
