"""Hand-encoded protobuf for the one message where encoding cost matters: a packed
StreamResponse of megabyte LogBlocks. upb copies a bytes field on construction and again,
growing its buffer, on serialization; joining the parts here copies the data once.

`register` installs the NodeAgent service with a Stream serializer that passes such
pre-encoded bytes through (and serializes StreamResponse messages as usual).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from rankd.agent.logs import Chunk, Notice
from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["notice_response", "packed_response", "register"]

SERVICE = pb.DESCRIPTOR.services_by_name["NodeAgent"].full_name

# Keys (field number << 3 | wire type) of StreamResponse and LogBlock, as in agent.proto.
_RESPONSE_RESTART_COUNT = b"\x20"  # 4, varint
_RESPONSE_BLOCK = b"\x2a"  # 5, length-delimited
_BLOCK_LOCAL_RANK = b"\x08"  # 1, varint
_BLOCK_STREAM = b"\x10"  # 2, varint
_BLOCK_OFFSET = b"\x18"  # 3, varint
_BLOCK_DATA = b"\x22"  # 4, length-delimited
_BLOCK_COUNT = b"\x28"  # 5, varint
_BLOCK_PREFIX = b"\x32"  # 6, length-delimited
_BLOCK_PARTIAL = b"\x38\x01"  # 7, varint true


def _varint(value: int) -> bytes:
    """Base-128 varint of a non-negative int (every field encoded here is >= 0)."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def packed_response(chunks: Sequence[Chunk], prefixes: Sequence[str], restart_count: int) -> bytes:
    """The wire form of StreamResponse(restart_count, blocks=<one LogBlock per chunk>);
    zero scalars are left out, as protobuf does."""
    parts: list[bytes] = []
    if restart_count:
        parts += (_RESPONSE_RESTART_COUNT, _varint(restart_count))
    for chunk in chunks:
        prefix = prefixes[chunk.local_rank].encode()
        head = b"".join(
            (
                _BLOCK_LOCAL_RANK + _varint(chunk.local_rank) if chunk.local_rank else b"",
                _BLOCK_STREAM + _varint(chunk.stream) if chunk.stream else b"",
                _BLOCK_OFFSET + _varint(chunk.offset) if chunk.offset else b"",
                _BLOCK_DATA + _varint(len(chunk.data)),
            )
        )
        tail = b"".join(
            (
                _BLOCK_COUNT + _varint(chunk.nlines) if chunk.nlines else b"",
                _BLOCK_PREFIX + _varint(len(prefix)) + prefix if prefix else b"",
                _BLOCK_PARTIAL if chunk.partial else b"",
            )
        )
        size = len(head) + len(chunk.data) + len(tail)
        parts += (_RESPONSE_BLOCK, _varint(size), head, chunk.data, tail)
    return b"".join(parts)


def notice_response(
    notices: Sequence[Notice], prefixes: Sequence[str], restart_count: int
) -> pb.StreamResponse:
    """The agent's notices about files it does not read, as LogLines marked `notice`
    (also in a packed stream: a client prints them as lines and keeps their cursor)."""
    return pb.StreamResponse(
        restart_count=restart_count,
        lines=[
            pb.LogLine(
                local_rank=n.local_rank,
                stream=n.stream,  # type: ignore[arg-type]
                offset=n.offset,
                text=n.text,
                prefix=prefixes[n.local_rank],
                partial=True,
                notice=True,
            )
            for n in notices
        ],
    )


def _serialize_stream(message: pb.StreamResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Capture:
    """Stands in for a server to take the generated method handlers."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def register(servicer: pb_grpc.NodeAgentServicer, server: grpc.aio.Server) -> None:
    """add_NodeAgentServicer_to_server, with Stream's serializer taking encoded bytes."""
    capture = _Capture()
    pb_grpc.add_NodeAgentServicer_to_server(servicer, capture)
    handlers = dict(capture.handlers)
    handlers["Stream"] = handlers["Stream"]._replace(response_serializer=_serialize_stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
