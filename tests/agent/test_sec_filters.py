"""No filter freezes the agent (issue 20, finding 3), and job ids cannot take the agent's
own names in its log dir (finding 7a).

Against a real agent: one client streams with a hostile regex, or starts jobs with the
most (or far too many) duplicate filters, while another Polls in a loop; the Poll's
p99 stays under 50 ms. Python's `re` spent seconds on `(a+)+$` and one line of 25 `a`s
and a `!`, and minutes on 32: these tests would time out there."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from helpers.agents import Agent, start_agent
from helpers.wait import wait_until

from rankd.agent.filters import (
    MATCH_BUDGET,
    MAX_CONTAINS_BYTES,
    MAX_REGEX_BYTES,
    MAX_REPEAT,
    MAX_UNICODE_CLASSES,
)
from rankd.agent.security import MAX_MESSAGE_BYTES
from rankd.agent.specs import MAX_DUPLICATE_FILTER_BYTES, MAX_DUPLICATE_FILTERS, Limits
from rankd.v1 import agent_pb2 as pb

P99_LIMIT = 0.050
HOSTILE = "(a+)+$"

# argv[1] lines of 25-40 `a`s, each but every 1000th ending with `!`; then argv[2] lines
# of 60,000 random letters and a `.` (slow for the worst RE2 programs: ~1 µs a byte).
LINES = """\
import random, sys
n, long = int(sys.argv[1]), int(sys.argv[2])
out = ["a" * (25 + i % 16) + ("" if i % 1000 == 999 else "!") for i in range(n)]
sys.stdout.write("\\n".join(out) + "\\n")
rng = random.Random(7)
for _ in range(long):
    sys.stdout.write("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(60000)))
    sys.stdout.write(".\\n")
"""
N_LINES = 40_000

# The most a stream's duplicate filters may be: MAX_DUPLICATE_FILTERS of them (the first
# matches the lines of 40 `a`s and a `!`, the others nearly match every line), with at
# most MAX_DUPLICATE_FILTER_BYTES together.
FILTERS = ["a" * 40 + "!"] + ["a" * 59 + f"b{i:03d}!" for i in range(1, MAX_DUPLICATE_FILTERS)]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    handle = start_agent(tmp_path_factory.mktemp("filters") / "logs")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def lines_job(agent: Agent, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished job whose rank printed the lines above, started with the most
    duplicate filters."""
    script = tmp_path_factory.mktemp("worker") / "lines.py"
    script.write_text(LINES)
    spec = pb.JobSpec(
        job_id="lines",
        nprocs=1,
        entrypoint=sys.executable,
        args=[str(script), str(N_LINES), "48"],
        duplicate_stdout_filters=FILTERS,
    )
    assert sum(len(f.encode()) for f in FILTERS) <= MAX_DUPLICATE_FILTER_BYTES
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=30)
    wait_until(lambda: _state(agent, "lines") == pb.SUCCEEDED, 60, "the job's end")
    return "lines"


def _state(agent: Agent, job_id: str) -> int:
    return int(agent.stub.Poll(pb.PollRequest(job_id=job_id), timeout=10).job.state)


# Polls a job in a loop until the file argv[3] exists, then prints each answer's latency.
# A process of its own: the test's own threads (a stream's parsing, a 1.7 MB request's
# encoding) would otherwise delay its Polls, which are to measure the agent.
POLLER = """\
import json, os, sys, time
import grpc
from rankd.v1 import agent_pb2 as pb, agent_pb2_grpc
address, job_id, stop = sys.argv[1:4]
stub = agent_pb2_grpc.NodeAgentStub(grpc.insecure_channel(address))
request = pb.PollRequest(job_id=job_id)
stub.Poll(request, timeout=30)
print("ready", flush=True)
latencies = []
while not os.path.exists(stop):
    start = time.perf_counter()
    stub.Poll(request, timeout=30)
    latencies.append(time.perf_counter() - start)
    time.sleep(0.002)
print(json.dumps(latencies), flush=True)
"""


