"""Thousands of random and hostile requests at a live agent: every answer is a proper
status code, the agent stays up, and no file appears outside its log dir."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers.agents import Agent, start_agent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
        duplicate_stdout_filters=draw(st.lists(some_text, max_size=2)),
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
        contains=draw(some_text),
        regex=draw(st.one_of(st.sampled_from(["(", "[", "a{99999}", ".*", "(?P<x>"]), some_text)),
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
