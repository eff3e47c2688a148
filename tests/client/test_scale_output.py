"""Issue 24's client side: `rankd status` folds alike nodes, and log lines are rendered
a block at a time (`chunks()`, `rankd logs`) exactly as a LogLine each would print."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers.agents import PYTHON, Agent
from helpers.workers import write

from rankd.client import AgentClient, Cluster
from rankd.client.cli import main
from rankd.client.streams import render_block, unpack_block
from rankd.v1 import agent_pb2 as pb

# 9 ranks on each of 2 nodes: 18 > DETAIL_RANKS, so folded by default
NPROCS = 9

# Bytes that are not UTF-8, a line without a newline at the end, and an empty line.
ODD_OUTPUT = """\
import sys
out = sys.stdout.buffer
out.write(b"plain\\n\\nbad \\xff\\xfe bytes\\n")
out.write("caf\\u00e9 \\u2603\\n".encode())
out.write(b"no newline at the end")
"""


def _by_line(block: pb.LogBlock) -> str:
    return "".join(f"{line.prefix}{line.text}\n" for line in unpack_block(block))


def test_render_block_prints_what_its_lines_print() -> None:
    rng = random.Random(24)
    # whole and cut UTF-8 sequences, bytes that are never UTF-8, empty lines
    pieces = [b"a", b"\xff", b"\xc3\xa9", b"\xc3", b"\xe2\x82", b"", b" x ", "\u2603".encode()]
    for prefix in ("", "[default3]:", "[w7]: ", "[n\u0153ud \u2603 3]:"):
        for _ in range(300):
            lines = [b"".join(rng.choices(pieces, k=rng.randrange(6))) for _ in range(4)]
            partial = rng.random() < 0.3
            data = lines[0] if partial else b"".join(line + b"\n" for line in lines)
            if not partial and rng.random() < 0.1:
                data += b"cut"  # not a line: unpack_block drops it, so must render_block
            block = pb.LogBlock(
                local_rank=1, stream=pb.STDOUT, offset=7, data=data, prefix=prefix, partial=partial
            )
            assert render_block(block) == _by_line(block), (data, prefix, partial)


def test_chunks_carry_every_line_and_resume_where_lines_would(
    nodes: list[Agent], tmp_path: Path
) -> None:
    agent = nodes[0]
    script = write(tmp_path, "odd.py", ODD_OUTPUT)
    spec = pb.JobSpec(job_id="odd", nprocs=2, entrypoint=PYTHON, args=[script])
    with AgentClient(agent.address) as client:
        client.start(spec)
        client.wait("odd", timeout=60)
        by_line = list(client.stream("odd"))
        expected = "".join(f"{line.prefix}{line.text}\n" for line in by_line)
        lines = client.stream("odd")
        chunks = list(lines.chunks())
        assert "".join(c.text for c in chunks) == expected
        assert sum(c.count for c in chunks) == len(by_line) == 10
        last = {(line.local_rank, line.stream): line.offset for line in by_line}
        assert {(c.local_rank, c.stream): c.offset for c in lines.cursors()} == last


def test_rankd_logs_prints_the_rendered_lines(
    nodes: list[Agent], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write(tmp_path, "odd.py", ODD_OUTPUT)
    addresses = [a.address for a in nodes]
    with Cluster(addresses) as cluster:
        cluster.launch([PYTHON, script], nproc_per_node=2, run_id="odd", on_line=lambda _: None)
        with AgentClient(addresses[1]) as client:
            node1 = "".join(f"{ln.prefix}{ln.text}\n" for ln in client.stream("odd"))
    assert main(["logs", "--nodes", ",".join(addresses), "odd"], environ={}) == 0
    out = capsys.readouterr().out
    assert out.endswith(node1) and "3]:bad \ufffd\ufffd bytes\n" in node1
    assert out.count("\n") == 20 and "2]:no newline at the end\n" in node1


def test_status_folds_alike_nodes_unless_asked_for_detail(
    nodes: list[Agent], capsys: pytest.CaptureFixture[str]
) -> None:
    addresses = ",".join(a.address for a in nodes)
    with Cluster([a.address for a in nodes]) as cluster:
        cluster.launch(["/bin/sleep", "60"], nproc_per_node=NPROCS, run_id="wide", detach=True)
        try:
            assert cluster.watch("wide", timeout=30)
            assert main(["status", "--nodes", addresses, "wide"], environ={}) == 0
            out = capsys.readouterr().out.splitlines()
            assert out == [
                "job wide: RUNNING, attempt 0, 18 ranks on 2 nodes",
                "  nodes 0-1 (2 nodes): RUNNING, 9 ranks each",
            ]
            assert main(["status", "--nodes", addresses, "wide", "--verbose"], environ={}) == 0
            out = capsys.readouterr().out.splitlines()
            assert len(out) == 3 and "(node rank 1, global ranks 9-17): RUNNING" in out[2]
            assert main(["status", "--nodes", addresses, "wide", "--ranks"], environ={}) == 0
            out = capsys.readouterr().out.splitlines()
            assert len(out) == 1 + 2 + 18 and out[-1].startswith("    rank 17 (local 8): RUNNING")
        finally:
            cluster.kill("wide", timeout=5)
        assert main(["status", "--nodes", addresses, "wide"], environ={}) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1].startswith("  nodes 0-1 (2 nodes): KILLED (killed by Kill(SIGTERM)")
        assert out[1].endswith(", 9 ranks each: 9 TERMINATED")