class Poller:
    """Another client: Polls `job_id` in a loop, in a process of its own, from `with`
    to its end; then `latencies` holds each answer's."""

    def __init__(self, agent: Agent, job_id: str, tmp_path: Path) -> None:
        self._args = [sys.executable, "-c", POLLER, agent.address, job_id]
        self._stop = tmp_path / f"stop-poller-{time.monotonic_ns()}"
        self.latencies: list[float] = []

    def __enter__(self) -> Poller:
        self._proc = subprocess.Popen(
            [*self._args, str(self._stop)], stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        assert self._proc.stdout.readline() == "ready\n"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.touch()
        out, _ = self._proc.communicate(timeout=60)
        if exc[0] is None:
            assert self._proc.returncode == 0
            self.latencies = json.loads(out)

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        assert len(ordered) >= 50, f"only {len(ordered)} Polls were answered"
        return ordered[int(len(ordered) * 0.99) - 1]

    def check(self) -> None:
        p99 = self.p99()
        said = f"Poll p99 {p99 * 1000:.1f} ms over {len(self.latencies)} Polls"
        print(f"{said}, the slowest {max(self.latencies) * 1000:.1f} ms")  # (pytest -rP)
        assert p99 < P99_LIMIT, said


def _error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _stream(agent: Agent, **request: object) -> list[pb.LogLine]:
    responses = agent.stub.Stream(pb.StreamRequest(**request), timeout=60)  # type: ignore[arg-type]
    return [line for response in responses for line in response.lines]


def _repeat(action: Callable[[], object], *, times: int = 3, seconds: float = 1.0) -> None:
    """`action` at least `times` times and for at least `seconds`: enough Polls meanwhile."""
    deadline = time.monotonic() + seconds
    done = 0
    while done < times or time.monotonic() < deadline:
        action()
        done += 1


def test_hostile_regex_keeps_poll_fast(agent: Agent, lines_job: str, tmp_path: Path) -> None:
    matching = [i for i in range(N_LINES) if i % 1000 == 999]  # the lines without `!`

    def hostile() -> None:
        got = _stream(agent, job_id=lines_job, regex=HOSTILE)
        assert [ln.text for ln in got] == ["a" * (25 + i % 16) for i in matching]
        got = _stream(agent, job_id=lines_job, regex=HOSTILE, contains="a" * 39)
        assert len(got) == len([i for i in matching if i % 16 >= 14])

    with Poller(agent, lines_job, tmp_path) as poller:
        _repeat(hostile)
    poller.check()


def test_duplicate_filters_at_the_limit_copy_every_line(agent: Agent, lines_job: str) -> None:
    """The mirror of the most filters the agent allows wrote exactly the lines holding
    one of them (the first filter: 40 `a`s and a `!`; the others match no line)."""
    (path,) = agent.log_dir.glob(f"{lines_job}_*/attempt_0/filtered_stdout.log")
    expected = [
        f"[default0]:{'a' * 40}!" for i in range(N_LINES) if i % 16 == 15 and i % 1000 != 999
    ]
    wait_until(
        lambda: path.read_text().count("\n") >= len(expected), 30, "the filtered file's lines"
    )
    assert path.read_text().splitlines() == expected


def test_slow_regex_stops_at_its_budget(agent: Agent, lines_job: str, tmp_path: Path) -> None:
    """Linear time can still be slow: `(.*a){100}` costs ~80 ms per 60 kB line. Its
    stream ends with RESOURCE_EXHAUSTED naming the budget; Polls are answered meanwhile."""
    with Poller(agent, lines_job, tmp_path) as poller:
        start = time.monotonic()
        err = _error(lambda: _stream(agent, job_id=lines_job, regex="(.*a){100}"))
        took = time.monotonic() - start
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert f"more than {MATCH_BUDGET:g} s of CPU" in err.details()
    assert took < 20 * MATCH_BUDGET
    poller.check()


@pytest.mark.parametrize(
    ("regex", "contains", "needle"),
    [
        ("a" * (MAX_REGEX_BYTES + 1), "", f"over the limit of {MAX_REGEX_BYTES}"),
        ("é" * (MAX_REGEX_BYTES // 2 + 1), "", f"over the limit of {MAX_REGEX_BYTES}"),
        ("", "x" * (MAX_CONTAINS_BYTES + 1), f"over the limit of {MAX_CONTAINS_BYTES}"),
        ("a{600}b{401}", "", f"add up to 1001, over the limit of {MAX_REPEAT}"),
        (r"\pL" * (MAX_UNICODE_CLASSES + 1), "", f"over the limit of {MAX_UNICODE_CLASSES}"),
        (r"(\pL|\pN){100}x", "", "larger than the agent's limit of 128 KiB"),
        ("(?=lookahead)", "", "RE2 syntax"),
        (r"(a)\1", "", "no backreferences"),
        ("(", "", "invalid regex"),
    ],
)
def test_filters_over_a_limit_are_refused(
    agent: Agent, lines_job: str, regex: str, contains: str, needle: str
) -> None:
    err = _error(lambda: _stream(agent, job_id=lines_job, regex=regex, contains=contains))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details(), err.details()


def test_never_matching_regex_of_older_clients(agent: Agent, lines_job: str) -> None:
    """`(?!)`, Python's empty lookahead that RE2 lacks, still means "no line": the
    client's wait for a job's end sends it."""
    responses = list(
        agent.stub.Stream(pb.StreamRequest(job_id=lines_job, regex="(?!)", follow=True), timeout=30)
    )
    assert not any(r.lines for r in responses)
    assert responses[-1].end and responses[-1].job.state == pb.SUCCEEDED


def _spec(job_id: str, **fields: object) -> pb.JobSpec:
    return pb.JobSpec(
        job_id=job_id, nprocs=1, entrypoint=sys.executable, args=["-c", "pass"], **fields
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "filters", "needle"),
    [
        (
            "duplicate_stdout_filters",
            ["x"] * (MAX_DUPLICATE_FILTERS + 1),
            f"{MAX_DUPLICATE_FILTERS + 1} filters, over the limit of {MAX_DUPLICATE_FILTERS}",
        ),
        (
            "duplicate_stderr_filters",
            ["y" * 128] * (MAX_DUPLICATE_FILTER_BYTES // 128) + ["z"],
            f"over the limit of {MAX_DUPLICATE_FILTER_BYTES}",
        ),
    ],
)
def test_too_many_duplicate_filters_start_nothing(
    agent: Agent, field: str, filters: list[str], needle: str
) -> None:
    before = set(agent.log_dir.iterdir())
    err = _error(
        lambda: agent.stub.Start(
            pb.StartRequest(spec=_spec("too-many", **{field: filters})), timeout=30
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details() and needle in err.details(), err.details()
    assert set(agent.log_dir.iterdir()) == before
    assert "too-many" not in {j.job_id for j in agent.stub.List(pb.ListRequest(), timeout=10).jobs}


def test_200k_duplicate_filters_keep_poll_fast(
    agent: Agent, lines_job: str, tmp_path: Path
) -> None:
    """The issue's flood (200,000 filters held the loop for 17 s): refused, before the
    filters are even copied out of the message, and nothing is started."""
    request = pb.StartRequest(
        spec=_spec("flood", duplicate_stdout_filters=[f"f{i}" for i in range(200_000)])
    )
    before = set(agent.log_dir.iterdir())

    # (1.7 MB: under the receive limit, so the agent does read it, and must refuse it by
    # the filter limit, the code path that took 17 s)
    assert request.ByteSize() < MAX_MESSAGE_BYTES

    def flood() -> None:
        err = _error(lambda: agent.stub.Start(request, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert f"200000 filters, over the limit of {MAX_DUPLICATE_FILTERS}" in err.details()

    with Poller(agent, lines_job, tmp_path) as poller:
        _repeat(flood, times=10)
    poller.check()
    assert set(agent.log_dir.iterdir()) == before


# A quarter of the receive limit in entries of two bytes each (those of a map about ten):
# refused by their count on the message itself. Copying them out first (args, env) or
# keeping them (local_ranks_filter, a set) held the loop 100-400 ms a request at twice
# this size. What remains is the message's decoding, on the loop (~25 ms at 2 MiB).
_QUARTER = MAX_MESSAGE_BYTES // 4


@pytest.mark.parametrize(
    ("field", "entries", "needle"),
    [
        ("args", [""] * (_QUARTER // 2), "too many arguments (262146 > 4096)"),
        ("local_ranks_filter", [0] * _QUARTER, "524288 entries, over the limit of 1024 ranks"),
        ("env", {f"{i:x}": "" for i in range(_QUARTER // 10)}, "too many environment variables"),
        ("duplicate_stderr_filters", [""] * (_QUARTER // 2), "over the limit of 64"),
    ],
)
def test_a_start_of_many_entries_keeps_poll_fast(
    agent: Agent, lines_job: str, tmp_path: Path, field: str, entries: object, needle: str
) -> None:
    request = pb.StartRequest(spec=_spec("many"))
    target = getattr(request.spec, field)
    target.update(entries) if field == "env" else target.extend(entries)  # type: ignore[arg-type]
    assert MAX_MESSAGE_BYTES * 0.2 < request.ByteSize() < MAX_MESSAGE_BYTES * 0.4

    def start() -> None:
        err = _error(lambda: agent.stub.Start(request, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert needle in err.details(), err.details()

    with Poller(agent, lines_job, tmp_path) as poller:
        _repeat(start, times=10, seconds=3)
    poller.check()
    assert "many" not in {j.job_id for j in agent.stub.List(pb.ListRequest(), timeout=10).jobs}


def test_rank_maps_of_more_ranks_than_a_job_can_have_are_refused_by_their_size(
    agent: Agent,
) -> None:
    for field, entry in (("rank_args", pb.RankArgs(args=["a"])), ("rank_env", pb.RankEnv())):
        request = pb.StartRequest(spec=_spec("ranks"))
        for rank in range(Limits().max_nprocs + 1):
            getattr(request.spec, field)[rank].CopyFrom(entry)
        err = _error(functools.partial(agent.stub.Start, request, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == f"{field}: 1025 entries, over the limit of 1024 ranks"


@pytest.mark.parametrize("job_id", [".spare-abc123", ".spare-", ".hidden", ".x"])
def test_job_ids_cannot_take_the_agents_own_names(agent: Agent, job_id: str) -> None:
    """A run directory starts with its job id; `.spare-*` ones are the agent's spares,
    which it deletes at start (they were a real job's logs). Ids starting with '.' are
    refused, for every RPC that names a job, and nothing is made."""
    before = set(agent.log_dir.iterdir())
    for call in (
        lambda: agent.stub.Start(pb.StartRequest(spec=_spec(job_id)), timeout=30),
        lambda: agent.stub.Poll(pb.PollRequest(job_id=job_id), timeout=10),
        lambda: agent.stub.Kill(pb.KillRequest(job_id=job_id), timeout=10),
    ):
        err = _error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reserved" in err.details() and "'.spare-*'" in err.details(), err.details()
    assert set(agent.log_dir.iterdir()) == before


def test_job_ids_with_dots_inside_still_work(agent: Agent) -> None:
    agent.stub.Start(pb.StartRequest(spec=_spec("run.1.spare-x")), timeout=30)
    wait_until(lambda: _state(agent, "run.1.spare-x") == pb.SUCCEEDED, 30, "the job's end")
