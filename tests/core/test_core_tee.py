"""Redirects, tee, local_ranks_filter, prefix templates and duplicate filters: what the
agent mirrors on its console and into filtered_*.log, while every rank's files stay whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.core import Core, file_lines

from rankd.agent.model import Attempt, JobState

CHATTY = """
    import os, sys
    r = os.environ["LOCAL_RANK"]
    for i in range(5):
        print(f"out {r} {i}", flush=True)
        if i < 3:
            print(f"err {r} {i}", file=sys.stderr, flush=True)
    sys.stdout.write(f"bye {r}")  # no newline: mirrored once the rank is gone
"""


def out_of(rank: int, prefix: str) -> list[str]:
    return [f"{prefix}out {rank} {i}" for i in range(5)] + [f"{prefix}bye {rank}"]


def err_of(rank: int, prefix: str) -> list[str]:
    return [f"{prefix}err {rank} {i}" for i in range(3)]


def assert_mirror(text: str, expected: dict[str, list[str]]) -> None:
    """`text` holds exactly the expected lines of each prefix, each prefix's in order."""
    lines = text.splitlines()
    assert text == "" or text.endswith("\n")
    assert sorted(lines) == sorted(line for group in expected.values() for line in group)
    for prefix, group in expected.items():
        assert [ln for ln in lines if ln.startswith(prefix)] == group


def assert_files_whole(core: Core, attempt: Attempt, nprocs: int) -> None:
    for r in range(nprocs):
        assert core.out_lines(attempt, r) == out_of(r, "")
        assert core.err_lines(attempt, r) == err_of(r, "")


async def test_tee_3_mirrors_both_streams_of_every_rank(core: Core) -> None:
    script = core.script("chatty.py", CHATTY)
    attempt = await core.run(core.spec("tee3", script, nprocs=2, tee="3"))
    assert attempt.state is JobState.SUCCEEDED
    assert_mirror(
        core.out.getvalue(), {f"[default{r}]:": out_of(r, f"[default{r}]:") for r in (0, 1)}
    )
    assert_mirror(
        core.err.getvalue(), {f"[default{r}]:": err_of(r, f"[default{r}]:") for r in (0, 1)}
    )
    assert_files_whole(core, attempt, 2)


async def test_tee_map_picks_a_stream_per_rank(core: Core) -> None:
    script = core.script("chatty.py", CHATTY)
    attempt = await core.run(core.spec("teemap", script, nprocs=3, tee="0:1,1:2"))
    assert_mirror(core.out.getvalue(), {"[default0]:": out_of(0, "[default0]:")})
    assert_mirror(core.err.getvalue(), {"[default1]:": err_of(1, "[default1]:")})
    assert_files_whole(core, attempt, 3)


async def test_local_ranks_filter_limits_the_mirror(core: Core) -> None:
    script = core.script("chatty.py", CHATTY)
    attempt = await core.run(
        core.spec("filtered", script, nprocs=3, tee="3", local_ranks_filter=frozenset({1}))
    )
    assert_mirror(core.out.getvalue(), {"[default1]:": out_of(1, "[default1]:")})
    assert_mirror(core.err.getvalue(), {"[default1]:": err_of(1, "[default1]:")})
    assert_files_whole(core, attempt, 3)


async def test_prefix_template_with_role_and_rank_offset(core: Core) -> None:
    script = core.script("chatty.py", CHATTY)
    attempt = await core.run(
        core.spec(
            "template",
            script,
            nprocs=2,
            tee="1",
            role_name="trainer",
            rank_offset=8,
            log_line_prefix_template="[${role_name}-${rank}-${local_rank}]",
        )
    )
    assert attempt.logs.prefixes == ["[trainer-8-0]", "[trainer-9-1]"]
    assert_mirror(
        core.out.getvalue(),
        {"[trainer-8-0]": out_of(0, "[trainer-8-0]"), "[trainer-9-1]": out_of(1, "[trainer-9-1]")},
    )
    assert core.err.getvalue() == ""
    assert_files_whole(core, attempt, 2)


