"""Spare run directories (agent.spares): made after a Start, taken by the next Start of
the same size with one rename (a restart takes its attempt directory), never shown as
ranks that did not run, removed when the agent stops, swept when an agent starts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from helpers.core import PYTHON, Core, open_core
from helpers.wait import wait_until_async

from rankd.agent import spares
from rankd.agent.errors import AlreadyExists
from rankd.agent.model import RankState
from rankd.agent.specs import JobSpec

pytestmark = pytest.mark.timeout(60)

WORKER = """
    import os, sys
    print("out", os.environ["LOCAL_RANK"])
    print("err", os.environ["LOCAL_RANK"], file=sys.stderr)
    sys.exit(int(sys.argv[1]))
"""


def _spec(job_id: str, script: str, nprocs: int, code: str, **kw: Any) -> JobSpec:
    """`nprocs` ranks of the worker, each exiting with `code`."""
    return JobSpec(job_id=job_id, nprocs=nprocs, entrypoint=PYTHON, args=("-u", script, code), **kw)


def spare_dirs(log_dir: Path) -> list[Path]:
    return sorted(p for p in log_dir.iterdir() if p.name.startswith(spares.PREFIX))


async def ready_spare(log_dir: Path, nprocs: int) -> Path:
    """Wait until the one spare run directory holds `nprocs` complete rank directories
    and its job.json."""

    def made() -> bool:
        found = spare_dirs(log_dir)
        if len(found) != 1 or sorted(os.listdir(found[0])) != ["attempt_0", "job.json"]:
            return False
        attempt = found[0] / "attempt_0"
        if len(os.listdir(attempt)) != nprocs:
            return False
        return all(
            sorted(os.listdir(attempt / str(r))) == ["stderr.log", "stdout.log"]
            for r in range(nprocs)
        )

    await wait_until_async(made, 10.0, f"a spare of {nprocs} ranks")
    (spare,) = spare_dirs(log_dir)
    return spare


async def test_the_next_start_of_the_same_size_takes_the_spare(core: Core) -> None:
    script = core.script("worker.py", WORKER)
    first = await core.run(_spec("first", script, 2, "0"))
    spare = await ready_spare(core.log_dir, 2)
    inode = spare.stat().st_ino
    # the files and directories are what a Start would have made: same modes
    for made_ahead, made_by_start in (
        (spare, first.logs.attempt_dir + "/.."),
        (spare / "attempt_0", first.logs.attempt_dir),
        (spare / "attempt_0" / "0", first.logs.rank_dir(0)),
        (spare / "attempt_0" / "0" / "stdout.log", first.ranks[0].stdout_path),
        (spare / "job.json", Path(first.logs.attempt_dir).parent / "job.json"),
    ):
        assert stat.S_IMODE(made_ahead.stat().st_mode) == stat.S_IMODE(
            Path(made_by_start).stat().st_mode
        ), made_ahead
    assert (spare / "attempt_0" / "0" / "stdout.log").stat().st_size == 0
    assert (spare / "job.json").stat().st_size == 0

    second = await core.run(_spec("second", script, 2, "0"))

    attempt_dir = Path(second.logs.attempt_dir)
    run_dir = Path(core.sup.job("second").run_dir)
    assert run_dir.stat().st_ino == inode  # renamed, not made again
    assert attempt_dir == run_dir / "attempt_0"
    assert run_dir.name.startswith("second_") and len(run_dir.name) == len("second_") + 8
    assert not spare.exists()
    assert sorted(os.listdir(run_dir)) == ["attempt_0", "job.json"]
    record = json.loads((run_dir / "job.json").read_text())  # written over the empty one
    assert record["job_id"] == "second"
    assert sorted(os.listdir(attempt_dir)) == ["0", "1"]
    for r in range(2):
        assert sorted(os.listdir(attempt_dir / str(r))) == ["stderr.log", "stdout.log"]
        assert core.out_lines(second, r) == [f"out {r}"]
        assert core.err_lines(second, r) == [f"err {r}"]
    assert [(r.state, r.exit_code) for r in second.ranks] == [(RankState.SUCCEEDED, 0)] * 2
    assert [(r.stdout_bytes, r.stderr_bytes) for r in second.ranks] == [(6, 6)] * 2

    # failures are read as from any attempt directory (the error file is not made ahead)
    inode = (await ready_spare(core.log_dir, 2)).stat().st_ino  # one more for the next
    third = await core.run(_spec("third", script, 2, "3"))
    assert Path(core.sup.job("third").run_dir).stat().st_ino == inode
    root = third.failures()[0]
    assert root.exit_code == 3
    assert root.stderr_tail in (["err 0"], ["err 1"])


async def test_another_size_makes_its_own_directories_and_the_spare_follows(
    core: Core,
) -> None:
    script = core.script("worker.py", WORKER)
    await core.run(_spec("two", script, 2, "0"))
    old = await ready_spare(core.log_dir, 2)

    three = await core.run(_spec("three", script, 3, "0"))
    assert sorted(os.listdir(three.logs.attempt_dir)) == ["0", "1", "2"]
    assert [core.out_lines(three, r) for r in range(3)] == [["out 0"], ["out 1"], ["out 2"]]
    new = await ready_spare(core.log_dir, 3)  # the spare of 2 is gone
    assert new != old and not old.exists()

    one = await core.run(_spec("one", script, 1, "0"))
    assert sorted(os.listdir(one.logs.attempt_dir)) == ["0"]  # no phantom ranks
    await ready_spare(core.log_dir, 1)


async def test_a_restart_takes_the_spare_into_its_run_directory(core: Core) -> None:
    script = core.script("worker.py", WORKER)
    await core.run(_spec("again", script, 2, "0"))
    spare = await ready_spare(core.log_dir, 2)
    inode = (spare / "attempt_0").stat().st_ino
    second = await core.run(_spec("again", script, 2, "0", restart_count=1))
    job = core.sup.job("again")
    assert Path(second.logs.attempt_dir) == Path(job.run_dir, "attempt_1")
    assert Path(second.logs.attempt_dir).stat().st_ino == inode
    assert [core.out_lines(second, r) for r in range(2)] == [["out 0"], ["out 1"]]
    assert core.log_entries() == [os.path.basename(job.run_dir)]
    await wait_until_async(lambda: not spare.exists(), 10.0, "the rest of the spare removed")

    # a node that joins at a later attempt: a new run directory with that attempt only
    spare = await ready_spare(core.log_dir, 2)
    inode = spare.stat().st_ino
    late = await core.run(_spec("late", script, 2, "0", restart_count=2))
    run_dir = Path(core.sup.job("late").run_dir)
    assert run_dir.stat().st_ino == inode
    assert sorted(os.listdir(run_dir)) == ["attempt_2", "job.json"]
    assert [core.out_lines(late, r) for r in range(2)] == [["out 0"], ["out 1"]]


async def test_an_existing_attempt_directory_keeps_the_spare(core: Core) -> None:
    script = core.script("worker.py", WORKER)
    await core.run(_spec("taken", script, 1, "0"))
    spare = await ready_spare(core.log_dir, 1)
    inode = spare.stat().st_ino
    squatter = Path(core.sup.job("taken").run_dir, "attempt_1")
    squatter.mkdir()
    with pytest.raises(AlreadyExists, match="exists already"):
        await core.sup.start(_spec("taken", script, 1, "0", restart_count=1))
    assert os.listdir(squatter) == []
    assert spare_dirs(core.log_dir) == [spare]  # still there for the next Start
    await core.run(_spec("other", script, 1, "0"))
    assert Path(core.sup.job("other").run_dir).stat().st_ino == inode
    assert not spare.exists()


async def test_close_removes_the_spare_and_a_new_agent_sweeps_stale_ones(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    stale = log_dir / f"{spares.PREFIX}left-by-a-killed-agent"
    (stale / "0").mkdir(parents=True)
    (stale / "0" / "stdout.log").write_text("")
    async with open_core(tmp_path) as core:  # a Supervisor over the same log dir
        assert not stale.exists()
        script = core.script("worker.py", WORKER)
        await core.run(_spec("j", script, 2, "0"))
        await ready_spare(log_dir, 2)
    assert spare_dirs(log_dir) == []
    assert len(os.listdir(log_dir)) == 1  # the job's run directory, nothing else


async def parked(made: spares.SpareDirs) -> None:
    """Wait until the maker, in its thread, waits for a release."""
    await wait_until_async(made.parked.is_set, 10.0, "the spare maker to wait while held")


async def test_nothing_is_made_while_held_and_close_stops_a_held_maker(tmp_path: Path) -> None:
    made = spares.SpareDirs(str(tmp_path), delay=0.0)
    try:
        made.hold()  # as a Start or a Kill does
        made.prepare(3)
        await parked(made)  # the maker got its turn: it waits without a trace
        assert spare_dirs(tmp_path) == []
        assert not made.take_run(3, str(tmp_path / "run"), "attempt_0")
        made.release()
        await ready_spare(tmp_path, 3)
        assert not made.parked.is_set()
        assert made.take_run(3, str(tmp_path / "run"), "attempt_1")
        assert sorted(os.listdir(tmp_path / "run")) == ["attempt_1", "job.json"]

        made.hold()
        made.prepare(2)
        await parked(made)
    finally:
        made.close()  # wakes a held maker, which stops and removes what it made
    assert not made.parked.is_set()  # it went on, and stopped
    assert spare_dirs(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["run"]


async def test_a_run_directory_name_that_is_taken_is_drawn_again(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = core.script("worker.py", WORKER)
    await core.run(_spec("first", script, 1, "0"))
    inode = (await ready_spare(core.log_dir, 1)).stat().st_ino
    squatter = core.log_dir / "again_00000000"
    squatter.mkdir()
    (squatter / "keep.txt").write_text("mine")
    names = iter(["00000000", "11111111"])
    monkeypatch.setattr("rankd.agent.launch.secrets.token_hex", lambda n: next(names))
    attempt = await core.run(_spec("again", script, 1, "0"))
    run_dir = Path(core.sup.job("again").run_dir)
    assert run_dir.name == "again_11111111"
    assert run_dir.stat().st_ino == inode  # the spare, under the second name
    assert sorted(os.listdir(squatter)) == ["keep.txt"]  # untouched
    assert core.out_lines(attempt, 0) == ["out 0"]


async def test_a_run_directory_left_before_its_first_record_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent died between taking a spare and writing the job's first record."""
    log_dir = tmp_path / "logs"
    cut = log_dir / "cut_00000000"
    (cut / "attempt_0" / "0").mkdir(parents=True)
    (cut / "job.json").write_text("")
    async with open_core(tmp_path) as core:
        assert core.sup.jobs() == []
        assert "the agent stopped while the job was starting" in caplog.text
        script = core.script("worker.py", WORKER)
        attempt = await core.run(_spec("cut", script, 1, "0"))  # the id is free
        assert core.out_lines(attempt, 0) == ["out 0"]
    assert cut.exists()  # kept on disk, as every run directory
