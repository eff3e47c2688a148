"""Stacks of hung jobs: `rankd stacks`, `Cluster.stacks` and `rankd launch --hang-timeout`,
with real agents, real ranks, real py-spy; the torch tests hang a real gloo job."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from helpers.agents import PYTHON, RANKD_BIN, Agent, start_agent, start_launch
from helpers.torchjobs import GLOO_ENV
from helpers.wait import wait_until
from helpers.workers import write

from rankd.agent.stacks import Sampler, StackTarget, find_sampler, ptrace_scope, traceable
from rankd.client import Cluster, JobFailed
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


# Never imports `threading`: py-spy names no thread, the sampler names the main one.
PLAIN_SLEEPER = """\
import os
import time


def wait_here():
    time.sleep(3600)


print(f"ready pid {os.getpid()}", flush=True)
wait_here()
"""


# Local rank 1 burns a core without a word: hung all the same (docs/hangs.md).
SPINNER = """\
import os
import time


def spin_here():
    while True:
        pass


print(f"ready {os.environ['LOCAL_RANK']}", flush=True)
if os.environ["LOCAL_RANK"] == "1":
    spin_here()
time.sleep(3600)
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
        if ptrace_scope() <= 0:  # the message docs/hangs.md shows, word for word
            assert re.fullmatch(
                r"global rank 0 \(127\.0\.0\.1\): not sampled: not permitted to read "
                r"process \d+: ptrace was refused \(a container without CAP_SYS_PTRACE, or a "
                r"rank that made itself undumpable\); run the agent with CAP_SYS_PTRACE "
                r"\(systemd: AmbientCapabilities=CAP_SYS_PTRACE; Kubernetes: "
                r"securityContext\.capabilities\.add: \[SYS_PTRACE\]\)\n",
                out.stdout,
            ), out.stdout
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


def _cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("CapEff:")).split()[1], 16)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops every capability from a root agent")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_an_agent_without_any_capability_samples_its_ranks(tmp_path: Path) -> None:
    """An unprivileged agent: no capability at all (the sandbox's interpreter lives under
    a root-only home, so it keeps uid 0 but loses every capability, CAP_SYS_PTRACE and
    CAP_DAC_OVERRIDE included); it still reads the ranks it started."""
    drop = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]
    agent = Agent.adopt(start_local_agent(tmp_path / "logs", command=[*drop, *agent_command()]))
    script = write(tmp_path, "plain.py", PLAIN_SLEEPER)
    launch = start_launch([agent], script, "no-caps")
    try:
        assert _cap_eff(agent.proc.pid) == 0  # the premise: nothing privileged left
        with Cluster([agent.address]) as cluster:
            folded = cluster.stacks("no-caps")
        assert folded.unsampled == [] and folded.node_errors == [], folded.lines()
        (group,) = folded.groups
        assert group.ranks == [0, 1]
        assert group.threads == {"MainThread"}  # named, though the rank never named it
        assert [fn for fn, _, _ in group.frames] == ["<module>", "wait_here"]
    finally:
        _stop(launch)
        agent.stop()


