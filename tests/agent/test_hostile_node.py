"""The agent on a hostile node (issue 19): every stop signal whatever the disposition it
inherited, inotify used up, a full log disk, low descriptor limits. Real agents, real
limits: the root-only cases (sysctls, a tmpfs) skip elsewhere with the reason."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from helpers.agents import AGENT_BIN, Agent
from helpers.core import PYTHON
from helpers.wait import wait_until

from rankd.agent.errors import LimitExceeded
from rankd.agent.follow import LogWatcher
from rankd.agent.launch import Launcher
from rankd.agent.procs import MARKER_ENV
from rankd.agent.spares import SpareDirs
from rankd.agent.specs import JobSpec, Limits
from rankd.agent.supervisor import Supervisor
from rankd.testing import start_agent
from rankd.v1 import agent_pb2 as pb

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (sysctls, mount, limits)")


def _agent(
    log_dir: Path,
    *args: str,
    shell: str = "",
    env: dict[str, str] | None = None,
    log_level: str = "INFO",
) -> Agent:
    """A real agent; `shell`, if given, runs in bash before it (`ulimit`, `trap`), which
    then execs the agent."""
    command = None
    if shell:
        command = ["bash", "-c", f'{shell}; exec "$0" "$@"', AGENT_BIN]
    local = start_agent(log_dir, *args, command=command, env=env, log_level=log_level)
    return Agent.adopt(local)


def _info(agent: Agent) -> pb.InfoResponse:
    return agent.stub.Info(pb.InfoRequest(), timeout=10)


def _start(agent: Agent, job_id: str, nprocs: int, *args: str) -> pb.StartResponse:
    spec = pb.JobSpec(job_id=job_id, nprocs=nprocs, entrypoint=PYTHON, args=list(args))
    return agent.stub.Start(pb.StartRequest(spec=spec), timeout=30)


def _poll(agent: Agent, job_id: str) -> pb.JobStatus:
    return agent.stub.Poll(pb.PollRequest(job_id=job_id), timeout=10).job


def _texts(agent: Agent, job_id: str, **kw: object) -> list[str]:
    msgs = agent.stub.Stream(pb.StreamRequest(job_id=job_id, **kw), timeout=60)
    return [ln.text for m in msgs for ln in m.lines]


def _marked(job_id: str) -> list[int]:
    """Live processes of `job_id` (by their attempt marker; zombies have no environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            value = proc.environ().get(MARKER_ENV, "")
        except psutil.Error:
            continue
        if f"/{job_id}/" in value:
            found.append(proc.pid)
    return found


def _stderr(agent: Agent) -> str:
    return "".join(agent.stderr_lines)


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


# -- signals -------------------------------------------------------------------------------

# Says which of the four stop signals and SIGUSR1 (a preemption notice, see
# KillRequest.no_escalate) reach it ignored, and answers SIGTERM by saying so and dying
# of it.
TERMINABLE = """
import os, signal, time
def on_term(sig, frame):
    print("got SIGTERM", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
signal.signal(signal.SIGTERM, on_term)
with open("/proc/self/status") as f:
    mask = int(next(l for l in f if l.startswith("SigIgn:")).split()[1], 16)
stops = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1)
print("ignored:", [s.name for s in stops if mask & (1 << (s - 1))], flush=True)
while True:
    time.sleep(1)
"""

# A shell's `cmd &` and nohup leave the first three ignored in the agent; the agent does
# not handle SIGUSR1, so only its spawn can keep a rank from inheriting it ignored.
IGNORING = 'trap "" HUP INT QUIT USR1'


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name
)
def test_each_stop_signal_is_an_orderly_teardown_whatever_was_ignored(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Started with SIGHUP, SIGINT and SIGQUIT ignored, the agent still stops on each of
    the four: its ranks get SIGTERM first (and none of them inherits an ignored stop
    signal), a final job.json says KILLED, and it ends by the same signal, naming it."""
    worker = tmp_path / "terminable.py"
    worker.write_text(TERMINABLE)
    agent = _agent(tmp_path / "logs", shell=IGNORING)
    try:
        run_dir = _start(agent, "sig", 2, "-u", str(worker)).job.run_dir
        wait_until(lambda: len(_texts(agent, "sig")) == 2, 20, "both ranks to start")
        assert _texts(agent, "sig") == ["ignored: []"] * 2
        started = time.monotonic()
        agent.proc.send_signal(sig)
        assert agent.proc.wait(30) == -sig
        assert time.monotonic() - started < 10
    finally:
        agent.stop(signal.SIGKILL)
    for rank in (0, 1):
        out = (Path(run_dir) / "attempt_0" / str(rank) / "stdout.log").read_text()
        assert out.splitlines() == ["ignored: []", "got SIGTERM"]
    record = json.loads((Path(run_dir) / "job.json").read_text())["attempts"][0]
    assert record["state"] == "KILLED" and record["reason"] == "agent shutting down"
    assert [r["exit_code"] for r in record["ranks"]] == [-signal.SIGTERM] * 2
    wait_until(lambda: "stopped on" in _stderr(agent), 5, "the agent's last line")
    assert f"stopping on {sig.name}: SIGTERM to every rank" in _stderr(agent)
    assert f"stopped on {sig.name}" in _stderr(agent)
    assert not _marked("sig")


STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
print("up", flush=True)
while True:
    time.sleep(1)
"""


def test_a_second_signal_during_the_teardown_kills_the_ranks_at_once(tmp_path: Path) -> None:
    worker = tmp_path / "stubborn.py"
    worker.write_text(STUBBORN)
    agent = _agent(tmp_path / "logs", "--shutdown-timeout", "120")
    try:
        run_dir = _start(agent, "stubborn", 2, "-u", str(worker)).job.run_dir
        wait_until(lambda: len(_texts(agent, "stubborn")) == 2, 20, "both ranks to start")
        agent.proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: _texts(agent, "stubborn").count("ignoring SIGTERM") == 2, 20, "SIGTERM seen"
        )
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGINT)
        assert agent.proc.wait(30) == -signal.SIGTERM  # the first signal ends it
        assert time.monotonic() - started < 10  # not the 120 s of --shutdown-timeout
    finally:
        agent.stop(signal.SIGKILL)
    assert not _marked("stubborn")
    record = json.loads((Path(run_dir) / "job.json").read_text())["attempts"][0]
    assert [r["exit_code"] for r in record["ranks"]] == [-signal.SIGKILL] * 2
    assert "SIGINT during the teardown: SIGKILL to every rank now" in _stderr(agent)


