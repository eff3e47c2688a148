"""A rank cannot freeze the agent, nor make it serve another file, through the files it
can reach (issue 20, findings 2, 7c and 7d): a FIFO or a symbolic link in place of its
log files, its error file or its rank directory, a tampered job.json under an agent
restarted on the same log directory, a resume cursor at the int64 limit, and an error
message that tries to forge a line of the agent's text log. Real agents, real ranks."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.agents import PYTHON, RANKD_BIN, Agent, start_agent
from helpers.wait import wait_until

from rankd.agent.logfmt import TextFormatter
from rankd.testing import start_agent as start_local_agent
from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc

SECRET = "TOP-SECRET-c0ffee"
INT64_MAX = 2**63 - 1

# Rank 0 puts a FIFO in place of its stderr.log and a link to a secret in place of its
# stdout.log; rank 1, once the gate's "-move" file exists, moves its whole rank directory
# away and leaves a link to a directory of secrets in its place. Each then says so (a
# file), waits for the gate, and fails.
PLANTER = """\
import os, sys, time
rank = os.environ["LOCAL_RANK"]
here = os.path.dirname(os.environ["TORCHELASTIC_ERROR_FILE"])
secrets, gate = sys.argv[1], sys.argv[2]
print("before the swap", flush=True)
if rank == "0":
    os.unlink(os.path.join(here, "stderr.log"))
    os.mkfifo(os.path.join(here, "stderr.log"))
    os.unlink(os.path.join(here, "stdout.log"))
    os.symlink(os.path.join(secrets, "stdout.log"), os.path.join(here, "stdout.log"))
else:
    while not os.path.exists(gate + "-move"):
        time.sleep(0.01)
    os.rename(here, here + ".moved")
    os.symlink(secrets, here)
open(gate + "-planted-" + rank, "w").close()
while not os.path.exists(gate):
    time.sleep(0.01)
sys.exit(3)
"""

# The rank's error file is a FIFO (no argument), or a link to a secret in torch's format.
ERROR_PLANTER = """\
import os, sys
path = os.environ["TORCHELASTIC_ERROR_FILE"]
if len(sys.argv) > 1:
    os.symlink(sys.argv[1], path)
else:
    os.mkfifo(path)
