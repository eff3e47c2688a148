"""Thousands of random and hostile requests at a live agent: every answer is a proper
status code, the agent stays up, and no file appears outside its log dir. Filters at and
around their limits are refused exactly when over one, naming it; the filters' matching
agrees with Python's on what both engines accept."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers.agents import Agent, start_agent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankd.agent.filters import MAX_CONTAINS_BYTES, MAX_REGEX_BYTES, any_of, stream_filter
from rankd.agent.specs import MAX_DUPLICATE_FILTER_BYTES, MAX_DUPLICATE_FILTERS
from rankd.v1 import agent_pb2 as pb

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
hostile = st.sampled_from(
    [
        "",
        ".",
        "..",
        "../x",
        "../../etc/passwd",
        "a/b",
        "/etc/passwd",
        "x" * 300,
        "\x00",
        "nul\x00byte",
        "ok-id",
        "émoji🙂",
        "${rank}/../../",
        "~root",
        "-rf",
        "job.1",
        "\n",
        "a..b",
        "CON",
        "%s%s%n",
        ".spare-0123abcd",
    ]
)
some_text = st.one_of(hostile, text)
big_text = st.one_of(some_text, st.integers(10_000, 200_000).map(lambda n: "A" * n))
int32 = st.integers(-(2**31), 2**31 - 1)
small = st.integers(-3, 10)
numbers = st.one_of(int32, small)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 0.01, math.nan])
)
job_ids = st.one_of(hostile, text, st.sampled_from(["fz-1", "fz-2", "fz-3"]))
# Regexes Python's `re` would backtrack on for minutes, RE2 syntax errors, and patterns
# at or over the agent's limits (bytes, repetitions, Unicode classes, program size).
hostile_regexes = st.sampled_from(
    [
        "(a+)+$",
        "(x+x+)+y",
        "(?!)",
        "(?=a)",
        "(?<=a)b",
        r"(a)\1",
        r"\Z",
        r"\pL" * 9,
        r"(\pL|\pN){100}x",
        ".{0,999}",
        "a{600}b{600}",
        "((a{10}){10}){10}",
        "a" * MAX_REGEX_BYTES,
        "a" * (MAX_REGEX_BYTES + 1),
        "é" * (MAX_REGEX_BYTES // 2 + 1),
    ]
)
# Lists of duplicate filters around the count and byte limits.
filter_lists = st.one_of(
    st.lists(some_text, max_size=3),
    st.integers(MAX_DUPLICATE_FILTERS - 2, MAX_DUPLICATE_FILTERS + 2).map(lambda n: ["f"] * n),
    st.integers(-2, 2).map(lambda d: ["x" * 1024] * 3 + ["y" * (1024 + d)]),
    st.just(["a" * (MAX_DUPLICATE_FILTER_BYTES - 1), "é"]),
)
entrypoints = st.one_of(
    st.sampled_from(["/bin/true", "true", "../../bin/true", "/bin/sh", "/", "/tmp", "bin/true"]),
    some_text,
)


@st.composite
def specs(draw: st.DrawFn) -> pb.JobSpec:
    spec = pb.JobSpec(
        job_id=draw(job_ids),
        nprocs=draw(st.one_of(small, int32)),
        entrypoint=draw(entrypoints),
        args=draw(st.lists(big_text, max_size=4)),
        env=draw(st.dictionaries(some_text, big_text, max_size=3)),
        cwd=draw(st.one_of(st.sampled_from(["", "/", "/nonexistent", "../..", "/etc"]), some_text)),
        role_name=draw(some_text),
        restart_count=draw(numbers),
        redirects=draw(st.one_of(st.sampled_from(["0", "3", "0:3,1:0", "9", "0:3,"]), some_text)),
        tee=draw(st.one_of(st.sampled_from(["1", "0:1", "x"]), some_text)),
        local_ranks_filter=draw(st.lists(numbers, max_size=3)),
        log_line_prefix_template=draw(
            st.one_of(st.sampled_from(["${rank}", "${nope}", "$$", "${", "../${rank}"]), some_text)
        ),
        duplicate_stdout_filters=draw(filter_lists),
        duplicate_stderr_filters=draw(filter_lists),
        rank_offset=draw(numbers),
    )
    if draw(st.booleans()):
        spec.kill_timeout = draw(floats)
    for rank in draw(st.lists(numbers, max_size=2)):
        spec.rank_args[rank].args.extend(draw(st.lists(some_text, max_size=2)))
    for rank in draw(st.lists(numbers, max_size=2)):
        spec.rank_env[rank].env.update(draw(st.dictionaries(some_text, some_text, max_size=2)))
    return spec


@st.composite
def kills(draw: st.DrawFn) -> pb.KillRequest:
    request = pb.KillRequest(
        job_id=draw(job_ids),
        signal=draw(
            st.one_of(st.sampled_from(["TERM", "SIGKILL", "0", "-9", "99", "SIGUSR1"]), some_text)
        ),
        no_escalate=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.timeout = draw(st.one_of(floats, st.sampled_from([0.0, 0.05])))
    return request


@st.composite
def streams(draw: st.DrawFn) -> pb.StreamRequest:
    request = pb.StreamRequest(
        job_id=draw(job_ids),
        ranks=draw(st.lists(numbers, max_size=3)),
        streams=draw(st.lists(st.sampled_from([0, 1, 2, 3, -1, 99]), max_size=3)),
        contains=draw(st.one_of(some_text, st.just("c" * (MAX_CONTAINS_BYTES + 1)))),
        regex=draw(
            st.one_of(
                st.sampled_from(["(", "[", "a{99999}", ".*", "(?P<x>"]), hostile_regexes, some_text
            )
        ),
        follow=False,
    )
    for _ in range(draw(st.integers(0, 2))):
        request.resume.append(
            pb.Cursor(
                local_rank=draw(numbers),
                stream=draw(st.sampled_from([0, 1, 2, 7])),
                offset=draw(st.one_of(st.integers(-(2**63), 2**63 - 1), small)),
            )
        )
    if draw(st.booleans()):
        request.restart_count = draw(numbers)
    return request


@st.composite
def near_valid_specs(draw: st.DrawFn) -> pb.JobSpec:
    """A spec that would run, with at most one hostile field: reaches the deeper paths."""
    spec = pb.JobSpec(
        job_id=draw(st.sampled_from(["fz-1", "fz-2", "fz-3"])),
        nprocs=draw(st.integers(1, 4)),
        entrypoint="/bin/true",
        restart_count=draw(st.integers(0, 3)),
    )
    hostile_spec = draw(specs())
    field = draw(
        st.sampled_from(
            [
                None,
                "args",
                "env",
                "cwd",
                "redirects",
                "tee",
                "log_line_prefix_template",
                "local_ranks_filter",
                "rank_offset",
                "role_name",
                "duplicate_stdout_filters",
                "duplicate_stderr_filters",
            ]
        )
    )
    if field is not None:
        spec.ClearField(field)
        value = getattr(hostile_spec, field)
        if isinstance(value, (str, int)):
            setattr(spec, field, value)
        elif hasattr(value, "items"):
            getattr(spec, field).update(value)
        else:
            getattr(spec, field).extend(value)
    return spec


requests = st.one_of(
    specs().map(lambda s: ("Start", pb.StartRequest(spec=s))),
    near_valid_specs().map(lambda s: ("Start", pb.StartRequest(spec=s))),
    st.just(("Start", pb.StartRequest())),
    kills().map(lambda k: ("Kill", k)),
    streams().map(lambda s: ("Stream", s)),
    job_ids.map(lambda j: ("Poll", pb.PollRequest(job_id=j))),
)


def _snapshot(root: Path, skip: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip:
            dirnames.clear()
            continue
        found.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return found


@pytest.fixture(scope="module")
def fuzz_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    root = tmp_path_factory.mktemp("fuzz")
    handle = start_agent(
        root / "logs",
        "--allow-entrypoint",
        "/bin/true",
        "--max-nprocs",
        "4",
        "--max-message-bytes",
        str(1024 * 1024),
    )
    try:
        yield handle
    finally:
        handle.stop()


@pytest.mark.timeout(600)
def test_hostile_requests(fuzz_agent: Agent) -> None:
    log_dir = fuzz_agent.log_dir
    root = log_dir.parent
    outside_before = _snapshot(root, log_dir)
    parent_before = set(os.listdir(root.parent))
    seen: dict[grpc.StatusCode, int] = {}

    @settings(
        max_examples=2000,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests)
    def one(item: tuple[str, object]) -> None:
        method, request = item
        call = getattr(fuzz_agent.stub, method)
        try:
            result = call(request, timeout=20)
            if method == "Stream":
                list(result)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
            assert code in ALLOWED, (method, request, code, err.details())
            assert "Traceback" not in (err.details() or "")
        seen[code] = seen.get(code, 0) + 1

    one()
    assert sum(seen.values()) >= 2000
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100
    assert seen.get(grpc.StatusCode.OK, 0) > 20  # the deeper paths were reached too
    assert fuzz_agent.proc.poll() is None, "the agent died"
    assert fuzz_agent.stub.Info(pb.InfoRequest(), timeout=5).pid == fuzz_agent.proc.pid
    assert _snapshot(root, log_dir) == outside_before
    assert set(os.listdir(root.parent)) == parent_before
    real_log_dir = os.path.realpath(log_dir)
    for dirpath, dirnames, filenames in os.walk(log_dir):
        for name in dirnames + filenames:
            assert os.path.realpath(os.path.join(dirpath, name)).startswith(real_log_dir + os.sep)


def _over_limits(needles: list[str]) -> bool:
    return (
        len(needles) > MAX_DUPLICATE_FILTERS
        or sum(len(n.encode()) for n in needles) > MAX_DUPLICATE_FILTER_BYTES
    )


@pytest.mark.timeout(300)
def test_filter_limits_are_exact(fuzz_agent: Agent) -> None:
    """Duplicate filters and Stream filters just under, at and over each limit: refused
    (INVALID_ARGUMENT naming the limit, nothing started) exactly when over one."""
    stub = fuzz_agent.stub
    started = iter(range(10**6))

    @settings(max_examples=150, deadline=None, database=None)
    @given(
        count=st.integers(1, MAX_DUPLICATE_FILTERS + 3),
        size=st.integers(1, 2 * MAX_DUPLICATE_FILTER_BYTES // MAX_DUPLICATE_FILTERS),
        wide=st.booleans(),
        stream=st.sampled_from(["duplicate_stdout_filters", "duplicate_stderr_filters"]),
    )
    def one(count: int, size: int, wide: bool, stream: str) -> None:
        needles = [("é" if wide else "e") * size] * count
        job_id = f"fl-{next(started)}"
        spec = pb.JobSpec(job_id=job_id, nprocs=1, entrypoint="/bin/true")
        getattr(spec, stream).extend(needles)
        try:
            stub.Start(pb.StartRequest(spec=spec), timeout=20)
        except grpc.RpcError as err:
            assert _over_limits(needles), err.details()
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert stream in err.details() and "over the limit of" in err.details()
            ids = {j.job_id for j in stub.List(pb.ListRequest(), timeout=10).jobs}
            assert job_id not in ids
            return
        assert not _over_limits(needles)

    one()

    @settings(max_examples=60, deadline=None, database=None)
    @given(
        regex_bytes=st.integers(MAX_REGEX_BYTES - 2, MAX_REGEX_BYTES + 2),
        contains_bytes=st.integers(MAX_CONTAINS_BYTES - 2, MAX_CONTAINS_BYTES + 2),
        which=st.sampled_from(["regex", "contains"]),
    )
    def stream(regex_bytes: int, contains_bytes: int, which: str) -> None:
        request = pb.StreamRequest(job_id="fl-0")
        size, limit = (
            (regex_bytes, MAX_REGEX_BYTES)
            if which == "regex"
            else (contains_bytes, MAX_CONTAINS_BYTES)
        )
        setattr(request, which, "z" * size)
        try:
            list(stub.Stream(request, timeout=20))
        except grpc.RpcError as err:
            assert size > limit, err.details()
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert which in err.details() and str(limit) in err.details()
            return
        assert size <= limit

    stream()


# A small regex grammar on which Python's `re` and RE2 agree (no newline in the lines).
_atoms = st.sampled_from(["a", "b", "é", ".", "[ab]", "[^a]", "\\.", "!"])
_pieces = st.tuples(_atoms, st.sampled_from(["", "*", "+", "?", "{1,2}"])).map("".join)
_regexes = st.builds(
    lambda anchor_start, body, alternative, anchor_end: (
        anchor_start
        + "".join(body)
        + ("|" + "".join(alternative) if alternative else "")
        + anchor_end
    ),
    st.sampled_from(["", "^"]),
    st.lists(_pieces, min_size=1, max_size=4),
    st.lists(_pieces, max_size=2),
    st.sampled_from(["", "$"]),
)
_lines = st.lists(st.text(alphabet="abé!.", max_size=12), max_size=30)


@settings(max_examples=1000, deadline=None, database=None)
@given(
    texts=_lines,
    needles=st.lists(st.text(alphabet="abé!\n", min_size=1, max_size=4), min_size=1, max_size=4),
    contains=st.text(alphabet="abé!", max_size=3),
    regex=st.one_of(st.just(""), _regexes),
)
def test_filters_agree_with_python(
    texts: list[str], needles: list[str], contains: str, regex: str
) -> None:
    """The block search of literal filters and RE2's regexes keep the lines that `in`
    and Python's `re.search` keep, in order."""
    assert any_of(needles).keep(texts) == [
        i for i, t in enumerate(texts) if any(n in t for n in needles)
    ]
    line_filter = stream_filter(contains, regex)
    expected = [
        i
        for i, t in enumerate(texts)
        if contains in t and (not regex or re.search(regex, t) is not None)
    ]
    assert (line_filter.keep(texts) if line_filter else list(range(len(texts)))) == expected
