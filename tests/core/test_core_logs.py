"""The log follower: every line in order while ranks write, cursors, partial last lines,
invalid UTF-8, huge lines cut into bounded chunks, replay after the end. Each test that
follows a job runs twice: with inotify, and with the bounded poll that replaces it where
inotify cannot be had."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from helpers.core import Core, open_core, read_lines, wait_for_file_line

from rankd.agent.logs import MAX_LINE, STDERR, STDOUT, AttemptLogs, LogLine, LogReader
from rankd.agent.model import JobState
from rankd.agent.supervisor import Supervisor

ALL_KEYS = [(r, s) for r in range(4) for s in (STDOUT, STDERR)]


@pytest.fixture(params=["auto", "poll"], ids=["inotify", "poll"])
async def core(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Core]:
    if request.param == "auto":
        async with open_core(tmp_path) as handle:
            assert handle.sup.follow_mode == "inotify"
            yield handle
        return
    out, err = io.StringIO(), io.StringIO()
    log_dir = tmp_path / "logs"
    sup = Supervisor(str(log_dir), console_out=out, console_err=err, log_follow="poll")
    try:
        assert sup.follow_mode == "poll"
        yield Core(sup, out, err, tmp_path, log_dir)
    finally:
        await sup.close(timeout=2.0)


def _out_line(rank: int, i: int) -> str:
    return f"rank {rank} out {i:04d} " + "y" * (i % 37)


def _err_line(rank: int, i: int) -> str:
    return f"rank {rank} err {i:04d}"


def _expected(texts: list[str]) -> list[tuple[str, int, bool]]:
    """(text, cursor, partial) of complete ASCII lines written in this order."""
    out, offset = [], 0
    for text in texts:
        offset += len(text) + 1
        out.append((text, offset, False))
    return out


def _by_key(lines: list[LogLine]) -> dict[tuple[int, int], list[tuple[str, int, bool]]]:
    found: dict[tuple[int, int], list[tuple[str, int, bool]]] = defaultdict(list)
    for line in lines:
        found[(line.local_rank, line.stream)].append((line.text, line.offset, line.partial))
    return found


def _generator(reader: LogReader) -> AsyncGenerator[list[LogLine], None]:
    """The reader's batches, typed so that the test can `aclose()` them."""
    return cast(AsyncGenerator[list[LogLine], None], reader.batches())


THOUSAND = """
    import os, sys, time
    r = int(os.environ["LOCAL_RANK"])
    gate = os.environ.get("GATE")
    for i in range(1000):
        if i == 500 and gate:  # the test opens the gate once it has read the first half
            while not os.path.exists(gate):
                time.sleep(0.005)
        sys.stdout.write(f"rank {r} out {i:04d} " + "y" * (i % 37) + "\\n")
        sys.stdout.flush()
        if i % 4 == 0:
            sys.stderr.write(f"rank {r} err {i:04d}\\n")
            sys.stderr.flush()
"""


async def test_thousand_lines_per_rank_all_read_in_order_while_written(core: Core) -> None:
    script = core.script("thousand.py", THOUSAND)
    gate = core.tmp / "gate"
    job, _ = await core.sup.start(core.spec("thousand", script, nprocs=4, env={"GATE": str(gate)}))
    attempt = job.current

    async def follow() -> list[LogLine]:
        lines: list[LogLine] = []
        seen = dict.fromkeys(range(4), 0)
        async for batch in LogReader(attempt.logs, ALL_KEYS, follow=True).batches():
            lines.extend(batch)
            for line in batch:
                seen[line.local_rank] += line.stream == STDOUT
            if not gate.exists() and min(seen.values()) >= 500:
                assert not attempt.ended
                assert max(seen.values()) == 500  # every rank waits at the gate
                gate.touch()
        return lines

    lines = await asyncio.wait_for(follow(), 30)
    assert gate.exists()  # the first half was read while the ranks ran
    assert attempt.ended  # a follower stops only once the attempt ended
    assert attempt.state is JobState.SUCCEEDED
    got = _by_key(lines)
    assert sorted(got) == sorted(ALL_KEYS)
    for rank in range(4):
        assert got[(rank, STDOUT)] == _expected([_out_line(rank, i) for i in range(1000)])
        assert got[(rank, STDERR)] == _expected([_err_line(rank, i) for i in range(0, 1000, 4)])
    # replay from the files after the end: the same lines
    assert _by_key(await read_lines(attempt, ALL_KEYS)) == got
    assert _by_key(await read_lines(attempt, ALL_KEYS, follow=True)) == got