def test_an_idle_agent_stops_within_half_a_second(tmp_path: Path) -> None:
    """Idle: no job runs, but a client still watches an ended job (what `rankd launch`
    leaves open), the case that waited out the server's grace period."""
    times = []
    for i in range(3):
        agent = _agent(tmp_path / f"logs{i}", "--health-port", "0", log_level="WARNING")
        try:
            spec = pb.JobSpec(job_id="done", nprocs=2, entrypoint="/bin/true")
            agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
            wait_until(lambda a=agent: _poll(a, "done").end_time > 0, 10, "the job to end")
            watch = agent.stub.Watch(pb.WatchRequest(job_id="done"))
            next(watch)
            started = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            assert agent.proc.wait(30) == -signal.SIGTERM
            times.append(time.monotonic() - started)
            watch.cancel()
        finally:
            agent.stop(signal.SIGKILL)
    assert min(times) <= 0.5, times


# -- inotify -------------------------------------------------------------------------------

SLOW_LINES = """
import sys, time
for i in range(40):
    print("line", i, flush=True)
    time.sleep(0.005)
"""


def _follow_works(agent: Agent, job_id: str, tmp_path: Path) -> None:
    worker = tmp_path / "slow.py"
    worker.write_text(SLOW_LINES)
    _start(agent, job_id, 2, "-u", str(worker))
    texts = _texts(agent, job_id, follow=True)
    assert sorted(texts) == sorted([f"line {i}" for i in range(40)] * 2)
    status = _poll(agent, job_id)
    assert all(r.last_output_time > 0 and r.stdout_bytes > 0 for r in status.ranks)


def _scrape(agent: Agent) -> str:
    line = next(ln for ln in agent.stderr_lines if ln.startswith("metrics on "))
    url = f"http://{line.split()[-1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


