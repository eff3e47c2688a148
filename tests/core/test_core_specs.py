"""Job specs: torch's `Std` parsing, prefixes, signals, and bad specs that must start
nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers.core import PYTHON, Core

from rankd.agent import procs
from rankd.agent.errors import SpecError
from rankd.agent.specs import JobSpec, Std, parse_signal, parse_std, render_prefix, to_map
from rankd.agent.supervisor import Supervisor

TORCH_PATTERNS = r"<^[0123]$> or <^(\d:[0123],)*(\d:[0123])$>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", Std.NONE),
        ("1", Std.OUT),
        ("2", Std.ERR),
        ("3", Std.ALL),
        ("", Std.NONE),
        ("0:3,1:0", {0: Std.ALL, 1: Std.NONE}),
        ("0:1", {0: Std.OUT}),
        ("3:2,0:1,9:3", {3: Std.ERR, 0: Std.OUT, 9: Std.ALL}),
    ],
)
def test_parse_std_accepts_torch_values_and_maps(text: str, expected: object) -> None:
    result = parse_std(text)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    "text", ["4", "-1", "a", "01", " 1", "0:4", "0:1,", ",0:1", "10:1", "0:1;1:2", "0=1", "0:"]
)
def test_parse_std_rejects_with_torchs_message(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_std(text)
    assert str(info.value) == f"{text} does not match: {TORCH_PATTERNS}"


def test_to_map_fills_missing_ranks_with_none() -> None:
    assert to_map(Std.ERR, 3) == {0: Std.ERR, 1: Std.ERR, 2: Std.ERR}
    assert to_map({1: Std.ALL}, 3) == {0: Std.NONE, 1: Std.ALL, 2: Std.NONE}
    spec = JobSpec(job_id="j", nprocs=3, entrypoint=PYTHON, tee="0:1,2:3", redirects="2")
    assert spec.tee_map() == {0: Std.OUT, 1: Std.NONE, 2: Std.ALL}
    assert spec.redirect_map() == {0: Std.ERR, 1: Std.ERR, 2: Std.ERR}


def test_prefix_default_header_and_template_with_rank_offset() -> None:
    assert render_prefix("", "default", 7, 3) == "[default3]:"
    spec = JobSpec(
        job_id="j",
        nprocs=2,
        entrypoint=PYTHON,
        role_name="trainer",
        rank_offset=4,
        log_line_prefix_template="[${role_name}-${rank}-${local_rank}]",
    )
    assert [spec.prefix(r) for r in range(2)] == ["[trainer-4-0]", "[trainer-5-1]"]
    plain = JobSpec(job_id="j", nprocs=2, entrypoint=PYTHON, role_name="w", rank_offset=4)
    assert [plain.prefix(r) for r in range(2)] == ["[w0]:", "[w1]:"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SIGTERM", signal.SIGTERM),
        ("term", signal.SIGTERM),
        ("KILL", signal.SIGKILL),
        ("10", signal.SIGUSR1),
        (15, signal.SIGTERM),
        ("", signal.SIGTERM),
    ],
)
def test_parse_signal(value: str | int, expected: signal.Signals) -> None:
    assert parse_signal(value) is expected


@pytest.mark.parametrize("value", ["SIGNOPE", "999", "-3", "1.5"])
def test_parse_signal_rejects_unknown(value: str) -> None:
    with pytest.raises(SpecError, match=r"unknown signal .*: use a name like SIGTERM"):
        parse_signal(value)


def test_validate_resolves_entrypoint_on_path_and_relative_to_cwd(tmp_path: Path) -> None:
    exe = tmp_path / "bin" / "worker"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    by_name = JobSpec(job_id="j", nprocs=1, entrypoint="worker", env={"PATH": str(exe.parent)})
    assert by_name.validate().entrypoint == str(exe)
    relative = JobSpec(job_id="j", nprocs=1, entrypoint="bin/worker", cwd=str(tmp_path))
    assert relative.validate().entrypoint == str(exe)


def _non_executable(tmp: Path) -> str:
    path = tmp / "not_exec.sh"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o644)
    return str(path)


BAD_SPECS: list[tuple[str, dict[str, object], str]] = [
    ("nprocs 0", {"nprocs": 0}, r"nprocs must be between 1 and 1024, got 0"),
    ("nprocs negative", {"nprocs": -2}, r"nprocs must be between 1 and 1024, got -2"),
    ("nprocs too many", {"nprocs": 1025}, r"nprocs must be between 1 and 1024, got 1025"),
    (
        "missing entrypoint",
        {"entrypoint": "/nonexistent/bin/worker"},
        r"entrypoint '/nonexistent/bin/worker' does not exist or is not a file",
    ),
    ("empty entrypoint", {"entrypoint": ""}, r"entrypoint is empty"),
    (
        "entrypoint not on PATH",
        {"entrypoint": "no-such-binary-rankd"},
        r"entrypoint 'no-such-binary-rankd' was not found on PATH",
    ),
    ("entrypoint is a directory", {"entrypoint": "/"}, r"does not exist or is not a file"),
    ("non-executable entrypoint", {"entrypoint": _non_executable}, r"is not executable"),
    (
        "unparsable redirect map",
        {"redirects": "0:3,1"},
        r"redirects: 0:3,1 does not match: <\^\[0123\]\$>",
    ),
    ("unparsable tee", {"tee": "all"}, r"tee: all does not match"),
    ("job id with slash", {"job_id": "a/b"}, r"invalid job id 'a/b'"),
    ("job id dotdot", {"job_id": ".."}, r"invalid job id '\.\.'"),
    ("job id containing dotdot", {"job_id": "x..y"}, r"without '\.\.'"),
    ("job id dot", {"job_id": "."}, r"invalid job id '\.'"),
    ("empty job id", {"job_id": ""}, r"invalid job id ''"),
    ("job id too long", {"job_id": "j" * 129}, r"invalid job id"),
    (
        "rank_env out of range",
        {"nprocs": 2, "rank_env": {2: {"A": "1"}}},
        r"rank_env: local ranks \[2\] are out of range for nprocs=2 \(valid: 0-1\)",
    ),
    (
        "rank_args out of range",
        {"nprocs": 2, "rank_args": {-1: ("x",)}},
        r"rank_args: local ranks \[-1\] are out of range",
    ),
    (
        "local_ranks_filter out of range",
        {"nprocs": 2, "local_ranks_filter": frozenset({0, 5})},
        r"local_ranks_filter: local ranks \[5\] are out of range",
    ),
    ("env key with =", {"env": {"A=B": "1"}}, r"invalid environment variable name 'A=B'"),
    ("empty env key", {"env": {"": "1"}}, r"invalid environment variable name ''"),
    (
        "rank env key with =",
        {"rank_env": {0: {"X=": "1"}}},
        r"invalid environment variable name 'X='",
    ),
    ("env value with NUL", {"env": {"A": "x\0y"}}, r"env\[A\] contains a NUL byte"),
    ("arg with NUL", {"args": ("a\0",)}, r"args contains a NUL byte"),
    ("relative cwd", {"cwd": "rel/dir"}, r"cwd must be an absolute path, got 'rel/dir'"),
    ("missing cwd", {"cwd": "/nonexistent/dir"}, r"cwd '/nonexistent/dir' does not exist"),
    ("negative kill_timeout", {"kill_timeout": -1.0}, r"kill_timeout must be between 0 and"),
    ("nan kill_timeout", {"kill_timeout": float("nan")}, r"kill_timeout must be between"),
    ("bad role", {"role_name": "a b"}, r"invalid role_name 'a b'"),
    ("negative restart_count", {"restart_count": -1}, r"restart_count must be >= 0, got -1"),
    ("negative rank_offset", {"rank_offset": -1}, r"rank_offset must be >= 0, got -1"),
    (
        "unknown template placeholder",
        {"log_line_prefix_template": "[${host}]"},
        r"unknown placeholder\(s\) \['host'\]",
    ),
    (
        "empty duplicate filter",
        {"duplicate_stdout_filters": ("ok", "")},
        r"duplicate_stdout_filters: filters must be non-empty",
    ),
]


@pytest.mark.parametrize(
    ("fields", "message"), [(f, m) for _, f, m in BAD_SPECS], ids=[n for n, _, _ in BAD_SPECS]
)
async def test_bad_spec_raises_and_starts_nothing(
    core: Core, fields: dict[str, object], message: str
) -> None:
    fields = {k: v(core.tmp) if callable(v) else v for k, v in fields.items()}
    spec_fields: dict[str, object] = {
        "job_id": "bad",
        "nprocs": 1,
        "entrypoint": PYTHON,
        "args": ("-c", "pass"),
    }
    spec_fields.update(fields)
    children_before = procs.agent_children()
    with pytest.raises(SpecError, match=message):
        await core.sup.start(JobSpec(**spec_fields))  # type: ignore[arg-type]
    assert core.log_entries() == []
    assert core.sup.jobs() == []
    assert procs.agent_children() - children_before == set()


async def test_exec_failure_after_validation_leaves_nothing(core: Core) -> None:
    # Valid by every check, but the kernel refuses to exec it (no such interpreter).
    bad = core.tmp / "bad_interp.sh"
    bad.write_text("#!/nonexistent/interpreter\n")
    bad.chmod(0o755)
    with pytest.raises(SpecError, match=r"cannot start .*bad_interp\.sh"):
        await core.sup.start(JobSpec(job_id="exec", nprocs=3, entrypoint=str(bad)))
    assert core.log_entries() == []
    assert core.sup.jobs() == []


def test_log_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(SpecError, match=r"log dir '.*/file' exists and is not a directory"):
        Supervisor(str(path))
    assert path.read_text() == "x"


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nprocs"):
        JobSpec(job_id="j", nprocs=0, entrypoint=PYTHON).validate()
    assert os.path.isabs(JobSpec(job_id="j", nprocs=1, entrypoint=PYTHON).validate().entrypoint)


async def test_a_rank_that_cannot_start_among_spawn_threads_leaves_nothing(core: Core) -> None:
    # 12 ranks: started side by side by spawn threads. Rank 7's environment holds a
    # string over the kernel's 128 KiB per string: its exec fails (E2BIG), the others
    # start, and must all be killed and reaped, their directory gone.
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    spec = JobSpec(
        job_id="partial",
        nprocs=12,
        entrypoint="/bin/sleep",
        args=("30",),
        rank_env={7: {"BIG": "x" * 200_000}},
    )
    with pytest.raises(SpecError, match=r"cannot start /bin/sleep: Argument list too long"):
        await core.sup.start(spec)
    assert {p.pid for p in me.children()} == before  # none alive, none a zombie
    assert core.log_entries() == []
    assert core.sup.jobs() == []


async def test_a_bug_while_spawning_still_leaves_nothing(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not an OSError (a bug in the agent, simulated in its own code, not the OS's): the
    # exception reaches the caller as it is, and every rank the other lanes started is
    # killed and reaped all the same.
    real = procs.spawn

    def broken(argv: list[str], *, env: list[bytes], **kw: Any) -> int:
        if b"LOCAL_RANK=7" in env:
            raise RuntimeError("bug in rank 7's start")
        return real(argv, env=env, **kw)

    monkeypatch.setattr(procs, "spawn", broken)
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    spec = JobSpec(job_id="bug", nprocs=12, entrypoint="/bin/sleep", args=("30",))
    with pytest.raises(RuntimeError, match="bug in rank 7"):
        await core.sup.start(spec)
    assert {p.pid for p in me.children()} == before
    assert core.log_entries() == []
    assert core.sup.jobs() == []
