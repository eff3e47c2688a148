"""Long variants of the reliability tests (`make soak`; excluded from `make test`)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
from helpers.agents import RANKD_BIN, Agent, start_agent

from rankd.client import AgentClient
from rankd.testing import LocalAgent, local_agents, stop_agents
from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc

pytestmark = pytest.mark.soak


@pytest.mark.timeout(900)
def test_one_gigabyte_flood_beside_a_quiet_rank(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    worker = script(
        "gb.py",
        "import os, sys\n"
        "if os.environ['LOCAL_RANK'] == '0':\n"
        "    block = (b'f' * 1023 + b'\\n') * 1024\n"
        "    for _ in range(1024):\n"
        "        sys.stdout.buffer.write(block)\n"
        "else:\n"
        "    for i in range(10000):\n"
        "        print('quiet', i, flush=True)\n",
    )
    spec = pb.JobSpec(job_id="gb", nprocs=2, entrypoint=sys.executable, args=[worker])
    rss0 = psutil.Process(agent.proc.pid).memory_info().rss
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    flood = 0
    quiet = []
    peak = 0
    for msg in agent.stub.Stream(pb.StreamRequest(job_id="gb", follow=True), timeout=800):
        peak = max(peak, psutil.Process(agent.proc.pid).memory_info().rss)
        for ln in msg.lines:
            if ln.local_rank == 0:
                flood += 1
            else:
                quiet.append(ln.text)
    assert flood == 1024 * 1024
    assert quiet == [f"quiet {i}" for i in range(10000)]
    assert peak - rss0 < 64 * 1024 * 1024


@pytest.mark.timeout(900)
def test_three_thousand_jobs(agent: Agent) -> None:
    proc = psutil.Process(agent.proc.pid)
    numbers = []
    for i in range(3000):
        spec = pb.JobSpec(job_id=f"s{i}", nprocs=1, entrypoint="/bin/true")
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
        list(agent.stub.Stream(pb.StreamRequest(job_id=f"s{i}", follow=True), timeout=30))
        if i in (100, 2999):
            numbers.append((proc.num_fds(), proc.num_threads(), proc.memory_info().rss))
    (fds0, threads0, rss0), (fds1, threads1, rss1) = numbers
    assert fds1 <= fds0 + 2 and threads1 <= threads0 + 1
    assert rss1 - rss0 < 40 * 1024 * 1024


# -- chaos (issue 18): agents killed, frozen, resumed and restarted under launches ------

CHAOS_LAUNCHES = 24
CHAOS_NODE_TIMEOUT = 2.0
CHAOS_KILL_TIMEOUT = 1.0
CHAOS_LEASE = 3.0
CHAOS_SLACK = 3.0  # the launcher's own start and exit on a loaded 2-core host
CHAOS_WORKER = """\
import os, sys, time
print("ready", flush=True)
flag = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fail-" + os.environ["RANK"])
while not os.path.exists(flag):
    time.sleep(0.05)
