"""Failures as torch's ProcessFailure: fail-fast, signals, both error-file formats, corrupt
files, stderr tails, timestamps and the root cause."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from pathlib import Path

import pytest
from helpers.core import Core, file_lines, wait_for_file_line

from rankd.agent.failures import NOT_AVAILABLE, Failure, read_failure, root_cause, stderr_tail
from rankd.agent.logs import STDOUT
from rankd.agent.model import JobState, RankState


async def test_one_rank_exits_3_and_the_others_are_terminated(core: Core) -> None:
    script = core.script(
        "failfast.py",
        """
        import os, sys, time
        if os.environ["LOCAL_RANK"] == "1":
            print("fatal: rank 1 gives up", file=sys.stderr)
            print(repr(time.time()), flush=True)
            sys.exit(3)
        time.sleep(1000)
        """,
    )
    attempt = await core.run(core.spec("failfast", script, nprocs=4))
    by_rank = attempt.ranks
    bad = by_rank[1]

    assert attempt.state is JobState.FAILED
    assert attempt.reason == f"local rank 1 failed: Process {bad.pid} exited with code 3"
    assert [(r.state, r.exit_code, r.terminated_by_agent) for r in by_rank] == [
        (RankState.TERMINATED, -signal.SIGTERM, True),
        (RankState.FAILED, 3, False),
        (RankState.TERMINATED, -signal.SIGTERM, True),
        (RankState.TERMINATED, -signal.SIGTERM, True),
    ]

    failures = attempt.failures()
    assert failures[0].local_rank == 1
    assert sorted(f.local_rank for f in failures) == [0, 1, 2, 3]
    root = failures[0]
    assert root is bad.failure
    assert root_cause(failures) is root
    shuffled = failures[:]
    random.Random(7).shuffle(shuffled)
    assert root_cause(shuffled) is root
    assert (root.pid, root.exit_code, root.signal_name) == (bad.pid, 3, "")
    assert root.message == f"Process {bad.pid} exited with code 3"
    assert root.stderr_tail == ["fatal: rank 1 gives up"]
    assert (root.error_file, root.error_file_data, root.traceback) == (NOT_AVAILABLE, "", "")
    assert root.error_file_problem == ""
    assert not root.terminated_by_agent

    # the exit time as it happened, with sub-second precision
    said = float(core.out_lines(attempt, 1)[0])
    assert root.timestamp == bad.end_time
    assert said <= root.timestamp < said + 1.0
    assert root.timestamp % 1 != 0

    for f in failures[1:]:
        rank = by_rank[f.local_rank]
        assert f is rank.failure
        assert f.terminated_by_agent
        assert (f.pid, f.exit_code, f.signal_name) == (rank.pid, -15, "SIGTERM")
        assert f.message == f"Signal 15 (SIGTERM) received by PID {rank.pid}"
        assert f.stderr_tail == []
        assert f.timestamp == rank.end_time
        assert f.timestamp % 1 != 0
        assert f.timestamp > root.timestamp
    assert [f.timestamp for f in failures[1:]] == sorted(f.timestamp for f in failures[1:])


async def test_rank_killed_by_sigsegv(core: Core) -> None:
    script = core.script(
        "segv.py",
        """
        import ctypes, resource, sys
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        print("about to crash", file=sys.stderr, flush=True)
        ctypes.string_at(0)
        """,
    )
    attempt = await core.run(core.spec("segv", script, cwd=str(core.tmp)))
    (rank,) = attempt.ranks
    assert attempt.state is JobState.FAILED
    assert (rank.state, rank.exit_code) == (RankState.FAILED, -signal.SIGSEGV)
    failure = rank.failure
    assert failure is not None
    assert failure.signal_name == "SIGSEGV"
    assert failure.message == f"Signal 11 (SIGSEGV) received by PID {rank.pid}"
    assert failure.stderr_tail == ["about to crash"]
    assert attempt.reason == f"local rank 0 failed: Signal 11 (SIGSEGV) received by PID {rank.pid}"


async def test_rank_killed_by_sigkill_from_outside(core: Core) -> None:
    script = core.script("sleep.py", "import time\nprint('ready')\ntime.sleep(1000)\n")
    job, _ = await core.sup.start(core.spec("oom", script, nprocs=2))
    for rank in job.current.ranks:
        await wait_for_file_line(rank.stdout_path)
    victim = job.current.ranks[0]
    os.kill(victim.pid, signal.SIGKILL)  # as the OOM killer would
    attempt = await core.sup.wait("oom")
    assert attempt.state is JobState.FAILED
    assert [(r.state, r.exit_code) for r in attempt.ranks] == [
        (RankState.FAILED, -signal.SIGKILL),
        (RankState.TERMINATED, -signal.SIGTERM),
    ]
    root = attempt.failures()[0]
    assert root is victim.failure
    assert root.signal_name == "SIGKILL"
    assert root.message == f"Signal 9 (SIGKILL) received by PID {victim.pid}"
    assert not root.terminated_by_agent
    assert attempt.failures()[1].terminated_by_agent


async def test_error_file_message_string_format(core: Core) -> None:
    script = core.script(
        "errfile1.py",
        """
        import json, os, sys
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": "custom failure", "timestamp": 1000000000}, f)
        sys.exit(1)
        """,
    )
    attempt = await core.run(core.spec("fmt1", script))
    (rank,) = attempt.ranks
    failure = rank.failure
    assert failure is not None
    assert failure.message == "custom failure"
    assert failure.traceback == ""
    assert failure.timestamp == 1000000000.0
    assert failure.error_file == rank.error_file
    assert failure.error_file_data == Path(rank.error_file).read_text()
    assert json.loads(failure.error_file_data) == {
        "message": "custom failure",
        "timestamp": 1000000000,
    }
    assert failure.error_file_problem == ""
    assert failure.exit_code == 1
    assert attempt.reason == "local rank 0 failed: custom failure"
    assert sorted(os.listdir(Path(rank.error_file).parent)) == [
        "error.json",
        "stderr.log",
        "stdout.log",
    ]


async def test_error_file_torch_record_format(core: Core) -> None:
    # What torch's @record (ErrorHandler.record_exception) writes.
    script = core.script(
        "errfile2.py",
        """
        import json, os, traceback

        def train():
            raise ValueError("boom")

        try:
            train()
        except ValueError as e:
            data = {"message": {
                "message": f"{type(e).__name__}: {e}",
                "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": "1000000001"},
            }}
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump(data, f)
            raise
        """,
    )
    attempt = await core.run(core.spec("fmt2", script))
    (rank,) = attempt.ranks
    assert attempt.state is JobState.FAILED
    failure = rank.failure
    assert failure is not None
    written = json.loads(Path(failure.error_file).read_text())
    assert failure.message == "ValueError: boom"
    assert failure.traceback == written["message"]["extraInfo"]["py_callstack"]
    assert failure.traceback.startswith("Traceback (most recent call last):\n")
    assert "in train\n" in failure.traceback
    assert failure.traceback.endswith("ValueError: boom\n")
    assert failure.timestamp == 1000000001.0
    assert failure.exit_code == 1
    assert failure.error_file == rank.error_file
    assert failure.error_file_data == Path(rank.error_file).read_text()
    assert failure.error_file_problem == ""
    assert failure.stderr_tail[-1] == "ValueError: boom"
    assert attempt.reason == "local rank 0 failed: ValueError: boom"


async def test_error_file_stamped_now_keeps_the_precise_exit_time(core: Core) -> None:
    script = core.script(
        "errfile_now.py",
        """
        import json, os, sys, time
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": "now", "timestamp": int(time.time())}, f)
        sys.exit(5)
        """,
    )
    attempt = await core.run(core.spec("stampnow", script))
    (rank,) = attempt.ranks
    assert rank.failure is not None
    stamp = json.loads(Path(rank.error_file).read_text())["timestamp"]
    assert rank.failure.message == "now"
    assert stamp <= rank.failure.timestamp <= rank.end_time
    assert rank.end_time - rank.failure.timestamp < 1.0


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "JSONDecodeError"),
        ('{"message": "x", "timestamp": Infinity}', "OverflowError"),
        ('{"message": {"message": "x", "extraInfo": "abc"}}', "TypeError"),
    ],
)
async def test_corrupt_error_file_is_reported_not_raised(
    core: Core, content: str, problem: str
) -> None:
    script = core.script(
        "corrupt.py",
        f"""
        import os, sys
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            f.write({content!r})
        print("no traceback here", file=sys.stderr)
        sys.exit(1)
        """,
    )
    attempt = await core.run(core.spec("corrupt", script))
    (rank,) = attempt.ranks
    assert attempt.state is JobState.FAILED
    failure = rank.failure
    assert failure is not None
    assert failure.error_file_problem.startswith(
        f"corrupt error file {rank.error_file}: {problem}: "
    )
    assert failure.message == f"Process {rank.pid} exited with code 1"
    assert (failure.error_file, failure.error_file_data, failure.traceback) == (
        NOT_AVAILABLE,
        "",
        "",
    )
    assert failure.timestamp == rank.end_time
    assert failure.stderr_tail == ["no traceback here"]
    assert Path(rank.error_file).read_text() == content


async def test_no_error_file_carries_the_stderr_tail(core: Core) -> None:
    script = core.script(
        "tail.py",
        """
        import sys
        for i in range(30):
            print(f"err line {i}", file=sys.stderr)
        print("stdout is not in the tail")
        sys.exit(2)
        """,
    )
    attempt = await core.run(core.spec("tail", script))
    (rank,) = attempt.ranks
    failure = rank.failure
    assert failure is not None
    assert failure.stderr_tail == [f"err line {i}" for i in range(10, 30)]
    assert failure.message == f"Process {rank.pid} exited with code 2"
    assert failure.error_file == NOT_AVAILABLE
    assert failure.error_file_problem == ""
    assert not os.path.exists(rank.error_file)


# -- the pure functions ---------------------------------------------------------------


def _read(path: Path, exit_time: float = 1234.5, exit_code: int = 1) -> Failure:
    return read_failure(
        local_rank=0,
        pid=42,
        exit_code=exit_code,
        exit_time=exit_time,
        error_file=str(path),
        stderr_path=str(path.parent / "missing-stderr.log"),
        terminated_by_agent=False,
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "JSONDecodeError"),
        (b"", "JSONDecodeError"),
        (b"\xff\xfe\x00garbage", "JSONDecodeError"),
        (b"[1, 2]", "ValueError: no 'message' field"),
        (b'{"msg": "x"}', "ValueError: no 'message' field"),
        (b'{"message": 5}', "TypeError: 'message' is neither a string nor an object"),
        (b'{"message": null}', "TypeError"),
        (b'{"message": "x", "timestamp": "soon"}', "ValueError"),
        (b'{"message": "x", "timestamp": [1]}', "TypeError"),
        (b'{"message": "x", "timestamp": NaN}', "ValueError"),
        (b'{"message": "x", "timestamp": -Infinity}', "OverflowError"),
        (b'{"message": {"extraInfo": {"timestamp": 1e999}}}', "OverflowError"),
        (b'{"message": {"message": "x", "extraInfo": [1]}}', "TypeError"),
        (b'{"message": {"message": "x", "extraInfo": {"timestamp": "t"}}}', "ValueError"),
        (b"[" * 200_000, "RecursionError"),
        (b'{"message": "' + b"a" * (4 * 1024 * 1024) + b'"}', "ValueError: larger than"),
    ],
    ids=lambda v: v[:40].decode(errors="replace") if isinstance(v, bytes) else v,
)
def test_read_failure_corrupt_files(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "error.json"
    path.write_bytes(content)
    failure = _read(path)
    assert failure.error_file_problem.startswith(f"corrupt error file {path}: {problem}")
    assert failure.message == "Process 42 exited with code 1"
    assert failure.error_file == NOT_AVAILABLE
    assert failure.timestamp == 1234.5


def test_read_failure_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "error.json"
    path.write_text(json.dumps({"message": "m", "timestamp": 1234}))
    assert _read(path, exit_time=1234.5).timestamp == 1234.5  # same second: keep precision
    assert _read(path, exit_time=1300.25).timestamp == 1234.0  # earlier: the file's time
    assert _read(path, exit_time=1200.75).timestamp == 1200.75  # never later than the exit
    path.write_text(json.dumps({"message": "m"}))
    assert _read(path, exit_time=99.5).timestamp == 99.5
    path.write_text(json.dumps({"message": "", "timestamp": 5}))
    assert _read(path, exit_time=99.5).message == "Process 42 exited with code 1"


def test_read_failure_without_error_file(tmp_path: Path) -> None:
    (tmp_path / "error.json").mkdir()  # not a regular file: said, never read
    failure = _read(tmp_path / "error.json", exit_code=-signal.SIGABRT)
    assert failure.error_file_problem.endswith(
        "error.json is a directory, not a regular file: not read"
    )
    assert failure.signal_name == "SIGABRT"
    assert failure.message == "Signal 6 (SIGABRT) received by PID 42"
    odd = _read(tmp_path / "none.json", exit_code=-200)
    assert odd.signal_name == "<N/A>"
    assert odd.message == "Signal 200 (<N/A>) received by PID 42"


def test_stderr_tail_is_bounded_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "stderr.log"
    lines = [f"line {i:04d} " + "x" * 90 for i in range(1000)]  # ~100 KB
    path.write_text("\n".join(lines) + "\n")
    assert stderr_tail(str(path)) == lines[-20:]
    assert stderr_tail(str(path), lines=3) == lines[-3:]
    path.write_bytes(b"first\nbad \xff byte\nno newline at end")
    assert stderr_tail(str(path)) == ["first", "bad \ufffd byte", "no newline at end"]
    assert stderr_tail(str(tmp_path / "missing.log")) == []
    assert file_lines(tmp_path / "missing.log") == []


def test_root_cause_prefers_own_failures_then_earliest() -> None:
    def f(rank: int, ts: float, by_agent: bool) -> Failure:
        return Failure(local_rank=rank, pid=rank, exit_code=1, timestamp=ts,
                       terminated_by_agent=by_agent)  # fmt: skip

    early_terminated = f(0, 1.0, True)
    own_late = f(1, 5.0, False)
    own_early = f(2, 3.0, False)
    assert root_cause([early_terminated, own_late, own_early]) is own_early
    assert root_cause([early_terminated, own_late]) is own_late
    only_terminated = [f(3, 9.0, True), f(4, 2.0, True)]
    assert root_cause(only_terminated) is only_terminated[1]
    assert root_cause([]) is None


# -- what the agent knows without asking the files (inotify, see AttemptLogs) ---------


async def test_error_file_renamed_into_place_before_a_kill_is_read(core: Core) -> None:
    """Written atomically (elsewhere, then renamed), then the rank hangs and is killed:
    its error file is still the root cause's text; its quiet sibling has none."""
    script = core.script(
        "atomic.py",
        """
        import json, os, sys, time
        rank = int(os.environ["LOCAL_RANK"])
        if rank == 0:
            path = os.environ["TORCHELASTIC_ERROR_FILE"]
            tmp = os.path.join(os.path.dirname(path), "..", "error.tmp")
            with open(tmp, "w") as f:
                json.dump({"message": "wrote it, then hung"}, f)
            os.rename(tmp, path)
        print("ready", flush=True)
        time.sleep(60)
        """,
    )
    job, _ = await core.sup.start(core.spec("atomic", script, nprocs=2))
    attempt = job.current
    for rank in (0, 1):
        await wait_for_file_line(attempt.logs.path(rank, STDOUT))
    attempt = await asyncio.wait_for(core.sup.kill("atomic", timeout=5), 20)
    hung, quiet = attempt.ranks
    assert hung.failure is not None and quiet.failure is not None
    assert hung.failure.message == "wrote it, then hung"
    assert hung.failure.error_file == hung.error_file
    assert hung.failure.terminated_by_agent
    assert quiet.failure.message == f"Signal 15 (SIGTERM) received by PID {quiet.pid}"
    assert quiet.failure.error_file == NOT_AVAILABLE


async def test_byte_counts_at_exit_match_the_files(core: Core) -> None:
    """Written, silent and stderr-only ranks: the counts taken at each exit are the files'
    sizes (a file nobody wrote to is known to be empty without a stat)."""
    script = core.script(
        "sizes.py",
        """
        import os, sys
        rank = int(os.environ["LOCAL_RANK"])
        if rank == 0:
            sys.stdout.write("x" * 5000 + "\\n")
        elif rank == 2:
            sys.stderr.write("only stderr\\n")
        """,
    )
    attempt = await core.run(core.spec("sizes", script, nprocs=3))
    for rank in attempt.ranks:
        assert rank.stdout_bytes == os.path.getsize(rank.stdout_path)
        assert rank.stderr_bytes == os.path.getsize(rank.stderr_path)
    assert [(r.stdout_bytes, r.stderr_bytes) for r in attempt.ranks] == [
        (5001, 0),
        (0, 0),
        (0, 12),
    ]
    assert attempt.ranks[2].failure is None  # exit 0: no failure, whatever stderr says