@pytest.mark.parametrize("how", ["env", "option"])
def test_poll_mode_is_forced_by_an_option_or_the_environment(tmp_path: Path, how: str) -> None:
    env = {**os.environ, "RANKD_LOG_FOLLOW": "poll"} if how == "env" else None
    args = ["--log-follow", "poll"] if how == "option" else []
    agent = _agent(tmp_path / "logs", *args, "--metrics-port", "0", env=env)
    try:
        assert _info(agent).log_follow == "poll"
        metrics = _scrape(agent)
        assert 'rankd_log_follow_mode{mode="poll"} 1.0' in metrics
        assert 'rankd_log_follow_mode{mode="inotify"} 0.0' in metrics
        assert "rankd_guardian_up 1.0" in metrics and "rankd_guardian_restarts_total 0.0" in metrics
        free = re.search(r"^rankd_log_dir_free_bytes (\S+)$", metrics, re.M)
        assert free is not None and float(free[1]) > 0
        _follow_works(agent, "polled", tmp_path)
    finally:
        agent.stop()


def test_inotify_is_the_default(tmp_path: Path) -> None:
    agent = _agent(tmp_path / "logs")
    try:
        info = _info(agent)
        assert (info.log_follow, info.polled_attempts) == ("inotify", 0)
    finally:
        agent.stop()


@contextlib.contextmanager
def _sysctl(name: str, value: int) -> Iterator[None]:
    """Set /proc/sys/fs/inotify/<name> for the duration (a global setting: kept short)."""
    path = Path("/proc/sys/fs/inotify") / name
    old = path.read_text()
    try:
        path.write_text(f"{value}\n")
    except OSError as err:
        pytest.skip(f"cannot set fs.inotify.{name}: {err}")
    try:
        yield
    finally:
        path.write_text(old)


@needs_root
def test_inotify_instances_used_up_fall_back_to_polling(tmp_path: Path) -> None:
    with _sysctl("max_user_instances", 0):
        agent = _agent(tmp_path / "logs", "--metrics-port", "0")
    try:
        assert _info(agent).log_follow == "poll"
        warnings = [ln for ln in agent.stderr_lines if "cannot use inotify" in ln]
        assert len(warnings) == 1, _stderr(agent)
        assert "following log files by polling every 25 ms instead" in warnings[0]
        assert "raise fs.inotify.max_user_instances (now 0)" in warnings[0]
        assert 'rankd_log_follow_mode{mode="poll"} 1.0' in _scrape(agent)
        _follow_works(agent, "polled", tmp_path)
    finally:
        agent.stop()


