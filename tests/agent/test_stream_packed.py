"""Packed streams (StreamRequest.packed): the same lines, cursors, cuts and prefixes as
one LogLine per line, carried as raw LogBlocks."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from helpers.agents import Agent
from helpers.wait import wait_until

from rankd.client.streams import unpack_block
from rankd.v1 import agent_pb2 as pb

pytestmark = pytest.mark.timeout(60)

Line = tuple[int, int, int, str, str, bool]  # rank, stream, cursor, text, prefix, partial

# ASCII, UTF-8, invalid bytes, an empty line, a line cut at 64 KiB three times, lines
# around it, and a last line without newline; on both streams of two ranks.
WORKER = r"""
import os, sys
r = int(os.environ["LOCAL_RANK"])
out = b"".join(b"rank %d line %d\n" % (r, i) for i in range(3000))
out += "héllo wörld\n".encode() + b"bad \xff\xfe bytes\n" + b"\n"
out += b"y" * (3 * 65536 + 17) + b"\n" + b"after the long line\n"
os.write(1, out + b"no newline at the end")
os.write(2, b"err %d\n" % r + b"z" * 70000)
"""


def _lines(resps: list[pb.StreamResponse]) -> list[Line]:
    got: list[Line] = []
    for resp in resps:
        got.extend(
            (ln.local_rank, ln.stream, ln.offset, ln.text, ln.prefix, ln.partial)
            for ln in resp.lines
        )
        for block in resp.blocks:
            texts = block.data.decode("utf-8", errors="replace").split("\n")
            if block.partial:
                assert block.count == 1 and len(texts) == 1
            else:
                assert texts.pop() == ""  # every line of a block ends with a newline
            assert len(texts) == block.count
            cursor = block.offset
            for raw in block.data.split(b"\n")[: block.count]:
                cursor += len(raw) + (0 if block.partial else 1)
                text = raw.decode("utf-8", errors="replace")
                got.append(
                    (block.local_rank, block.stream, cursor, text, block.prefix, block.partial)
                )
    return got


def _stream(agent: Agent, **request: object) -> list[pb.StreamResponse]:
    return list(agent.stub.Stream(pb.StreamRequest(**request), timeout=30))


def _per_file(lines: list[Line]) -> dict[tuple[int, int], list[Line]]:
    files: dict[tuple[int, int], list[Line]] = {}
    for line in lines:
        files.setdefault((line[0], line[1]), []).append(line)
    return files


def test_packed_stream_carries_exactly_the_lines(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    spec = pb.JobSpec(job_id="packed", nprocs=2, entrypoint=sys.executable)
    spec.args.append(script("w.py", WORKER))
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    poll = pb.PollRequest(job_id="packed")
    wait_until(lambda: agent.stub.Poll(poll, timeout=5).job.state != pb.RUNNING, 20, "the end")

    plain = _stream(agent, job_id="packed")
    packed = _stream(agent, job_id="packed", packed=True)
    assert not any(r.blocks for r in plain)
    assert all(r.blocks and not r.lines for r in packed if not r.end)
    assert _per_file(_lines(packed)) == _per_file(_lines(plain))

    # the client's own unpacking gives the very LogLine messages an unpacked stream sends
    unpacked = [ln for r in packed for b in r.blocks for ln in unpack_block(b)]
    assert _per_file(_lines([pb.StreamResponse(lines=unpacked)])) == _per_file(_lines(plain))

    lines = _per_file(_lines(packed))[(0, pb.STDOUT)]
    assert len(lines) == 3000 + 3 + 4 + 1 + 1  # the long line comes in four pieces
    assert lines[3000][3] == "héllo wörld"
    assert lines[3001][3] == "bad \ufffd\ufffd bytes"
    assert [ln[5] for ln in lines[3003:3007]] == [True, True, True, False]
    assert lines[-1][3:] == ("no newline at the end", "[default0]:", True)

    # resuming from any cursor gives exactly the rest, packed or not
    cut = lines[1500]
    resume = [pb.Cursor(local_rank=0, stream=pb.STDOUT, offset=cut[2])]
    for flag in (False, True):
        rest = _lines(
            _stream(
                agent, job_id="packed", ranks=[0], streams=[pb.STDOUT], resume=resume, packed=flag
            )
        )
        assert rest == lines[1501:]


def test_packed_follow_ends_with_the_job_and_filters_fall_back_to_lines(
    agent: Agent, script: Callable[[str, str], str]
) -> None:
    spec = pb.JobSpec(job_id="follow", nprocs=1, entrypoint=sys.executable)
    spec.args.append(script("w.py", "for i in range(20000):\n    print('line', i)\n"))
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    resps = _stream(agent, job_id="follow", follow=True, packed=True)
    assert resps[-1].end and resps[-1].job.state == pb.SUCCEEDED
    texts = [ln[3] for ln in _lines(resps)]
    assert texts == [f"line {i}" for i in range(20000)]

    filtered = _stream(agent, job_id="follow", packed=True, contains="line 1999")
    assert not any(r.blocks for r in filtered)
    assert [ln[3] for ln in _lines(filtered)] == ["line 1999"] + [
        f"line {i}" for i in range(19990, 20000)
    ]