sys.exit(1)
"""


def _secrets(tmp_path: Path) -> Path:
    """A directory of files that no Stream or Poll may ever show."""
    where = tmp_path / "secrets"
    where.mkdir()
    for name in ("stdout.log", "stderr.log"):
        (where / name).write_text(f"{SECRET} in {name}\n")
    (where / "error.json").write_text(json.dumps({"message": SECRET, "timestamp": 1}))
    return where


def _start(agent: Agent, job_id: str, nprocs: int, *args: str) -> None:
    spec = pb.JobSpec(job_id=job_id, nprocs=nprocs, entrypoint=PYTHON, args=list(args))
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=30)


def _poll(agent: Agent, job_id: str, channel: grpc.Channel | None = None) -> pb.JobStatus:
    """The job's status, asked on the agent's channel or on `channel` (another client)."""
    stub = agent.stub if channel is None else agent_pb2_grpc.NodeAgentStub(channel)
    return stub.Poll(pb.PollRequest(job_id=job_id), timeout=5).job


def _ended(agent: Agent, job_id: str) -> pb.JobStatus:
    wait_until(lambda: _poll(agent, job_id).state != pb.RUNNING, 30, f"{job_id} to end")
    return _poll(agent, job_id)


def _stream(agent: Agent, job_id: str, **kw: object) -> list[pb.StreamResponse]:
    """Every message of a Stream, which must end within 20 s (it hung for good)."""
    return list(agent.stub.Stream(pb.StreamRequest(job_id=job_id, **kw), timeout=20))


def _lines(messages: list[pb.StreamResponse]) -> list[pb.LogLine]:
    return [line for m in messages for line in m.lines]


def _everything(messages: list[pb.StreamResponse]) -> str:
    """All a stream carried, lines, packed blocks and the final status, as one text."""
    return "".join(
        str(m) + "".join(b.data.decode(errors="replace") for b in m.blocks) for m in messages
    )


def _health_latencies(agent: Agent, count: int = 5) -> list[float]:
    health = health_pb2_grpc.HealthStub(agent.channel)
    took = []
    for _ in range(count):
        start = time.monotonic()
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        took.append(time.monotonic() - start)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    print("health answered in", ", ".join(f"{t * 1000:.1f} ms" for t in took))  # (pytest -rP)
    return took


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """A file a rank waits for; made at the end in any case, so no rank waits on."""
    path = tmp_path / "gate"
    yield path
    path.touch()


@pytest.mark.parametrize("follow_mode", ["auto", "poll"])
def test_planted_fifo_and_links_neither_hang_the_agent_nor_leak(
    tmp_path: Path, gate: Path, follow_mode: str
) -> None:
    secrets = _secrets(tmp_path)
    script = tmp_path / "planter.py"
    script.write_text(PLANTER)
    agent = start_agent(tmp_path / "logs", "--log-follow", follow_mode)
    try:
        _start(agent, "planted", 2, str(script), str(secrets), str(gate))
        wait_until(Path(f"{gate}-planted-0").exists, 30, "rank 0 to plant its files")

        # Poll says it before any Stream looked (inotify saw the files replaced, or the
        # poll follower asks them): the kind of file, never what a link points to
        def said(problem: str) -> bool:
            return any(problem in p for p in _poll(agent, "planted").ranks[0].file_problems)

        wait_until(lambda: said("stderr.log is a FIFO, not a regular file"), 10, "the FIFO")
        wait_until(lambda: said("stdout.log is a symbolic link"), 10, "the link")
        Path(f"{gate}-move").touch()
        wait_until(Path(f"{gate}-planted-1").exists, 30, "rank 1 to move its directory")

        # a Stream of the job ends (it blocked the agent in open() for good), serves no
        # secret, and says, per file, why it is not read
        for packed in (False, True):
            messages = _stream(agent, "planted", packed=packed)
            assert SECRET not in _everything(messages)
            notices = {(n.local_rank, n.stream): n for n in _lines(messages) if n.notice}
            assert sorted(notices) == [(0, 1), (0, 2), (1, 1), (1, 2)], messages
            assert "stdout.log is a symbolic link, not a regular file" in notices[(0, 1)].text
            assert "stderr.log is a FIFO, not a regular file" in notices[(0, 2)].text
            for stream in (1, 2):
                assert "/1 is a symbolic link, not a directory" in notices[(1, stream)].text
            assert all(n.text.startswith("rankd-agent: ") and n.partial for n in notices.values())
            assert notices[(0, 1)].prefix == "[default0]:"

        # the agent stays live: health within 100 ms, another client's Poll answers
        assert max(_health_latencies(agent)) < 0.1
        with grpc.insecure_channel(agent.address) as other:
            status = _poll(agent, "planted", other)
        assert status.state == pb.RUNNING
        problems = list(status.ranks[0].file_problems)
        assert any("stdout.log is a symbolic link" in p for p in problems), problems
        assert any("stderr.log is a FIFO" in p for p in problems), problems
        assert all(p.endswith(": not read") for p in problems)

        # what a user sees: `rankd logs` prints the agent's word, no secret, and ends
        cli = subprocess.run(
            [RANKD_BIN, "logs", "planted", "--nodes", agent.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert SECRET not in cli.stdout + cli.stderr
        assert "rankd-agent: " in cli.stdout and "is a FIFO, not a regular file" in cli.stdout

        # a follow stream lives through the ranks' ends; their failures leak nothing
        followed: list[pb.StreamResponse] = []
        follower = threading.Thread(
            target=lambda: followed.extend(_stream(agent, "planted", follow=True))
        )
        follower.start()
        gate.touch()
        follower.join(30)
        assert not follower.is_alive(), "the follow stream did not end with the job"
        assert followed[-1].end, followed[-1]
        final = _ended(agent, "planted")
        assert final.state == pb.FAILED
        assert SECRET not in _everything(followed) + str(final)
        assert "1 is a symbolic link, not a directory" in final.ranks[1].failure.error_file_problem
        assert any("stderr.log is a FIFO" in p for p in final.ranks[0].file_problems)

        # SIGTERM still stops it promptly
        start = time.monotonic()
        code = agent.stop(timeout=15)
        assert time.monotonic() - start < 10
        assert code == -15, agent.stderr_tail()
        assert "Traceback" not in agent.stderr_tail(200)
    finally:
        agent.stop()


def test_error_files_that_are_fifos_or_links_are_said_never_read(tmp_path: Path) -> None:
    secrets = _secrets(tmp_path)
    script = tmp_path / "error_planter.py"
    script.write_text(ERROR_PLANTER)
    agent = start_agent(tmp_path / "logs")
    try:
        _start(agent, "fifo-error", 1, str(script))
        _start(agent, "link-error", 1, str(script), str(secrets / "error.json"))
        statuses = [_ended(agent, job_id) for job_id in ("fifo-error", "link-error")]
        assert [s.state for s in statuses] == [pb.FAILED, pb.FAILED]
        assert SECRET not in str(statuses)
        fifo, link = (s.ranks[0].failure for s in statuses)
        assert fifo.error_file_problem.startswith("error file ")
        assert fifo.error_file_problem.endswith(
            "error.json is a FIFO, not a regular file: not read"
        )
        assert "error.json is a symbolic link, not a regular file" in link.error_file_problem
        assert link.message == f"Process {link.pid} exited with code 1"
        assert link.error_file == fifo.error_file == "<N/A>"
        assert max(_health_latencies(agent)) < 0.1
    finally:
        agent.stop()


def test_a_resume_cursor_at_the_int64_limit_is_end_of_file(agent: Agent, tmp_path: Path) -> None:
    script = tmp_path / "talk.py"
    script.write_text("import sys\nprint('out line')\nprint('err line', file=sys.stderr)\n")
    _start(agent, "far", 1, str(script))
    _ended(agent, "far")
    for offset in (INT64_MAX, INT64_MAX - 1, INT64_MAX - 5, 2**62):
        resume = [pb.Cursor(local_rank=0, stream=pb.STDOUT, offset=offset)]
        for kw in ({}, {"packed": True}, {"follow": True}):
            messages = _stream(agent, "far", resume=resume, **kw)  # no UNKNOWN, no INTERNAL
            lines = _lines(messages)
            texts = [ln.text for ln in lines] + [
                b.data.decode() for m in messages for b in m.blocks
            ]
            assert texts == ["err line\n"] if kw.get("packed") else ["err line"], (offset, kw)
            assert not kw.get("follow") or messages[-1].end
    assert "Traceback" not in agent.stderr_tail(200)
    assert "Unexpected" not in agent.stderr_tail(200)


def test_a_newline_in_an_error_message_cannot_forge_an_agent_log_line(tmp_path: Path) -> None:
    forged = "2026-12-05 10:00:00,000 WARNING rankd.agent.server: FORGED"
    message = f"boom\n{forged}\r\x1b[2Kcleared\u2028sep"
    script = tmp_path / "liar.py"
    script.write_text(
        "import json, os, sys\n"
        "with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:\n"
        f"    json.dump({{'message': {message!r}, 'timestamp': 1}}, f)\n"
        "sys.exit(1)\n"
    )
    agent = Agent.adopt(start_local_agent(tmp_path / "logs", "--log-format", "text"))
    try:
        _start(agent, "liar", 1, str(script))
        status = _ended(agent, "liar")
        assert status.failures[0].message == message  # the data itself is kept as it is
        wait_until(lambda: "local rank 0 failed" in agent.stderr_tail(200), 10, "the log line")
        lines = agent.stderr_tail(200).splitlines()
        (said,) = [ln for ln in lines if "FORGED" in ln or "cleared" in ln]
        assert "WARNING rankd.agent.supervisor: job liar: local rank 0 failed: boom\\n20" in said
        assert said.endswith("\\r\\x1b[2Kcleared\\u2028sep")
    finally:
        agent.stop()


def test_the_text_log_escapes_messages_but_keeps_tracebacks() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    log = logging.getLogger("rankd.test.logfmt")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("job %s: %s", "j", "two\nlines")
        try:
            raise RuntimeError("inner")
        except RuntimeError:
            log.exception("plain")
    finally:
        log.removeHandler(handler)
    first, *rest = out.getvalue().splitlines()
    assert first.endswith("rankd.test.logfmt: job j: two\\nlines")
    assert rest[0].endswith("rankd.test.logfmt: plain")
    assert rest[1] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: inner"


def test_a_restart_over_a_tampered_log_dir_derives_every_path_again(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    script = tmp_path / "victim.py"
    script.write_text(
        "import json, os, sys\nprint('the real line', flush=True)\n"
        "with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:\n"
        "    json.dump({'message': 'the real failure', 'timestamp': 1}, f)\n"
        "sys.exit(1)\n"
    )
    first = start_agent(log_dir)
    try:
        _start(first, "victim", 1, str(script))
        _ended(first, "victim")
    finally:
        first.stop()
    (run_dir,) = log_dir.glob("victim_*")
    record = run_dir / "job.json"

    # a look-alike attempt full of secrets, which the record now names
    evil = tmp_path / "evil" / "attempt_0"
    (evil / "0").mkdir(parents=True)
    for name in ("stdout.log", "stderr.log"):
        (evil / "0" / name).write_text(f"{SECRET}\n")
    data = json.loads(record.read_text())
    data["attempts"][0]["attempt_dir"] = str(evil)
    data["attempts"][0]["ranks"][0]["failure"]["error_file"] = str(evil / "0" / "error.json")
    record.write_text(json.dumps(data))
    # records a rank could plant beside it: a FIFO, a link, one that names a job which
    # does not own its run directory, and two that crashed the JSON decoder or float()
    planted = {
        "fifo_0000aaaa": "is a FIFO, not a regular file",
        "link_0000bbbb": "is a symbolic link, not a regular file",
        "liar_0000cccc": "does not own the run directory",
        "deep_0000dddd": "maximum recursion depth exceeded",
        "huge_0000eeee": "too large to convert to float",
    }
    for name in planted:
        (log_dir / name).mkdir()
    os.mkfifo(log_dir / "fifo_0000aaaa" / "job.json")
    os.symlink(record, log_dir / "link_0000bbbb" / "job.json")
    (log_dir / "liar_0000cccc" / "job.json").write_text(json.dumps(data))
    (log_dir / "deep_0000dddd" / "job.json").write_text(
        '{"format": 1, "attempts": ' + "[" * 200_000
    )
    huge = json.dumps(data).replace('"start_time": ', '"start_time": 1' + "0" * 400 + ', "x": ', 1)
    (log_dir / "huge_0000eeee" / "job.json").write_text(huge)

    second = start_agent(log_dir)  # (a FIFO read at startup would block it for good)
    try:
        jobs = second.stub.List(pb.ListRequest(), timeout=5).jobs
        assert [j.job_id for j in jobs] == ["victim"]
        status = _poll(second, "victim")
        attempt = run_dir / "attempt_0"
        assert status.attempt_dir == str(attempt)
        assert status.ranks[0].stdout_path == str(attempt / "0" / "stdout.log")
        assert status.failures[0].error_file == str(attempt / "0" / "error.json")
        assert status.failures[0].message == "the real failure"
        messages = _stream(second, "victim")
        assert [ln.text for ln in _lines(messages)] == ["the real line"]
        assert SECRET not in _everything(messages)
        said = second.stderr_tail(200)
        for name, why in planted.items():
            found = [ln for ln in said.splitlines() if name in ln]
            assert len(found) == 1 and why in found[0], (name, said)
    finally:
        second.stop()


# The rank moves its stdout.log away and writes a new regular one in its place, then
# writes on to its own stdout (the first file).
REPLACER = """\
import os, sys, time
here = os.path.dirname(os.environ["TORCHELASTIC_ERROR_FILE"])
gate = sys.argv[1]
print("original 1", flush=True)
while not os.path.exists(gate + "-1"):
    time.sleep(0.01)