async def test_resume_from_any_cursor_yields_exactly_the_later_lines(core: Core) -> None:
    script = core.script("thousand.py", THOUSAND)
    attempt = await core.run(core.spec("cursors", script, nprocs=2))
    key = (1, STDOUT)
    lines = await read_lines(attempt, [key])
    texts = [ln.text for ln in lines]
    assert texts == [_out_line(1, i) for i in range(1000)]
    for k, line in enumerate(lines):
        rest = await read_lines(attempt, [key], cursors={key: line.offset})
        assert [ln.text for ln in rest] == texts[k + 1 :], f"resume after line {k}"
        assert [ln.offset for ln in rest] == [ln.offset for ln in lines[k + 1 :]]
    assert await read_lines(attempt, [key], cursors={key: 0}) == lines
    assert await read_lines(attempt, [key], cursors={key: lines[-1].offset}, follow=True) == []

    # one cursor per file; files without a cursor start at 0
    keys = [(0, STDOUT), (1, STDOUT), (0, STDERR)]
    at = {(0, STDOUT): lines[499].offset, (1, STDOUT): lines[9].offset}
    got = _by_key(await read_lines(attempt, keys, cursors=at))
    assert [t for t, _, _ in got[(0, STDOUT)]] == [_out_line(0, i) for i in range(500, 1000)]
    assert [t for t, _, _ in got[(1, STDOUT)]] == texts[10:]
    assert [t for t, _, _ in got[(0, STDERR)]] == [_err_line(0, i) for i in range(0, 1000, 4)]


async def test_partial_last_line_waits_for_its_newline_or_the_exit(core: Core) -> None:
    go = core.tmp / "go"
    script = core.script(
        "partial.py",
        f"""
        import os, sys, time
        sys.stdout.write("head\\npart")
        sys.stdout.flush()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        sys.stdout.write("-rest\\ntail without newline")
        """,
    )
    job, _ = await core.sup.start(core.spec("partial", script))
    attempt = job.current
    batches = _generator(LogReader(attempt.logs, [(0, STDOUT)], follow=True))
    try:
        first = await asyncio.wait_for(anext(batches), 10)
        assert first == [LogLine(0, STDOUT, 5, "head")]
        pending = asyncio.ensure_future(anext(batches))
        done, _ = await asyncio.wait([pending], timeout=0.3)
        assert not done, f"a partial line was sent while its writer runs: {pending.result()}"
        go.touch()
        rest = await asyncio.wait_for(pending, 10)
        async for batch in batches:
            rest.extend(batch)
    finally:
        await batches.aclose()
    size = os.path.getsize(attempt.logs.path(0, STDOUT))
    assert rest == [
        LogLine(0, STDOUT, 15, "part-rest"),
        LogLine(0, STDOUT, size, "tail without newline", partial=True),
    ]
    assert size == len("head\npart-rest\ntail without newline")
    assert attempt.ended


async def test_invalid_utf8_is_replaced(core: Core) -> None:
    script = core.script(
        "bad_utf8.py",
        """
        import sys
        out = sys.stdout.buffer
        out.write(b"ok \\xff\\xfe end\\n")
        out.write(b"\\xe2\\x82\\n")
        out.write("caf\\u00e9 \\u2713\\n".encode())
        out.write(b"\\xf0\\x9f")
        """,
    )
    attempt = await core.run(core.spec("utf8", script))
    lines = await read_lines(attempt, [(0, STDOUT)], follow=True)
    assert [(ln.text, ln.partial) for ln in lines] == [
        ("ok \ufffd\ufffd end", False),
        ("\ufffd", False),
        ("caf\u00e9 \u2713", False),
        ("\ufffd", True),
    ]
    assert [ln.offset for ln in lines] == [10, 13, 23, 25]


HUGE = """
    import os, sys
    data = "".join(f"{i:07d}," for i in range(25600)).encode()  # 200 KiB
    assert len(data) == 200 * 1024
    out = sys.stdout.buffer
    out.write(data)
    if os.environ["LOCAL_RANK"] == "1":
        out.write(b"\\nafter\\n")
"""


