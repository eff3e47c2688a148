"""agent.wire's hand-encoded packed StreamResponse parses to exactly what protobuf builds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankd.agent.logs import Chunk
from rankd.agent.wire import packed_response
from rankd.v1 import agent_pb2 as pb

pytestmark = pytest.mark.timeout(120)

PREFIXES = ["", "[default1]:", "[trainer2]: ", "ünïcode 3 »"]

chunks = st.builds(
    Chunk,
    local_rank=st.integers(0, len(PREFIXES) - 1),
    stream=st.sampled_from([pb.STDOUT, pb.STDERR]),
    offset=st.integers(0, 2**62),
    data=st.binary(max_size=300),
    nlines=st.integers(0, 2**31 - 1),
    partial=st.booleans(),
)


def _by_protobuf(items: list[Chunk], restart_count: int) -> pb.StreamResponse:
    response = pb.StreamResponse(restart_count=restart_count)
    for c in items:
        response.blocks.add(
            local_rank=c.local_rank,
            stream=c.stream,
            offset=c.offset,
            data=c.data,
            count=c.nlines,
            prefix=PREFIXES[c.local_rank],
            partial=c.partial,
        )
    return response


@settings(max_examples=300, deadline=None)
@given(st.lists(chunks, max_size=6), st.integers(0, 2**31 - 1))
def test_packed_response_matches_protobuf(items: list[Chunk], restart_count: int) -> None:
    encoded = packed_response(items, PREFIXES, restart_count)
    assert pb.StreamResponse.FromString(encoded) == _by_protobuf(items, restart_count)


def test_a_megabyte_block_round_trips() -> None:
    data = b"".join(b"line %07d\n" % i for i in range(100_000))
    chunk = Chunk(3, pb.STDERR, 123_456_789_012, data, 100_000)
    parsed = pb.StreamResponse.FromString(packed_response([chunk], PREFIXES, 2))
    (block,) = parsed.blocks
    assert (block.data, block.count, block.offset, block.prefix) == (
        data,
        100_000,
        123_456_789_012,
        PREFIXES[3],
    )
    assert parsed.restart_count == 2 and not block.partial
