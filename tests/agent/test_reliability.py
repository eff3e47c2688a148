"""No orphan, no lost line, no lost result: agent death and restart, resources, floods."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from helpers.agents import Agent, start_agent
from helpers.wait import wait_until

import rankd
import rankd.agent
import rankd.client
import rankd.testing
import rankd.v1
from rankd.agent.spares import PREFIX
from rankd.testing import start_agent as start_local_agent
from rankd.v1 import agent_pb2 as pb

PY = sys.executable


def _marked_processes(tag_filter: str = "") -> list[int]:
    """Live processes carrying a rankd attempt marker (zombies have no environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            value = proc.environ().get("RANKD_ATTEMPT")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if value is not None and tag_filter in value:
            found.append(proc.pid)
    return found


def _lines(agent: Agent, job_id: str, **kw: object) -> list[pb.LogLine]:
    msgs = agent.stub.Stream(pb.StreamRequest(job_id=job_id, **kw), timeout=60)
    return [ln for m in msgs for ln in m.lines]


def test_agent_sigkill_leaves_nothing_and_restart_remembers(
    tmp_path: Path, script: Callable[[str, str], str]
) -> None:
    log_dir = tmp_path / "logs"
    worker = script(
        "family.py",
        "import subprocess, sys, time\n"
        "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"  # left its session
        "subprocess.Popen(['sh', '-c', 'sleep 1000 & exit 0'])\n"  # orphaned grandchild
        "print('family started', flush=True)\n"
        "time.sleep(1000)\n",
    )
    agent = start_agent(log_dir)
    try:
        done = pb.JobSpec(job_id="done", nprocs=2, entrypoint=PY, args=["-c", "print('finished')"])
        agent.stub.Start(pb.StartRequest(spec=done), timeout=10)
        wait_until(lambda: agent.stub.Poll(pb.PollRequest(job_id="done")).job.state == pb.SUCCEEDED)
        live = pb.JobSpec(job_id="live", nprocs=8, entrypoint=PY, args=[worker])
        agent.stub.Start(pb.StartRequest(spec=live), timeout=10)
        wait_until(lambda: len(_lines(agent, "live")) == 8, 20, "8 ranks to start their family")
        wait_until(lambda: len(_marked_processes("/live/")) >= 24, 10, "ranks + grandchildren")
    finally:
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(10)
        agent.channel.close()
    wait_until(lambda: not _marked_processes("/live/"), 2.0, "every process of the job to die")

    again = start_agent(log_dir)
    try:
        jobs = {j.job_id: j for j in again.stub.List(pb.ListRequest(), timeout=5).jobs}
        assert set(jobs) == {"done", "live"}
        lost = again.stub.Poll(pb.PollRequest(job_id="live"), timeout=5).job
        assert lost.state == pb.FAILED
        assert "agent stopped while this attempt ran" in lost.reason
        assert len(lost.ranks) == 8 and all(r.state == pb.RANK_TERMINATED for r in lost.ranks)
        finished = again.stub.Poll(pb.PollRequest(job_id="done"), timeout=5).job
        assert finished.state == pb.SUCCEEDED
        assert [r.exit_code for r in finished.ranks] == [0, 0]
        assert sorted(ln.text for ln in _lines(again, "done", follow=True)) == ["finished"] * 2
        assert [ln.text for ln in _lines(again, "live", follow=True)] == ["family started"] * 8
        # the job goes on with its next attempt in the same run directory
        nxt = pb.JobSpec(
            job_id="live", nprocs=1, entrypoint=PY, args=["-c", "pass"], restart_count=1
        )
        resp = again.stub.Start(pb.StartRequest(spec=nxt), timeout=10)
        assert resp.job.run_dir == lost.run_dir and resp.job.attempt_dir.endswith("attempt_1")
    finally:
        again.stop()


def _agent_numbers(pid: int) -> tuple[int, int, int]:
    proc = psutil.Process(pid)
    return proc.num_fds(), proc.num_threads(), proc.memory_info().rss


@pytest.mark.timeout(300)
def test_many_sequential_jobs_keep_resources_flat(agent: Agent) -> None:
    def run(i: int) -> None:
        spec = pb.JobSpec(
            job_id=f"seq-{i}", nprocs=2, entrypoint="/bin/sh", args=["-c", "echo out; echo err >&2"]
        )
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
        lines = _lines(agent, f"seq-{i}", follow=True)
        assert len(lines) == 4

    for i in range(30):  # warm-up: caches, gRPC pools, lazy imports
        run(i)
    fds0, threads0, rss0 = _agent_numbers(agent.proc.pid)
    for i in range(30, 330):
        run(i)
    # The next spare directory is made in the background after each Start, holding a few
    # descriptors for a moment: a leak stays, that does not.
    wait_until(
        lambda: _agent_numbers(agent.proc.pid)[0] <= fds0 + 2,
        timeout=10,
        what=f"the agent's descriptors back to {fds0} + 2",
    )
    fds1, threads1, rss1 = _agent_numbers(agent.proc.pid)
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert threads1 <= threads0 + 1, (threads0, threads1)
    # 300 job records stay in memory (a few KB each); a leak of pidfds, watches or
    # readers would cost far more.
    assert rss1 - rss0 < 15 * 1024 * 1024, (rss0, rss1)
    assert not psutil.Process(agent.proc.pid).children()[1:]  # only the guardian remains


def test_sixteen_concurrent_streams_get_every_line(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    n = 20_000
    worker = script(
        "flat.py",
        "import os, sys\n"
        "r = os.environ['LOCAL_RANK']\n"
        f"sys.stdout.writelines(f'{{r}} {{i}} ' + 'y' * 90 + '\\n' for i in range({n}))\n",
    )
    agent.stub.Start(
        pb.StartRequest(spec=pb.JobSpec(job_id="flat", nprocs=4, entrypoint=PY, args=[worker]))
    )
    results: list[list[pb.LogLine] | BaseException] = [[] for _ in range(16)]

    def client(k: int) -> None:
        try:
            results[k] = _lines(agent, "flat", follow=True)
        except BaseException as err:
            results[k] = err

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for got in results:
        assert not isinstance(got, BaseException), got
        for r in range(4):
            texts = [ln.text.split(" y")[0].rstrip("y ") for ln in got if ln.local_rank == r]
            assert len(texts) == n
            assert texts == [f"{r} {i}" for i in range(n)]


@pytest.mark.timeout(180)
def test_huge_line_keeps_agent_memory_bounded(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    size = 100 * 1024 * 1024
    worker = script(
        "huge.py",
        "import os, sys\n"
        "if os.environ['LOCAL_RANK'] == '0':\n"
        "    chunk = b'z' * (1024 * 1024)\n"
        f"    for _ in range({size} // len(chunk)):\n"
        "        sys.stdout.buffer.write(chunk)\n"
        "    sys.stdout.buffer.write(b'\\nend\\n')\n"
        "else:\n"
        "    for i in range(1000):\n"
        "        print('small', i, flush=True)\n",
    )
    rss_before = psutil.Process(agent.proc.pid).memory_info().rss
    agent.stub.Start(
        pb.StartRequest(spec=pb.JobSpec(job_id="huge", nprocs=2, entrypoint=PY, args=[worker]))
    )
    peak = 0
    total = 0
    small = []
    last_texts: list[str] = []
    for msg in agent.stub.Stream(pb.StreamRequest(job_id="huge", follow=True), timeout=150):
        peak = max(peak, psutil.Process(agent.proc.pid).memory_info().rss)
        for ln in msg.lines:
            if ln.local_rank == 0:
                total += len(ln.text)
                last_texts = ([*last_texts, ln.text])[-2:]
                assert len(ln.text.encode()) <= 64 * 1024
            else:
                small.append(ln.text)
    assert total == size + len("end")
    assert last_texts[-1] == "end"
    assert small == [f"small {i}" for i in range(1000)]
    # bound: 64 MiB over the agent's resting size, for a 100 MiB line without newline
    assert peak - rss_before < 64 * 1024 * 1024, (rss_before, peak)


def test_rank_whose_log_file_is_deleted_and_closed_stdout(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    worker = script(
        "odd.py",
        "import os, sys, time\n"
        "r = os.environ['LOCAL_RANK']\n"
        "if r == '0':\n"
        "    print('before close', flush=True)\n"
        "    os.close(1)\n"
        "    print('still alive', file=sys.stderr, flush=True)\n"
        "else:\n"
        "    d = os.path.dirname(os.environ['TORCHELASTIC_ERROR_FILE'])\n"
        "    os.unlink(os.path.join(d, 'stdout.log'))\n"
        "    print('into the void', flush=True)\n",
    )
    agent.stub.Start(
        pb.StartRequest(spec=pb.JobSpec(job_id="odd", nprocs=2, entrypoint=PY, args=[worker]))
    )
    wait_until(lambda: agent.stub.Poll(pb.PollRequest(job_id="odd")).job.state != pb.RUNNING)
    status = agent.stub.Poll(pb.PollRequest(job_id="odd")).job
    assert status.state == pb.SUCCEEDED
    texts = sorted((ln.local_rank, ln.text) for ln in _lines(agent, "odd", follow=True))
    assert (0, "before close") in texts and (0, "still alive") in texts
    assert os.path.exists(status.ranks[0].stdout_path)


def test_max_jobs_forgets_the_oldest_ended_jobs(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "logs", "--max-jobs", "3")
    try:
        for i in range(5):
            spec = pb.JobSpec(job_id=f"old-{i}", nprocs=1, entrypoint="/bin/true")
            agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
            _lines(agent, f"old-{i}", follow=True)
        held = [j.job_id for j in agent.stub.List(pb.ListRequest(), timeout=5).jobs]
        assert held == ["old-2", "old-3", "old-4"]
        runs = [p for p in (tmp_path / "logs").iterdir() if not p.name.startswith(PREFIX)]
        assert len(runs) == 5  # nothing deleted on disk
    finally:
        agent.stop()


def test_guardian_ignores_a_shadowing_working_directory(tmp_path: Path) -> None:
    """An agent started from a folder holding `agent/` and `rankd/` packages still gets
    a working guardian: a SIGKILLed agent leaves no rank behind."""
    for name in ("agent", "rankd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    agent = start_agent(tmp_path / "logs", cwd=tmp_path)
    try:
        spec = pb.JobSpec(job_id="shadow", nprocs=2, entrypoint=PY, args=["-c", _SLEEPER])
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
        wait_until(lambda: len(_marked_processes("/shadow/")) == 2, 20, "2 ranks")
        agent.stop(signal.SIGKILL)
        wait_until(lambda: not _marked_processes("/shadow/"), 10, "the guardian's sweep")
    finally:
        agent.stop(signal.SIGKILL)


_SLEEPER = "import time; print('up', flush=True); time.sleep(1000)"


def _bare_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv of this interpreter without any package (rankd neither): its python and its
    site-packages."""
    venv = tmp_path / "venv"
    made = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv: {made.stderr.strip()}")
    site = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    return venv / "bin" / "python", Path(site)


def _checkout(tmp_path: Path) -> Path:
    """rankd as a folder to put on PYTHONPATH (links to the modules this test imports)."""
    root = tmp_path / "checkout"
    package = root / "rankd"
    package.mkdir(parents=True)
    (package / "__init__.py").symlink_to(Path(rankd.__file__ or ""))
    for name, module in (
        ("v1", rankd.v1),
        ("agent", rankd.agent),
        ("client", rankd.client),
        ("testing", rankd.testing),
    ):
        (package / name).symlink_to(Path(module.__file__ or "").parent)
    return root


def _pythonpath_agent(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    """How to run an agent from a PYTHONPATH checkout with an interpreter that has no
    rankd of its own: its command, its environment, the interpreter's site-packages."""
    python, site = _bare_venv(tmp_path)
    deps = sysconfig.get_path("purelib")  # grpc & co. (its .pth files are not read)
    env = {**os.environ, "PYTHONPATH": f"{_checkout(tmp_path)}{os.pathsep}{deps}"}
    return [str(python), "-P", "-m", "rankd.agent.server"], env, site


def test_an_agent_run_from_a_pythonpath_checkout_has_a_working_guardian(
    tmp_path: Path,
) -> None:
    """The guardian runs isolated (`python -I`: no PYTHONPATH, no working directory), yet
    it imports the rankd the agent runs, which only PYTHONPATH holds here."""
    command, env, _ = _pythonpath_agent(tmp_path)
    isolated = subprocess.run(
        [command[0], "-I", "-c", "import rankd"], env=env, capture_output=True, text=True
    )
    assert "No module named 'rankd'" in isolated.stderr  # on its own it would not find it
    agent = Agent.adopt(start_local_agent(tmp_path / "logs", command=command, env=env))
    try:
        guardian = agent.stub.Info(pb.InfoRequest(), timeout=5).guardian_pid
        cmdline = psutil.Process(guardian).cmdline()
        assert cmdline[1:3] == ["-I", "-c"] and cmdline[4] == str(tmp_path / "checkout")
        spec = pb.JobSpec(job_id="pp", nprocs=2, entrypoint=PY, args=["-c", _SLEEPER])
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
        wait_until(lambda: len(_marked_processes("/pp/")) == 2, 20, "2 ranks")
        agent.stop(signal.SIGKILL)
        wait_until(lambda: not _marked_processes("/pp/"), 10, "the guardian's sweep")
    finally:
        agent.stop(signal.SIGKILL)


def test_agent_refuses_to_start_without_its_guardian(tmp_path: Path) -> None:
    """A guardian that dies at start makes the agent exit 2 with one line naming the
    cause, and leaves no process. Here the interpreter's own site hook (a sitecustomize
    in its site-packages, which isolation does not skip) kills it, in it alone."""
    command, env, site = _pythonpath_agent(tmp_path)
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if 'rankd.agent.guardian' in ' '.join(sys.orig_argv):\n"
        "    sys.stderr.write('guardian cannot start: no room\\n')\n"
        "    os._exit(1)\n"
    )
    done = subprocess.run(
        [*command, "--port", "0", "--log-dir", str(tmp_path / "logs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # never said "listening on"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("rankd-agent: error: the guardian"), done.stderr
    assert last.endswith("guardian cannot start: no room"), done.stderr


def test_a_dead_guardian_is_replaced_and_the_new_one_still_guards(tmp_path: Path) -> None:
    """SIGKILL the guardian: the agent sees it die (pidfd), says so and starts a new one;
    SIGKILL the agent then: the new guardian kills the ranks."""
    agent = start_agent(tmp_path / "logs")
    try:
        first = agent.stub.Info(pb.InfoRequest(), timeout=5).guardian_pid
        assert first > 0
        os.kill(first, signal.SIGKILL)

        def replaced() -> bool:
            return agent.stub.Info(pb.InfoRequest(), timeout=5).guardian_pid not in (0, first)

        wait_until(replaced, 20, "a new guardian")
        info = agent.stub.Info(pb.InfoRequest(), timeout=5)
        assert info.guardian_restarts == 1
        assert not psutil.pid_exists(first)  # reaped, not a zombie
        said = agent.stderr_tail(50)
        assert f"the guardian (pid {first}) died (signal SIGKILL); starting a new one" in said
        assert f"a new guardian (pid {info.guardian_pid}) is armed" in said
        spec = pb.JobSpec(job_id="guarded", nprocs=2, entrypoint=PY, args=["-c", _SLEEPER])
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
        wait_until(lambda: len(_marked_processes("/guarded/")) == 2, 20, "2 ranks")
        agent.stop(signal.SIGKILL)
        wait_until(lambda: not _marked_processes("/guarded/"), 10, "the new guardian's sweep")
    finally:
        agent.stop(signal.SIGKILL)