os.remove(flag)
sys.exit(3)
"""


def _chaos_launch(
    agents: list[Agent], worker: str, run_id: str
) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"}
    proc = subprocess.Popen(
        [
            RANKD_BIN,
            "launch",
            "--nodes",
            ",".join(a.address for a in agents),
            "--run-id",
            run_id,
            "--node-timeout",
            str(CHAOS_NODE_TIMEOUT),
            "--lease",
            str(CHAOS_LEASE),
            "--kill-timeout",
            str(CHAOS_KILL_TIMEOUT),
            "--",
            sys.executable,
            worker,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while sum("ready" in line for line in seen) < len(agents):
        assert time.monotonic() < deadline, f"{run_id}: the ranks did not start"
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=30)[1]
        seen.append(line)
    return proc, seen


def _ranks_alive(worker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if worker in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


@pytest.mark.timeout(900)
def test_chaos_launches_over_four_agents(tmp_path: Path) -> None:
    """Launches over 4 agents while a driver SIGKILLs, SIGSTOPs/SIGCONTs and restarts
    them, kills jobs from another client and fails ranks: every launch ends within its
    bound with the right cause, restarted agents hold their past jobs as ended, and no
    rank survives."""
    seed = int(os.environ.get("RANKD_CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (RANKD_CHAOS_SEED)")
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    worker = str(worker_dir / "chaos_worker.py")
    Path(worker).write_text(CHAOS_WORKER)
    dirs = [tmp_path / f"node{i}" for i in range(4)]
    agents: list[Agent] = [start_agent(d) for d in dirs]
    numbers: dict[str, list[float]] = {}
    restarts = 0
    try:
        for n in range(CHAOS_LAUNCHES):
            run_id = f"chaos{n}"
            action = rng.choice(["sigkill", "sigstop", "kill", "fail"])
            victim = rng.randrange(4)
            proc, _ = _chaos_launch(agents, worker, run_id)
            time.sleep(rng.uniform(0, 0.5))
            target = agents[victim]
            began = time.monotonic()
            if action == "sigkill":
                os.kill(target.pid, signal.SIGKILL)
                bound, code = 1.5 + 1.0 + CHAOS_KILL_TIMEOUT, 5
            elif action == "sigstop":
                os.kill(target.pid, signal.SIGSTOP)
                bound, code = CHAOS_NODE_TIMEOUT + CHAOS_KILL_TIMEOUT, 5
            elif action == "kill":
                subprocess.run(
                    [RANKD_BIN, "kill", run_id, "--nodes", target.address, "--requester", "chaos"],
                    capture_output=True,
                    timeout=60,
                    check=True,
                )
                bound, code = CHAOS_KILL_TIMEOUT, 4
            else:
                (worker_dir / f"fail-{victim}").touch()
                bound, code = CHAOS_KILL_TIMEOUT, 1
            try:
                _, err = proc.communicate(timeout=60)
            finally:
                if action == "sigstop":
                    os.kill(target.pid, signal.SIGCONT)
            took = time.monotonic() - began
            numbers.setdefault(action, []).append(took)
            assert proc.returncode == code, (run_id, action, err)
            assert took < bound + CHAOS_SLACK, (run_id, action, took, err)
            if code == 5:
                assert f": node {target.address} lost" in err, err
            elif code == 4:
                assert "KILLED" in err and "from chaos" in err and "Root Cause" not in err, err
            else:
                assert f"global rank {victim} on {target.address} failed: exit code 3" in err, err
            if action == "sigkill":  # back on the same log dir: its past jobs are ended
                target.proc.wait(10)
                agents[victim] = start_agent(dirs[victim])
                restarts += 1
                with AgentClient(agents[victim].address) as client:
                    held = client.list()
                assert held and all(s.state != pb.RUNNING for s in held), held
                assert any(s.job_id == run_id and s.state == pb.FAILED for s in held)
            # every rank of this launch is gone within a lease and a kill timeout
            deadline = time.monotonic() + CHAOS_LEASE + CHAOS_KILL_TIMEOUT + CHAOS_SLACK
            while _ranks_alive(worker):
                assert time.monotonic() < deadline, (run_id, action, _ranks_alive(worker))
                time.sleep(0.05)
    finally:
        for agent in agents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.pid, signal.SIGCONT)
            agent.stop()
        for proc in _ranks_alive(worker):
            proc.kill()
    assert not _ranks_alive(worker)
    for action, times in sorted(numbers.items()):
        print(
            f"chaos {action}: {len(times)} launches, ended after "
            f"min {min(times):.2f}s / max {max(times):.2f}s"
        )
    print(f"chaos: {restarts} agent restarts")


AGENTS_PER_HOST = 160  # above the 128 inotify instances a user has by default


@pytest.mark.timeout(1800)
def test_a_hundred_and_sixty_agents_on_one_host_each_run_a_job(tmp_path: Path) -> None:
    """Test fleets and integration tests run many agents per host. Each agent makes its
    inotify instance at start; those past the user's fs.inotify.max_user_instances
    follow logs by polling, and every one runs a 2-rank job whose lines all arrive.
    Prints the numbers (`make soak` shows them with -s)."""
    began = time.monotonic()
    with local_agents(AGENTS_PER_HOST, log_dir=tmp_path, echo_stderr=False) as agents:
        started = time.monotonic() - began
        family = [p for a in agents for p in psutil.Process(a.pid).children()]  # guardians
        ran = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(_one_job, agents))
        ran = time.monotonic() - ran
        modes = [mode for mode, _ in outcomes]
        assert [lines for _, lines in outcomes] == [_LINES] * AGENTS_PER_HOST
        warned = sum(any("cannot use inotify" in line for line in a.stderr_lines) for a in agents)
        assert warned == modes.count("poll")
        rss = sum(_rss(p) for p in [*(psutil.Process(a.pid) for a in agents), *family])
        stopping = time.monotonic()
        codes = stop_agents(agents)
        stopped = time.monotonic() - stopping
    assert set(codes) == {-15}
    print(
        f"\n{AGENTS_PER_HOST} agents: started in {started:.1f} s, ran a 2-rank job each "
        f"in {ran:.1f} s ({modes.count('inotify')} inotify, {modes.count('poll')} poll), "
        f"agents and guardians {rss / 2**30:.2f} GiB RSS, stopped in {stopped:.1f} s"
    )


_LINES = sorted(f"rank {r} line {i}" for r in range(2) for i in range(3))


def _one_job(agent: LocalAgent) -> tuple[str, list[str]]:
    with grpc.insecure_channel(agent.address) as channel:
        stub = agent_pb2_grpc.NodeAgentStub(channel)
        mode = stub.Info(pb.InfoRequest(), timeout=60).log_follow
        code = "import os\nfor i in range(3): print('rank', os.environ['LOCAL_RANK'], 'line', i)"
        spec = pb.JobSpec(job_id="fleet", nprocs=2, entrypoint=sys.executable, args=["-c", code])
        stub.Start(pb.StartRequest(spec=spec), timeout=60)
        msgs = stub.Stream(pb.StreamRequest(job_id="fleet", follow=True), timeout=300)
        lines = sorted(ln.text for m in msgs for ln in m.lines)
        assert stub.Poll(pb.PollRequest(job_id="fleet"), timeout=60).job.state == pb.SUCCEEDED
    return mode, lines


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0
