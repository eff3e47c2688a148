"""The ceiling for log throughput: a bare ``grpc.aio`` server that streams pre-built
batches of 100-byte lines, with the agent's own message types (``StreamResponse`` of
``LogLine``) and batch size, and does nothing else: no files, no parsing.

Serves ``rankd.v1.NodeAgent/Stream`` only; ``StreamRequest.job_id`` carries the number
of lines to send. Run as ``python -m bench.bare_stream``; like the agent, its first
stdout line is ``listening on HOST:PORT``, and SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

from bench.workers import flood_line
from protos.rankd.v1 import agent_pb2 as pb
from protos.rankd.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["BATCH_LINES", "BareStream", "main"]

BATCH_LINES = 4096  # the agent's MAX_BATCH_LINES: a full batch when the reader lags
RANKS = 8
_MAX_MESSAGE = 16 * 1024 * 1024  # as the agent


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

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        full, rest = divmod(int(request.job_id or 0), BATCH_LINES)
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
    pb_grpc.add_NodeAgentServicer_to_server(BareStream(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