@pytest.mark.parametrize(("redirects", "tee"), [("0", "0"), ("3", "0"), ("0:3,1:1", "")])
async def test_no_tee_mirrors_nothing_and_files_keep_everything(
    core: Core, redirects: str, tee: str
) -> None:
    script = core.script("chatty.py", CHATTY)
    attempt = await core.run(core.spec("quiet", script, nprocs=2, redirects=redirects, tee=tee))
    assert core.out.getvalue() == ""
    assert core.err.getvalue() == ""
    assert_files_whole(core, attempt, 2)
    assert sorted(os.listdir(attempt.logs.attempt_dir)) == ["0", "1"]


DUPLICATES = """
    import os, sys
    r = os.environ["LOCAL_RANK"]
    for i in range(4):
        print(f"keep {r} {i}")
        print(f"drop {r} {i}")
        print(f"warn {r} {i}", file=sys.stderr)
        print(f"info {r} {i}", file=sys.stderr)
    print(f"a not-a-keeper {r}")   # substring match, as torch's `needle in line`
    print(f"abc {r}")              # not "a.c": filters are literal, not regexes
    print(f"a.c {r}")
    print(f"ALSO {r}", file=sys.stderr)
"""


async def test_duplicate_filters_write_matching_lines_of_all_ranks(core: Core) -> None:
    script = core.script("dups.py", DUPLICATES)
    attempt = await core.run(
        core.spec(
            "dups",
            script,
            nprocs=3,
            duplicate_stdout_filters=("keep", "a.c"),
            duplicate_stderr_filters=("warn", "ALSO"),
        )
    )
    adir = Path(attempt.logs.attempt_dir)
    assert sorted(os.listdir(adir)) == ["0", "1", "2", "filtered_stderr.log", "filtered_stdout.log"]
    expected_out = {
        f"[default{r}]:": [f"[default{r}]:keep {r} {i}" for i in range(4)]
        + [f"[default{r}]:a not-a-keeper {r}", f"[default{r}]:a.c {r}"]
        for r in range(3)
    }
    expected_err = {
        f"[default{r}]:": [f"[default{r}]:warn {r} {i}" for i in range(4)]
        + [f"[default{r}]:ALSO {r}"]
        for r in range(3)
    }
    assert_mirror((adir / "filtered_stdout.log").read_text(), expected_out)
    assert_mirror((adir / "filtered_stderr.log").read_text(), expected_err)
    assert core.out.getvalue() == ""  # tee is off: the filters do not touch the console
    assert core.err.getvalue() == ""
    for r in range(3):
        assert len(file_lines(adir / str(r) / "stdout.log")) == 11
        assert len(file_lines(adir / str(r) / "stderr.log")) == 9


async def test_tee_and_duplicate_filters_together_with_a_failing_rank(core: Core) -> None:
    script = core.script(
        "tee_fail.py",
        """
        import os, sys, time
        r = os.environ["LOCAL_RANK"]
        print(f"hello {r}", flush=True)
        print(f"ERROR from {r}", file=sys.stderr, flush=True)
        if r == "1":  # fail once rank 0 has spoken
            peer = os.path.join(os.environ["TORCHELASTIC_ERROR_FILE"], "../../0/stderr.log")
            while not open(os.path.normpath(peer)).read().endswith("\\n"):
                time.sleep(0.01)
            sys.exit(2)
        time.sleep(120)
        """,
    )
    attempt = await core.run(
        core.spec("teefail", script, nprocs=2, tee="3", duplicate_stderr_filters=("ERROR",))
    )
    assert attempt.state is JobState.FAILED
    assert [r.exit_code for r in attempt.ranks] == [-15, 2]
    expected_err = {f"[default{r}]:": [f"[default{r}]:ERROR from {r}"] for r in (0, 1)}
    assert_mirror(
        core.out.getvalue(), {f"[default{r}]:": [f"[default{r}]:hello {r}"] for r in (0, 1)}
    )
    assert_mirror(core.err.getvalue(), expected_err)
    filtered = Path(attempt.logs.attempt_dir, "filtered_stderr.log").read_text()
    assert_mirror(filtered, expected_err)
