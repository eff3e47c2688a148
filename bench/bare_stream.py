"""The ceiling for log throughput: a bare ``grpc.aio`` server that streams pre-built
batches of 100-byte lines, with the agent's own message types (``StreamResponse`` of
``LogLine``) and batch size, and does nothing else: no files, no parsing.

Serves ``rankd.v1.NodeAgent/Stream`` only; ``StreamRequest.job_id`` carries the number
of lines to send, ``packed`` picks LogBlocks (the agent's packed form: 1 MiB messages
of 256 KiB blocks, as its reader makes them) over LogLines. Run as
``python -m bench.bare_stream``; like the agent, its first stdout line is
``listening on HOST:PORT``, and SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

from bench.workers import flood_line
from rankd.agent import wire
from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["BATCH_LINES", "BareStream", "main"]

BATCH_LINES = 4096  # the agent's MAX_BATCH_LINES: a full batch when the reader lags
RANKS = 8
_MAX_MESSAGE = 16 * 1024 * 1024  # as the agent
_BLOCK_BYTES = 256 * 1024  # the agent's READ_CHUNK
_BLOCKS = 4  # its 1 MiB batch


class BareStream(pb_grpc.NodeAgentServicer):
    def __init__(self) -> None:
        self._lines = [
            pb.LogLine(
                local_rank=i % RANKS,
                stream=pb.STDOUT,
                offset=(i // RANKS + 1) * 100,
                text=flood_line(i % RANKS, i // RANKS),
                prefix=f"[default{i % RANKS}]:",
            )
            for i in range(BATCH_LINES)
        ]
        self._batch = pb.StreamResponse(lines=self._lines)
        per_block = _BLOCK_BYTES // 100
        self._block_lines = per_block * _BLOCKS
        blocks = []
        for b in range(_BLOCKS):
            rank = b % RANKS
            data = "".join(f"{flood_line(rank, i)}\n" for i in range(per_block)).encode()
            blocks.append(
                pb.LogBlock(
                    local_rank=rank,
                    stream=pb.STDOUT,
                    offset=0,
                    data=data,
                    count=per_block,
                    prefix=f"[default{rank}]:",
                )
            )
        self._blocks = blocks
        # encoded once, sent as bytes: the transport alone (see agent.wire)
        self._packed = pb.StreamResponse(blocks=blocks).SerializeToString()

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        total = int(request.job_id or 0)
        if request.packed:
            full, rest = divmod(total, self._block_lines)
            for _ in range(full):
                yield self._packed  # type: ignore[misc]
            per_block = self._block_lines // _BLOCKS
            whole, extra = divmod(rest, per_block)
            last = [*self._blocks[:whole]]
            if extra:
                cut = pb.LogBlock()
                cut.CopyFrom(self._blocks[whole])
                cut.data = cut.data[: extra * 100]
                cut.count = extra
                last.append(cut)
            if last:
                yield pb.StreamResponse(blocks=last)
        else:
            full, rest = divmod(total, BATCH_LINES)
            for _ in range(full):
                yield self._batch
            if rest:
                yield pb.StreamResponse(lines=self._lines[:rest])
        yield pb.StreamResponse(end=True)


async def _serve() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", _MAX_MESSAGE)])
    wire.register(BareStream(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