def test_under_ptrace_scope_1_a_rank_names_the_agent_its_tracer(tmp_path: Path) -> None:
    """Yama scope 1 without CAP_SYS_PTRACE: the rank starts through a step that names the
    agent its tracer (PR_SET_PTRACER) and execs the command in place. This kernel may
    have no Yama (then the prctl is refused and ignored); what is checked everywhere is
    that the rank keeps its pid, runs its command and is sampled by the agent's child."""
    script = write(tmp_path, "plain.py", PLAIN_SLEEPER)
    argv = [PYTHON, script]
    assert traceable(argv, scope=-1, can_ptrace=False) == argv  # no Yama
    assert traceable(argv, scope=0, can_ptrace=False) == argv
    assert traceable(argv, scope=1, can_ptrace=True) == argv
    assert traceable(argv, scope=2, can_ptrace=False) == argv  # nothing a rank can do
    wrapped = traceable(argv, scope=1, can_ptrace=False)
    assert wrapped[-3:] == [str(os.getpid()), *argv]  # this process (the agent) traces
    rank = subprocess.Popen(wrapped, stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout is not None
        assert rank.stdout.readline() == f"ready pid {rank.pid}\n"  # exec'd in place
        sampler = Sampler(find_sampler())
        try:
            target = StackTarget(0, rank.pid, str(tmp_path / "o"), str(tmp_path / "e"))
            (answer,) = asyncio.run(sampler.sample([target], native=False))
        finally:
            sampler.close()
        assert answer.error == "" and answer.pid == rank.pid
        (thread,) = answer.threads
        assert [f.function for f in thread.frames] == ["<module>", "wait_here"]
    finally:
        rank.kill()
        rank.wait(timeout=30)
    missing = subprocess.run(
        traceable([str(tmp_path / "missing")], scope=1, can_ptrace=False),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"rankd: cannot run {tmp_path / 'missing'}: No such file")


def test_hangs_count_against_max_restarts_in_python(agent: Agent, tmp_path: Path) -> None:
    """`Cluster.launch(hang_timeout=...)`: each hung attempt is a failure; the restart
    comes, and the last hang raises JobFailed with a HUNG report and the stacks. A rank
    that burns CPU without a word does not keep the job alive."""
    script = write(tmp_path, "spinner.py", SPINNER)
    events: list[str] = []
    with Cluster([agent.address]) as cluster, pytest.raises(JobFailed) as failed:
        cluster.launch(
            [PYTHON, script],
            nproc_per_node=2,
            run_id="hung-twice",
            max_restarts=1,
            hang_timeout=2,
            kill_timeout=5,
            on_event=events.append,
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
    report = failed.value.report
    assert report.state == "HUNG"
    assert report.restart_count == 1  # attempt 0 hung, was restarted, attempt 1 hung
    assert report.hang_title == "job hung-twice HUNG: no output from any rank for 2 s"
    hung = "job hung-twice HUNG: no output from any rank for 2 s; stopping job"
    assert sum(e.startswith(hung) for e in events) == 2, events  # one per attempt
    text = str(failed.value)
    assert "rankd job hung-twice HUNG: no output from any rank for 2 s (attempt 1," in text
    assert "2 of 2 ranks sampled" in text
    assert "spin_here (" in text, text  # the busy rank, caught in its loop
    assert "  attempt 0: world size 2 on 127.0.0.1 (" in text
    assert text.count(": hung: job hung-twice HUNG: no output from any rank for 2 s") == 2
    assert "last line: 'ready 1'" in text and "last line: 'ready 0'" in text


def test_a_sampler_that_hangs_costs_its_answer_never_the_agent(tmp_path: Path) -> None:
    """Each sampler run is bounded by the call's timeout and killed past it; while the
    samplers hang, the agent's event loop still answers other calls at once."""
    stuck = write(tmp_path, "py-spy", "#!/bin/sh\nexec sleep 600\n")
    os.chmod(stuck, 0o755)
    agent = start_agent(tmp_path / "logs", "--stacks-sampler", stuck)
    script = write(tmp_path, "plain.py", PLAIN_SLEEPER)
    launch = start_launch([agent], script, "stuck-sampler")
    try:
        with Cluster([agent.address]) as cluster, ThreadPoolExecutor(1) as pool:
            start = time.monotonic()
            pending = pool.submit(cluster.stacks, "stuck-sampler", timeout=3.0)
            wait_until(lambda: len(_sleeps(agent)) == 2, timeout=20, what="both samplers to start")
            assert not pending.done()
            polled = time.monotonic()
            with Cluster([agent.address]) as other:
                other.poll("stuck-sampler", fresh=True)[0].unwrap()
            assert time.monotonic() - polled < 1.5  # the loop was free
            folded = pending.result(timeout=30)
            took = time.monotonic() - start
        assert folded.groups == []
        ((reason, ranks, _),) = folded.unsampled
        assert ranks == [0, 1]
        assert reason.startswith("the stack sampler gave no answer within ")
        assert 2.5 < took < 10, took
        wait_until(lambda: not _sleeps(agent), timeout=20, what="the samplers to be killed")
    finally:
        _stop(launch)
        agent.stop()


def _sleeps(agent: Agent) -> list[psutil.Process]:
    """The agent's children that run `sleep 600` (the stuck samplers)."""
    kids = psutil.Process(agent.proc.pid).children()
    out = []
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            if kid.cmdline()[:2] == ["sleep", "600"]:
                out.append(kid)
    return out