@needs_root
def test_inotify_watches_used_up_poll_that_attempt(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    worker = tmp_path / "gated.py"
    worker.write_text(
        "import os, time\n"
        f"while not os.path.exists({str(gate)!r}):\n"
        "    time.sleep(0.01)\n"
        "for i in range(40):\n"
        "    print('line', i, flush=True)\n"
    )
    agent = _agent(tmp_path / "logs")
    try:
        with _sysctl("max_user_watches", 0):
            _start(agent, "unwatched", 2, "-u", str(worker))
        info = _info(agent)
        assert (info.log_follow, info.polled_attempts) == ("inotify", 1)
        gate.touch()
        assert sorted(_texts(agent, "unwatched", follow=True)) == sorted(
            [f"line {i}" for i in range(40)] * 2
        )
        wait_until(lambda: _info(agent).polled_attempts == 0, 10, "the attempt's end")
        warnings = [ln for ln in agent.stderr_lines if "cannot watch" in ln]
        assert len(warnings) == 1 and "fs.inotify.max_user_watches" in warnings[0]
        _follow_works(agent, "watched", tmp_path)  # the next attempt is watched again
    finally:
        agent.stop()


async def test_a_failed_setup_leaves_nothing_half_built_and_the_next_start_retries(
    tmp_path: Path,
) -> None:
    sup = Supervisor(str(tmp_path / "logs"))
    spec = JobSpec(job_id="retry", nprocs=1, entrypoint="/bin/true")
    try:
        with _fds_left(0), pytest.raises(LimitExceeded) as raised:
            await sup.start(spec)  # binding to the loop needs an epoll descriptor
        assert re.fullmatch(
            r"out of file descriptors while setting up the supervisor: "
            r"0 free of \d+; raise `ulimit -n`",
            str(raised.value),
        )
        assert sup.jobs() == []
        await sup.start(spec)
        attempt = await asyncio.wait_for(sup.wait("retry"), 20)
        assert attempt.ranks[0].exit_code == 0
    finally:
        await sup.close(timeout=2.0)


# -- file descriptors ------------------------------------------------------------------------


@contextlib.contextmanager
def _fds_left(free: int) -> Iterator[None]:
    """This process with exactly `free` descriptors below a lowered soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # above every descriptor open, so that the agent's count of them tells the room left
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 32, hard))
    held: list[int] = []
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as err:
                if err.errno != errno.EMFILE:
                    raise
                break
        for _ in range(free):
            os.close(held.pop())
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_spawn_out_of_descriptors_is_a_limit_and_leaves_no_rank(tmp_path: Path) -> None:
    """One descriptor left: rank 0 starts and takes it for its pidfd, rank 1 cannot start
    (its child has none to open its log files with). Rank 0 is killed and reaped, the
    attempt's directories removed, and the error says what ran out."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    launcher = Launcher(str(log_dir), SpareDirs(str(log_dir)))
    watcher = LogWatcher("poll")
    spec = JobSpec(job_id="fds", nprocs=2, entrypoint="/bin/sleep", args=("60",))
    spec = spec.validate(Limits())
    before = psutil.Process().children()
    try:
        with _fds_left(1), pytest.raises(LimitExceeded) as raised:
            launcher.launch(spec, None, base_env={}, marker="test/fds/0", watcher=watcher)
    finally:
        watcher.close()
        launcher.close()
    assert re.fullmatch(
        r"out of file descriptors while starting 2 ranks: 2 ranks need about 6 "
        r"descriptors; 1 free of \d+; raise `ulimit -n`",
        str(raised.value),
    )
    assert psutil.Process().children() == before  # killed and reaped
    assert os.listdir(log_dir) == []


ONE_LINE_THEN_SLEEP = "import time; print('up', flush=True); time.sleep(60)"


def test_a_low_soft_fd_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard <= 256:
        pytest.skip(f"the hard limit ({hard}) is too low to raise to")
    agent = _agent(tmp_path / "logs", shell="ulimit -Sn 64")
    try:
        info = _info(agent)
        assert (info.fd_soft_limit, info.fd_hard_limit) == (hard, hard)
        assert f"open files limit: soft 64 raised to the hard limit {hard}" in _stderr(agent)
        worker = tmp_path / "forty.py"
        worker.write_text("import os; print('rank', os.environ['LOCAL_RANK'])\n")
        _start(agent, "forty", 40, str(worker))
        texts = _texts(agent, "forty", follow=True)
        assert sorted(texts) == sorted(f"rank {r}" for r in range(40))
        assert _poll(agent, "forty").state == pb.SUCCEEDED
    finally:
        agent.stop()


def test_a_low_hard_fd_limit_refuses_a_start_up_front_and_streams_fail_cleanly(
    tmp_path: Path,
) -> None:
    agent = _agent(tmp_path / "logs", shell="ulimit -n 64")
    try:
        info = _info(agent)
        assert (info.fd_soft_limit, info.fd_hard_limit) == (64, 64)
        code, details = _code(lambda: _start(agent, "forty", 40, "-c", "pass"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert re.fullmatch(
            r"not enough file descriptors: 40 ranks need about 120 descriptors; "
            r"\d+ free of 64; raise `ulimit -n`",
            details,
        ), details
        assert not agent.stub.List(pb.ListRequest(), timeout=5).jobs
        assert not [p for p in (tmp_path / "logs").iterdir() if p.name.startswith("forty")]

        # a job that fits, then followers that together need more than is left
        _start(agent, "six", 6, "-c", ONE_LINE_THEN_SLEEP)
        wait_until(lambda: len(_texts(agent, "six")) == 6, 20, "6 ranks up")
        streams = [
            agent.stub.Stream(pb.StreamRequest(job_id="six", follow=True), timeout=60)
            for _ in range(8)
        ]
        outcomes: list[object] = []

        def first(stream: object) -> None:
            try:
                outcomes.append(next(stream))  # type: ignore[call-overload]
            except grpc.RpcError as err:
                outcomes.append(err)

        threads = [threading.Thread(target=first, args=(s,)) for s in streams]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        assert errors, "8 followers of 6 ranks (96 files) fit in 64 descriptors?"
        for err in errors:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert re.fullmatch(
                r"out of file descriptors while streaming logs: \d+ free of 64; raise `ulimit -n`",
                err.details(),  # type: ignore[attr-defined]
            ), err.details()  # type: ignore[attr-defined]
        for stream in streams:
            stream.cancel()  # type: ignore[attr-defined]
        # the agent is fine: it kills the job, and a job that fits starts again
        kill = agent.stub.Kill(pb.KillRequest(job_id="six", timeout=5), timeout=30)
        assert kill.job.state == pb.KILLED
        assert not _marked("six")
        _start(agent, "again", 2, "-c", "print('fine')")
        assert _texts(agent, "again", follow=True) == ["fine", "fine"]
    finally:
        agent.stop()
    assert "Unexpected" not in _stderr(agent) and "Traceback" not in _stderr(agent)


# -- disk space ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only)."""
    if not ROOT:
        pytest.skip("needs root to mount a 2 MiB tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


FLOOD = """
import sys
chunk = b"x" * 65535 + b"\\n"
for _ in range(64):  # 4 MiB
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
"""


def test_a_full_log_disk_is_named_and_min_free_space_refuses(
    small_disk: Path, tmp_path: Path
) -> None:
    log_dir = small_disk / "logs"
    worker = tmp_path / "flood.py"
    worker.write_text(FLOOD)
    agent = _agent(log_dir, "--min-free-space", "1M")
    try:
        info = _info(agent)
        assert info.min_free_bytes == 1 << 20 and 0 < info.log_dir_free_bytes <= 2 << 20
        run_dir = Path(_start(agent, "flood", 1, str(worker)).job.run_dir)
        wait_until(lambda: _poll(agent, "flood").end_time > 0, 30, "the flood to end")
        status = _poll(agent, "flood")
        assert status.state == pb.FAILED
        note = f"log directory full: {log_dir} on {small_disk} (tmpfs), 0 B free"
        assert status.failures[0].message.endswith(f"; {note}"), status.failures[0].message
        assert note in status.reason
        assert _info(agent).log_dir_free_bytes == 0

        # the next Start is refused up front, naming path, free space and threshold
        code, details = _code(lambda: _start(agent, "next", 1, "-c", "pass"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == (
            f"log directory {log_dir} has 0 B free, less than --min-free-space 1 MiB; "
            "free some space there (old run directories can go) or lower --min-free-space"
        )
        assert not [p for p in log_dir.iterdir() if p.name.startswith("next")]

        # its final job.json could not be written: the job is held on, the failure
        # said once, and the record lands with the next one written
        wait_until(lambda: "cannot record job flood" in _stderr(agent), 10, "the warning")
        assert [j.job_id for j in agent.stub.List(pb.ListRequest(), timeout=5).jobs] == ["flood"]
        assert json.loads((run_dir / "job.json").read_text())["attempts"][0]["state"] == "RUNNING"
        (run_dir / "attempt_0" / "0" / "stdout.log").unlink()  # room again
        _start(agent, "after", 1, "-c", "print('room')")
        assert _texts(agent, "after", follow=True) == ["room"]
        wait_until(
            lambda: (
                json.loads((run_dir / "job.json").read_text())["attempts"][0]["state"] == "FAILED"
            ),
            10,
            "flood's record",
        )
    finally:
        agent.stop()
    err = _stderr(agent)
    assert err.count("cannot record job flood") == 1, err
    assert "No space left on device" in err and "Traceback" not in err
    assert "job flood is recorded again" in err


def test_min_free_space_takes_sizes_and_refuses_nonsense(tmp_path: Path) -> None:
    done = subprocess.run(
        [AGENT_BIN, "--port", "0", "--log-dir", str(tmp_path), "--min-free-space", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "argument --min-free-space: bad size 'lots': use bytes or a number with K, M or G" in (
        done.stderr
    )
    agent = _agent(tmp_path / "logs", "--min-free-space", "1.5G")
    try:
        assert _info(agent).min_free_bytes == 3 << 29
    finally:
        agent.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_info_shows_what_the_node_lends(agent: Agent) -> None:
    info = _info(agent)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert info.fd_hard_limit == hard and info.fd_soft_limit == hard  # raised
    assert 0 < info.open_fds < info.fd_soft_limit
    assert info.log_dir_free_bytes > 0 and info.min_free_bytes == 100 << 20
    assert info.guardian_pid > 0 and info.guardian_restarts == 0
    assert "rankd.agent.guardian" in " ".join(psutil.Process(info.guardian_pid).cmdline())
