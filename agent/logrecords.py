"""What the log readers of :mod:`rankd.agent.logs` yield: lines, blocks of lines, raw
chunks (packed streams) and notices about files they do not read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["Block", "Chunk", "LogLine", "Notice"]


class LogLine(NamedTuple):
    local_rank: int
    stream: int
    offset: int  # byte offset just after the line: the resume cursor
    text: str
    partial: bool = False


class Block(NamedTuple):
    """Consecutive lines of one file: the unit readers pass around, so that a batch
    costs a few objects instead of one per line."""

    local_rank: int
    stream: int
    texts: list[str]
    offsets: list[int]  # per line: byte offset just after it (its resume cursor)
    partial: bool = False  # every line here is a cut chunk or a last line without newline

    def lines(self) -> Iterator[LogLine]:
        for text, offset in zip(self.texts, self.offsets, strict=True):
            yield LogLine(self.local_rank, self.stream, offset, text, self.partial)


class Chunk(NamedTuple):
    """Consecutive lines of one file as raw bytes (packed streams): `nlines` lines, each
    ending with a newline unless `partial` (then `data` is one line without it)."""

    local_rank: int
    stream: int
    offset: int  # where `data` starts in the file
    data: bytes
    nlines: int
    partial: bool = False


class Notice(NamedTuple):
    """The agent's word about one (rank, stream) file instead of its lines: `text` says
    why it is not read; `offset` is the cursor where reading stopped."""

    local_rank: int
    stream: int
    offset: int
    text: str
