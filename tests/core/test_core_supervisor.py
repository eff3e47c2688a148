"""The Supervisor on real processes: success, what a rank gets (env, args, cwd, session),
torch's log layout, attempts, idempotent Start, Kill of an ended job, close()."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers.core import PYTHON, Core, file_lines, wait_for_file_line

from rankd.agent.errors import AlreadyExists, JobNotFound, LimitExceeded
from rankd.agent.model import JobState, RankState
from rankd.agent.specs import JobSpec
from rankd.agent.supervisor import Supervisor

REPORT = """
    import json, os, sys
    print(json.dumps({
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "local_rank": os.environ.get("LOCAL_RANK"),
        "error_file": os.environ.get("TORCHELASTIC_ERROR_FILE"),
        "argv": sys.argv[1:],
        "env": {k: os.environ.get(k) for k in ("COMMON", "ONLY_RANK", "SHARED")},
        "cwd": os.getcwd(),
    }))
    print("to stderr", os.environ["LOCAL_RANK"], file=sys.stderr)
"""

SLEEPER = """
    import sys, time
    print("ready", flush=True)
    time.sleep(1000)
"""


async def test_success_states_codes_pids_times_env_args_cwd_session(core: Core) -> None:
    script = core.script("report.py", REPORT)
    workdir = core.tmp / "work"
    workdir.mkdir()
    spec = JobSpec(
        job_id="ok",
        nprocs=3,
        entrypoint=PYTHON,
        args=("-u", script, "--common", "two words"),
        rank_args={1: ("--only-one",), 2: ()},
        env={"COMMON": "c", "SHARED": "common"},
        rank_env={0: {"ONLY_RANK": "zero", "SHARED": "rank0"}},
        cwd=str(workdir),
    )
    before = time.time()
    attempt = await core.run(spec)
    after = time.time()

    assert attempt.state is JobState.SUCCEEDED
    assert attempt.reason == "every rank exited with code 0"
    assert attempt.failures() == []
    assert [r.state for r in attempt.ranks] == [RankState.SUCCEEDED] * 3
    assert [r.exit_code for r in attempt.ranks] == [0, 0, 0]
    assert [r.local_rank for r in attempt.ranks] == [0, 1, 2]
    assert all(r.failure is None and not r.terminated_by_agent for r in attempt.ranks)
    assert before <= attempt.start_time <= attempt.end_time <= after
    for rank in attempt.ranks:
        assert attempt.start_time <= rank.start_time <= rank.end_time <= attempt.end_time
        assert not rank.alive
        with pytest.raises(ChildProcessError):  # reaped: no zombie left behind
            os.waitpid(rank.pid, os.WNOHANG)

    reports = [json.loads(core.out_lines(attempt, r)[0]) for r in range(3)]
    assert len({r["pid"] for r in reports}) == 3
    my_sid = os.getsid(0)
    for local_rank, (rank, report) in enumerate(zip(attempt.ranks, reports, strict=True)):
        assert report["pid"] == rank.pid
        assert report["ppid"] == os.getpid()
        # each rank leads its own session and process group
        assert report["sid"] == report["pid"] == report["pgid"]
        assert report["sid"] != my_sid
        assert report["local_rank"] == str(local_rank)
        assert report["error_file"] == os.path.join(
            attempt.logs.attempt_dir, str(local_rank), "error.json"
        )
        assert report["error_file"] == rank.error_file
        assert report["cwd"] == str(workdir)
        assert core.err_lines(attempt, local_rank) == [f"to stderr {local_rank}"]
    assert [r["argv"] for r in reports] == [
        ["--common", "two words"],
        ["--common", "two words", "--only-one"],
        ["--common", "two words"],
    ]
    assert [r["env"] for r in reports] == [
        {"COMMON": "c", "ONLY_RANK": "zero", "SHARED": "rank0"},
        {"COMMON": "c", "ONLY_RANK": None, "SHARED": "common"},
        {"COMMON": "c", "ONLY_RANK": None, "SHARED": "common"},
    ]


async def test_log_layout(core: Core) -> None:
    script = core.script("two.py", 'import sys\nprint("out")\nprint("err", file=sys.stderr)\n')
    job, created = await core.sup.start(core.spec("layout", script, nprocs=2))
    assert created
    attempt = await asyncio.wait_for(core.sup.wait("layout"), 20)

    (run_name,) = core.log_entries()
    assert re.fullmatch(r"layout_[a-z0-9_]{8}", run_name), run_name
    run_dir = core.log_dir / run_name
    assert job.run_dir == str(run_dir)
    assert sorted(os.listdir(run_dir)) == ["attempt_0", "job.json"]
    attempt_dir = run_dir / "attempt_0"
    assert attempt.logs.attempt_dir == str(attempt_dir)
    assert sorted(os.listdir(attempt_dir)) == ["0", "1"]
    for r, rank in enumerate(attempt.ranks):
        assert sorted(os.listdir(attempt_dir / str(r))) == ["stderr.log", "stdout.log"]
        assert rank.stdout_path == str(attempt_dir / str(r) / "stdout.log")
        assert rank.stderr_path == str(attempt_dir / str(r) / "stderr.log")
        assert rank.error_file == str(attempt_dir / str(r) / "error.json")
        assert (attempt_dir / str(r) / "stdout.log").read_text() == "out\n"
        assert (attempt_dir / str(r) / "stderr.log").read_text() == "err\n"


async def test_same_spec_is_idempotent_other_spec_already_exists(core: Core) -> None:
    script = core.script("sleep.py", SLEEPER)
    job, created = await core.sup.start(core.spec("idem", script, nprocs=2))
    assert created
    pids = [r.pid for r in job.current.ranks]
    again, created_again = await core.sup.start(core.spec("idem", script, nprocs=2))
    assert created_again is False
    assert again is job
    assert [r.pid for r in again.current.ranks] == pids
    assert len(job.attempts) == 1
    assert len(core.log_entries()) == 1

    with pytest.raises(AlreadyExists, match=r"job 'idem' attempt 0 already exists with a"):
        await core.sup.start(core.spec("idem", script, nprocs=3))
    with pytest.raises(AlreadyExists, match=r"attempt 0 is still running; kill it before"):
        await core.sup.start(core.spec("idem", script, nprocs=2, restart_count=1))
    assert len(job.attempts) == 1
    assert len(core.log_entries()) == 1
    assert sorted(os.listdir(job.run_dir)) == ["attempt_0", "job.json"]
    assert all(r.alive for r in job.current.ranks)


async def test_next_attempt_keeps_the_earlier_attempts_directory(core: Core) -> None:
    script = core.script(
        "attempt.py",
        """
        import os
        print("attempt", os.environ["TORCHELASTIC_ERROR_FILE"].split("/")[-3],
              "rank", os.environ["LOCAL_RANK"])
        """,
    )
    first = await core.run(core.spec("again", script, nprocs=2))
    assert first.state is JobState.SUCCEEDED
    job = core.sup.job("again")
    second = await core.run(core.spec("again", script, nprocs=2, restart_count=1))
    assert second.state is JobState.SUCCEEDED

    assert job.attempts == [first, second]
    assert job.current is second
    assert job.attempt(0) is first and job.attempt(1) is second and job.attempt(None) is second
    with pytest.raises(JobNotFound, match=r"job 'again' has no attempt 5 \(has: 0, 1\)"):
        job.attempt(5)
    assert len(core.log_entries()) == 1
    assert sorted(os.listdir(job.run_dir)) == ["attempt_0", "attempt_1", "job.json"]
    for r in range(2):
        assert core.out_lines(first, r) == [f"attempt attempt_0 rank {r}"]
        assert core.out_lines(second, r) == [f"attempt attempt_1 rank {r}"]
    assert second.logs.attempt_dir == os.path.join(job.run_dir, "attempt_1")

    with pytest.raises(AlreadyExists, match=r"already at attempt 1; attempt 0 cannot run again"):
        await core.sup.start(core.spec("again", script, nprocs=2))
    assert sorted(os.listdir(job.run_dir)) == ["attempt_0", "attempt_1", "job.json"]


async def test_an_existing_attempt_directory_is_never_reused(core: Core) -> None:
    script = core.script("noop.py", "print('first')\n")
    await core.run(core.spec("reuse", script))
    job = core.sup.job("reuse")
    squatter = Path(job.run_dir, "attempt_1")
    squatter.mkdir()
    (squatter / "keep.txt").write_text("mine")
    with pytest.raises(AlreadyExists, match=r"attempt_1 exists already; attempts are never"):
        await core.sup.start(core.spec("reuse", script, restart_count=1))
    assert (squatter / "keep.txt").read_text() == "mine"
    assert os.listdir(squatter) == ["keep.txt"]
    assert len(job.attempts) == 1
    assert core.out_lines(job.current, 0) == ["first"]


async def test_kill_of_an_ended_job_changes_nothing(core: Core) -> None:
    script = core.script("noop.py", "pass\n")
    attempt = await core.run(core.spec("done", script, nprocs=2))
    end_time, reason = attempt.end_time, attempt.reason
    started = time.monotonic()
    killed = await core.sup.kill("done", signal.SIGKILL, 30.0)
    assert time.monotonic() - started < 10.0  # did not wait out the 30 s
    assert killed is attempt
    assert attempt.state is JobState.SUCCEEDED
    assert (attempt.end_time, attempt.reason) == (end_time, reason)
    assert [(r.state, r.exit_code, r.terminated_by_agent) for r in attempt.ranks] == [
        (RankState.SUCCEEDED, 0, False)
    ] * 2


async def test_unknown_job_is_not_found(core: Core) -> None:
    with pytest.raises(JobNotFound, match=r"no job 'nope' on this agent"):
        core.sup.job("nope")
    with pytest.raises(JobNotFound):
        await core.sup.kill("nope")
    with pytest.raises(JobNotFound):
        await core.sup.wait("nope")


async def test_close_kills_running_jobs(core: Core) -> None:
    script = core.script("sleep.py", SLEEPER)
    job, _ = await core.sup.start(core.spec("closing", script, nprocs=2))
    for rank in job.current.ranks:
        await wait_for_file_line(rank.stdout_path)
    await asyncio.wait_for(core.sup.close(timeout=5.0), 10)
    attempt = job.current
    assert attempt.ended
    assert attempt.state is JobState.KILLED
    assert attempt.reason == "agent shutting down"
    assert [(r.state, r.exit_code, r.terminated_by_agent) for r in attempt.ranks] == [
        (RankState.TERMINATED, -signal.SIGTERM, True)
    ] * 2


async def test_max_jobs_forgets_the_job_that_ended_longest_ago(tmp_path: Path) -> None:
    sup = Supervisor(str(tmp_path / "logs"), max_jobs=3)

    async def run(job_id: str, restart_count: int = 0) -> None:
        spec = JobSpec(job_id=job_id, nprocs=1, entrypoint="/bin/true", restart_count=restart_count)
        await sup.start(spec)
        await asyncio.wait_for(sup.wait(job_id), 20)

    try:
        for job_id in ("a", "b", "c"):
            await run(job_id)
        await run("a", restart_count=1)  # a ended again, after b and c
        await run("d")
        assert sorted(j.job_id for j in sup.jobs()) == ["a", "c", "d"]
        await run("e")
        assert sorted(j.job_id for j in sup.jobs()) == ["a", "d", "e"]
        sleeping = JobSpec(job_id="f", nprocs=1, entrypoint="/bin/sleep", args=("30",))
        await sup.start(sleeping)  # forgets a; then only running or newer jobs remain
        assert sorted(j.job_id for j in sup.jobs()) == ["d", "e", "f"]
    finally:
        await sup.close(timeout=2.0)

    # a new Supervisor restores the newest three and forgets in the order they ended
    sup = Supervisor(str(tmp_path / "logs"), max_jobs=3)
    try:
        assert sorted(j.job_id for j in sup.jobs()) == ["d", "e", "f"]
        await run("g")
        assert sorted(j.job_id for j in sup.jobs()) == ["e", "f", "g"]
    finally:
        await sup.close(timeout=2.0)


async def test_running_ranks_limit_starts_nothing(tmp_path: Path) -> None:
    sup = Supervisor(str(tmp_path / "logs"), max_running_ranks=2)
    try:
        spec = JobSpec(job_id="big", nprocs=3, entrypoint=PYTHON, args=("-c", "pass"))
        with pytest.raises(LimitExceeded, match=r"limit of 2 running ranks \(0 running\)"):
            await sup.start(spec)
        assert os.listdir(tmp_path / "logs") == []
        assert sup.jobs() == []
    finally:
        await sup.close(timeout=2.0)


async def test_ended_jobs_are_restored_by_a_new_supervisor(core: Core) -> None:
    script = core.script("fail.py", "import sys\nprint('bye', file=sys.stderr)\nsys.exit(4)\n")
    attempt = await core.run(core.spec("restored", script))
    assert attempt.state is JobState.FAILED
    other = Supervisor(str(core.log_dir))
    try:
        old = other.job("restored").current
        assert old.ended
        assert old.state is JobState.FAILED
        assert old.reason == attempt.reason
        assert [(r.pid, r.exit_code, r.state) for r in old.ranks] == [
            (attempt.ranks[0].pid, 4, RankState.FAILED)
        ]
        assert old.failures() == attempt.failures()
        assert file_lines(old.ranks[0].stderr_path) == ["bye"]
    finally:
        await other.close(timeout=2.0)


async def test_a_shell_script_entrypoint_with_rank_args(core: Core) -> None:
    worker = core.shell("worker.sh", 'echo "rank $LOCAL_RANK: $*"\necho "to err" >&2\n')
    spec = JobSpec(
        job_id="sh", nprocs=2, entrypoint=worker, args=("a", "b c"), rank_args={1: ("d",)}
    )
    attempt = await core.run(spec)
    assert attempt.state is JobState.SUCCEEDED
    assert attempt.spec.entrypoint == worker
    assert [core.out_lines(attempt, r) for r in range(2)] == [
        ["rank 0: a b c"],
        ["rank 1: a b c d"],
    ]
    assert [core.err_lines(attempt, r) for r in range(2)] == [["to err"], ["to err"]]


async def test_a_large_attempt_is_started_by_spawn_threads_each_rank_as_itself(
    core: Core,
) -> None:
    """More than 8 ranks are started side by side by spawn threads: every rank still
    gets its own local rank, its own files, and its slot in the attempt."""
    script = core.script(
        "me.py", "import os\nprint(os.environ['LOCAL_RANK'], os.getpid(), os.getppid())\n"
    )
    attempt = await core.run(core.spec("wide", script, nprocs=20))
    assert any(t.name.startswith("rankd-spawn") for t in threading.enumerate())
    assert attempt.state is JobState.SUCCEEDED
    assert [r.local_rank for r in attempt.ranks] == list(range(20))
    assert len({r.pid for r in attempt.ranks}) == 20
    for rank in attempt.ranks:
        assert core.out_lines(attempt, rank.local_rank) == [
            f"{rank.local_rank} {rank.pid} {os.getpid()}"
        ]
        assert rank.state is RankState.SUCCEEDED