os.rename(os.path.join(here, "stdout.log"), os.path.join(here, "moved.log"))
with open(os.path.join(here, "stdout.log"), "w") as f:
    f.write("replacement\\n")
print("original 2", flush=True)
open(gate + "-replaced", "w").close()
while not os.path.exists(gate + "-2"):
    time.sleep(0.01)
"""


def test_a_stream_keeps_the_file_it_opened_and_later_streams_get_a_regular_replacement(
    agent: Agent, tmp_path: Path, gate: Path
) -> None:
    script = tmp_path / "replacer.py"
    script.write_text(REPLACER)
    _start(agent, "swap", 1, str(script), str(gate))
    followed: list[str] = []

    def follow() -> None:
        request = pb.StreamRequest(job_id="swap", follow=True, streams=[pb.STDOUT])
        for message in agent.stub.Stream(request, timeout=60):
            followed.extend(line.text for line in message.lines)

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        wait_until(lambda: followed == ["original 1"], 30, "the first line, followed")
        Path(f"{gate}-1").touch()
        wait_until(Path(f"{gate}-replaced").exists, 30, "the rank to replace its stdout.log")
        later = _lines(_stream(agent, "swap", streams=[pb.STDOUT]))
        assert [(ln.text, ln.notice) for ln in later] == [("replacement", False)]
    finally:
        Path(f"{gate}-2").touch()
        follower.join(30)
    assert not follower.is_alive()
    assert followed == ["original 1", "original 2"]
    assert not _poll(agent, "swap").ranks[0].file_problems