async def test_huge_line_is_cut_into_64k_chunks(core: Core) -> None:
    script = core.script("huge.py", HUGE)
    job, _ = await core.sup.start(core.spec("huge", script, nprocs=2))
    lines = await asyncio.wait_for(
        read_lines(job.current, [(0, STDOUT), (1, STDOUT)], follow=True), 20
    )
    data = "".join(f"{i:07d}," for i in range(25600))
    cuts = [0, MAX_LINE, 2 * MAX_LINE, 3 * MAX_LINE, len(data)]
    chunks = [(data[a:b], b, True) for a, b in itertools.pairwise(cuts)]
    assert MAX_LINE == 64 * 1024
    assert [len(text) for text, _, _ in chunks] == [65536, 65536, 65536, 8192]
    got = _by_key(lines)
    # no newline at all: three full chunks, then the rest once the rank has exited
    assert got[(0, STDOUT)] == chunks
    # with its newline: the last piece ends the line (not partial), then the next line
    assert got[(1, STDOUT)] == [
        *chunks[:3],
        (data[3 * MAX_LINE :], len(data) + 1, False),
        ("after", len(data) + 7, False),
    ]


async def test_line_of_exactly_max_line_split_across_reads_comes_out_whole(
    tmp_path: Path,
) -> None:
    (tmp_path / "0").mkdir()
    logs = AttemptLogs(str(tmp_path), 1, ["[default0]:"])
    path = logs.path(0, STDOUT)
    Path(path).write_bytes(b"a" * MAX_LINE)
    batches = _generator(LogReader(logs, [(0, STDOUT)], follow=True))
    try:
        pending = asyncio.ensure_future(anext(batches))
        for _ in range(5):  # let the reader consume what is there and wait for more
            await asyncio.sleep(0)
        assert not pending.done(), pending.result()
        with open(path, "ab") as f:
            f.write(b"\nnext\n")
        logs.pulse.fire()
        lines = await asyncio.wait_for(pending, 5)
        logs.mark_ended()
        async for batch in batches:
            lines.extend(batch)
    finally:
        await batches.aclose()
    assert lines == [
        LogLine(0, STDOUT, MAX_LINE + 1, "a" * MAX_LINE),
        LogLine(0, STDOUT, MAX_LINE + 6, "next"),
    ]


async def test_reader_of_a_running_job_without_follow_returns_what_exists(core: Core) -> None:
    script = core.script(
        "two_then_wait.py",
        "import time\nprint('one')\nprint('two')\nprint('drei', flush=True)\ntime.sleep(120)\n",
    )
    job, _ = await core.sup.start(core.spec("snapshot", script))
    await wait_for_file_line(job.current.ranks[0].stdout_path, 3)
    lines = await asyncio.wait_for(read_lines(job.current, [(0, STDOUT)]), 5)
    assert [ln.text for ln in lines] == ["one", "two", "drei"]
    filtered = await read_lines(job.current, [(0, STDOUT)], line_filter=lambda t: "e" in t)
    assert [(ln.text, ln.offset) for ln in filtered] == [("one", 4), ("drei", 13)]
    assert not job.current.ended


async def test_two_followers_get_the_same_lines(core: Core) -> None:
    script = core.script("thousand.py", THOUSAND)
    job, _ = await core.sup.start(core.spec("two", script, nprocs=2))
    keys = [(0, STDOUT), (1, STDOUT)]
    first, second = await asyncio.wait_for(
        asyncio.gather(
            read_lines(job.current, keys, follow=True),
            read_lines(job.current, keys, follow=True, max_batch_bytes=4096),
        ),
        30,
    )
    assert _by_key(first) == _by_key(second)
    assert len(first) == 2000


async def test_a_follower_that_goes_away_leaves_the_others_following(core: Core) -> None:
    """Followers of an attempt wait on one shared pulse: cancelling one (its client went
    away) while they all wait must not cancel the others' wait."""
    gate = core.tmp / "gate"
    script = core.script(
        "gated.py",
        f"""
        import os, time
        print("first", flush=True)
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.005)
        print("second", flush=True)
        """,
    )
    job, _ = await core.sup.start(core.spec("readers", script))
    logs = job.current.logs
    leaving = _generator(LogReader(logs, [(0, STDOUT)], follow=True))
    staying = _generator(LogReader(logs, [(0, STDOUT)], follow=True))
    try:
        for reader in (leaving, staying):
            first = await asyncio.wait_for(anext(reader), 10)
            assert [ln.text for ln in first] == ["first"]
        gone = asyncio.ensure_future(anext(leaving))
        waiting = asyncio.ensure_future(anext(staying))
        for _ in range(5):  # both take the pulse and wait on it
            await asyncio.sleep(0)
        assert not gone.done() and not waiting.done()
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        gate.touch()
        second = await asyncio.wait_for(waiting, 10)
        assert [ln.text for ln in second] == ["second"]
    finally:
        await leaving.aclose()
        await staying.aclose()
