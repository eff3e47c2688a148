"""Kill and close: process groups, grandchildren that left the session or lost their
parent, SIGKILL after the timeout, signals that do not stop the job."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers.core import PYTHON, Core, gone, wait_for_file_line
from helpers.wait import wait_until_async

from rankd.agent.model import JobState, RankState

FAMILY = """
    import subprocess, sys, time
    # a child in the rank's own process group, and one that left it with setsid
    same_group = subprocess.Popen(["sleep", "120"])
    {escaper}
    print(same_group.pid, escaped.pid, flush=True)
    time.sleep(120)
"""
SETSID_BINARY = 'escaped = subprocess.Popen(["setsid", "sleep", "120"])'
NEW_SESSION = (
    "escaped = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
    "start_new_session=True)"
)


def _escaped(pid: int) -> bool:
    """The process runs its final program in a session of its own."""
    try:
        proc = psutil.Process(pid)
        name = proc.cmdline()[:1]
    except psutil.NoSuchProcess:
        return False
    return os.getsid(pid) == pid and name in (["sleep"], [PYTHON])


@pytest.mark.parametrize("escaper", [SETSID_BINARY, NEW_SESSION], ids=["setsid", "new_session"])
async def test_kill_reaches_grandchildren_in_other_sessions(core: Core, escaper: str) -> None:
    script = core.script("family.py", FAMILY.format(escaper=escaper))
    job, _ = await core.sup.start(core.spec("family", script, nprocs=2))
    pids = []
    for rank in job.current.ranks:
        (line,) = await wait_for_file_line(rank.stdout_path)
        same_group, escaped = map(int, line.split())
        await wait_until_async(functools.partial(_escaped, escaped), 10, "the grandchild's setsid")
        assert os.getpgid(same_group) == rank.pid
        assert os.getsid(escaped) != rank.pid
        pids += [same_group, escaped]

    started = time.monotonic()
    attempt = await core.sup.kill("family", signal.SIGTERM, 5.0)
    assert time.monotonic() - started < 3.0  # nobody needed SIGKILL
    assert attempt.state is JobState.KILLED
    assert attempt.reason == "killed by Kill(SIGTERM)"
    assert [(r.state, r.exit_code, r.terminated_by_agent) for r in attempt.ranks] == [
        (RankState.TERMINATED, -signal.SIGTERM, True)
    ] * 2
    await wait_until_async(lambda: all(gone(p) for p in pids), 5, "every grandchild to die")


async def test_worker_ignoring_sigterm_is_sigkilled_after_the_timeout(core: Core) -> None:
    script = core.script(
        "stubborn.py",
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(120)
        """,
    )
    job, _ = await core.sup.start(core.spec("stubborn", script))
    (rank,) = job.current.ranks
    await wait_for_file_line(rank.stdout_path)
    started = time.monotonic()
    attempt = await core.sup.kill("stubborn", signal.SIGTERM, 0.5)
    took = time.monotonic() - started
    assert 0.5 <= took < 5.0  # waited out the 0.5 s, then SIGKILL: far from a hang
    assert attempt.ended
    assert attempt.state is JobState.KILLED
    assert (rank.state, rank.exit_code, rank.terminated_by_agent) == (
        RankState.TERMINATED,
        -signal.SIGKILL,
        True,
    )
    assert rank.failure is not None
    assert rank.failure.signal_name == "SIGKILL"
    assert rank.failure.message == f"Signal 9 (SIGKILL) received by PID {rank.pid}"
    assert gone(rank.pid)


async def test_fail_fast_sigkills_a_stubborn_peer_after_kill_timeout(core: Core) -> None:
    script = core.script(
        "failfast_stubborn.py",
        """
        import os, signal, sys, time
        if os.environ["LOCAL_RANK"] == "1":
            sys.exit(7)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(120)
        """,
    )
    # rank 1 must not fail before rank 0 ignores SIGTERM: let it wait for a go file
    go = core.tmp / "go"
    gated = core.script(
        "gate.py",
        f"""
        import os, runpy, sys, time
        if os.environ["LOCAL_RANK"] == "1":
            while not os.path.exists({str(go)!r}):
                time.sleep(0.01)
        runpy.run_path({script!r}, run_name="__main__")
        """,
    )
    job, _ = await core.sup.start(core.spec("ffstub", gated, nprocs=2, kill_timeout=0.5))
    stubborn, failing = job.current.ranks
    await wait_for_file_line(stubborn.stdout_path)
    go.touch()
    attempt = await asyncio.wait_for(core.sup.wait("ffstub"), 10)
    assert attempt.state is JobState.FAILED
    assert (failing.state, failing.exit_code) == (RankState.FAILED, 7)
    assert (stubborn.state, stubborn.exit_code) == (RankState.TERMINATED, -signal.SIGKILL)
    assert 0.5 <= stubborn.end_time - failing.end_time < 1.5
    assert attempt.failures()[0] is failing.failure


async def test_kill_without_escalation_delivers_the_signal_and_the_job_runs_on(
    core: Core,
) -> None:
    script = core.script(
        "usr1.py",
        """
        import signal, sys, time
        def note(signum, frame):
            print("got", signal.Signals(signum).name, flush=True)
        signal.signal(signal.SIGUSR1, note)
        print("ready", flush=True)
        while True:
            time.sleep(120)
        """,
    )
    job, _ = await core.sup.start(core.spec("usr1", script, nprocs=2))
    for rank in job.current.ranks:
        await wait_for_file_line(rank.stdout_path)
    started = time.monotonic()
    attempt = await core.sup.kill("usr1", signal.SIGUSR1, 30.0, escalate=False)
    assert time.monotonic() - started < 10.0  # did not wait out the 30 s
    for rank in attempt.ranks:
        assert await wait_for_file_line(rank.stdout_path, 2) == ["ready", "got SIGUSR1"]
    assert attempt.state is JobState.RUNNING
    assert attempt.reason == ""
    assert not attempt.ended
    assert [(r.state, r.exit_code, r.terminated_by_agent) for r in attempt.ranks] == [
        (RankState.RUNNING, None, False)
    ] * 2
    assert all(psutil.pid_exists(r.pid) for r in attempt.ranks)

    # a second signal, then the real kill
    await core.sup.kill("usr1", signal.SIGUSR1, escalate=False)
    for rank in attempt.ranks:
        await wait_for_file_line(rank.stdout_path, 3)
    final = await core.sup.kill("usr1", signal.SIGTERM, 5.0)
    assert final.state is JobState.KILLED
    assert [r.exit_code for r in final.ranks] == [-signal.SIGTERM] * 2


async def test_concurrent_kills_agree(core: Core) -> None:
    script = core.script("sleep.py", "import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    job, _ = await core.sup.start(core.spec("twice", script, nprocs=3))
    for rank in job.current.ranks:
        await wait_for_file_line(rank.stdout_path)
    first, second = await asyncio.wait_for(
        asyncio.gather(
            core.sup.kill("twice", signal.SIGTERM, 5.0),
            core.sup.kill("twice", signal.SIGKILL, 5.0),
        ),
        10,
    )
    assert first is second is job.current
    assert first.ended
    assert first.state is JobState.KILLED
    assert first.reason == "killed by Kill(SIGTERM)"
    assert all(r.state is RankState.TERMINATED for r in first.ranks)
    assert {r.exit_code for r in first.ranks} <= {-signal.SIGTERM, -signal.SIGKILL}


# -- the agent's mode: a child subreaper (run in a child process, never in pytest) ------

SUBREAPER_DRIVER = """
import asyncio, json, logging, os, signal, sys, time
import psutil
from rankd.agent.specs import JobSpec
from rankd.agent.supervisor import Supervisor

LOG_DIR, WORKER, MODE = sys.argv[1:4]

def gone(pid):  # strict: not even a zombie (the subreaper reaps what it adopts)
    return not psutil.pid_exists(pid)

async def until(pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True

async def main():
    sup = Supervisor(LOG_DIR, subreaper=True)
    result = {}
    try:
        job, _ = await sup.start(JobSpec(job_id="sub", nprocs=1, entrypoint=sys.executable,
                                         args=("-u", WORKER)))
        rank = job.current.ranks[0]
        ok = await until(lambda: open(rank.stdout_path).read().endswith("\\n"), 10)
        grandchild = int(open(rank.stdout_path).read().split()[0])
        result["grandchild"] = grandchild
        # it must be running with SIGTERM ignored before the test goes on
        def ignoring():
            try:
                with open(f"/proc/{grandchild}/status") as f:
                    ign = next(l for l in f if l.startswith("SigIgn:")).split()[1]
                return int(ign, 16) & (1 << (signal.SIGTERM - 1))
            except (OSError, StopIteration):
                return False
        result["ignoring"] = ok and await until(ignoring, 10)
        if MODE == "kill":
            started = time.monotonic()
            attempt = await sup.kill("sub", signal.SIGTERM, 20.0)
            result["kill_seconds"] = time.monotonic() - started
        elif MODE == "restart":
            # the next attempt starts the moment the first ends: the first's leftovers
            # are killed before its ranks are started, not a moment later
            said = []
            class Said(logging.Handler):
                def emit(self, record):
                    said.append(record.getMessage())
            logging.getLogger("rankd.agent").addHandler(Said())
            logging.getLogger("rankd.agent").setLevel(logging.INFO)
            attempt = job.current
            os.kill(rank.pid, signal.SIGUSR1)
            await asyncio.wait_for(attempt.done.wait(), 10)
            await sup.start(JobSpec(job_id="sub", nprocs=1, entrypoint=sys.executable,
                                    args=("-c", "pass"), restart_count=1))
            result["killed_before_restart"] = any("1 leftover" in m for m in said)
        else:
            os.kill(rank.pid, signal.SIGUSR1)  # the worker exits 0 on it
            attempt = await asyncio.wait_for(sup.wait("sub"), 10)
        result["state"] = attempt.state.value
        result["exit_code"] = rank.exit_code
        result["gone"] = await until(lambda: gone(grandchild), 5)
    finally:
        await sup.close(timeout=2.0)
    print(json.dumps(result))

asyncio.run(main())
"""

ORPHANING_WORKER = """
import os, signal, subprocess, sys, time
child = subprocess.Popen(
    [sys.executable, "-c",
     "import signal, time\\n"
     "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
     "time.sleep(60)"],
    start_new_session=True,
)
print(child.pid, flush=True)
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["kill", "exit", "restart"])
async def test_subreaper_mode_kills_orphaned_grandchildren(tmp_path: Path, mode: str) -> None:
    """As the agent runs (subreaper=True): a grandchild that left the session, ignores
    SIGTERM and is orphaned when its rank dies (by Kill, or on its own with code 0)
    does not survive the job, and is reaped; before the next attempt's ranks start when
    that attempt starts at once."""
    driver = tmp_path / "driver.py"
    driver.write_text(SUBREAPER_DRIVER)
    worker = tmp_path / "worker.py"
    worker.write_text(ORPHANING_WORKER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(driver),
        str(tmp_path / "logs"),
        str(worker),
        mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parents[2]),
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().splitlines()[-1])
    grandchild = result["grandchild"]
    try:
        assert result["ignoring"]
        assert result["gone"], f"grandchild {grandchild} survived its job"
        assert not psutil.pid_exists(grandchild)
        if mode == "kill":
            assert result["state"] == "KILLED"
            assert result["exit_code"] == -signal.SIGTERM
            assert result["kill_seconds"] < 5.0  # no wait for the 20 s timeout
        else:
            assert result["state"] == "SUCCEEDED"
            assert result["exit_code"] == 0
        if mode == "restart":
            assert result["killed_before_restart"]
    finally:
        if psutil.pid_exists(grandchild):
            os.kill(grandchild, signal.SIGKILL)
