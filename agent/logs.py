"""Log files of an attempt and the readers that turn them into lines.

Workers write straight into `<attempt>/<rank>/{stdout,stderr}.log`; the agent never sits
between a worker and its file. Readers follow the files with inotify (no sleep loop):
the watcher fires the attempt's `Pulse` on every write, readers read from their own
offsets, so a slow reader never slows a worker or another reader, and memory per reader
is bounded by one read chunk plus one partial line. Where inotify is not to be had (its
instances or watches used up), the watcher fires the pulses of the running attempts
every few milliseconds instead (`rankd.agent.follow`).

A line's cursor is the byte offset just after it in its file; resuming from a cursor
yields each later line exactly once. A line longer than `MAX_LINE` bytes is cut into
`MAX_LINE` chunks marked partial. A last line without a newline is sent, partial, once
the attempt has ended (torch's TailLog and Ray both lost such last lines).

A rank can replace its files. They are opened by `rankfiles.open_regular`: what is not a
regular file (a FIFO, a symbolic link, also in place of a directory above it) is never
opened nor followed; a reader says so once as a `Notice` (a LogLine marked `notice` on
the wire) and in `AttemptLogs.problems` (Poll), and reads the other files on. A reader
keeps the file it opened: one replaced later, even by a regular file, is served only to
readers that open it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from rankd.agent.logrecords import Block, Chunk, LogLine, Notice
from rankd.agent.rankfiles import MAX_OFFSET, NotRegularFile, open_regular, regular_size

__all__ = [
    "MAX_LINE",
    "STDERR",
    "STDOUT",
    "STREAM_FILES",
    "AttemptLogs",
    "Block",
    "Chunk",
    "LogLine",
    "LogReader",
    "Notice",
    "Pulse",
]

STDOUT = 1
STDERR = 2
STREAM_FILES = {STDOUT: "stdout.log", STDERR: "stderr.log"}
FILE_STREAMS = {name: kind for kind, name in STREAM_FILES.items()}
ERROR_FILE = "error.json"  # in each rank's directory, as torch lays it out
MAX_LINE = 64 * 1024
READ_CHUNK = 256 * 1024
MAX_BATCH_BYTES = 1024 * 1024
# With the bytes bound, keeps a batch well under gRPC's default 4 MiB message limit.
MAX_BATCH_LINES = 4096

logger = logging.getLogger(__name__)


class Pulse:
    """Wakes every waiter at once; waiters take `future()` *before* checking for work,
    so a fire between the check and the wait is never missed."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def future(self) -> asyncio.Future[None]:
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def fire(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)


@dataclass
class AttemptLogs:
    """The files of one attempt and what readers need to follow them."""

    attempt_dir: str
    nprocs: int
    prefixes: list[str]
    pulse: Pulse = field(default_factory=Pulse)
    last_output: dict[int, float] = field(default_factory=dict)
    ended: bool = False  # set once no process of the attempt can write any more
    # What inotify saw from before the ranks started (None when it did not watch, or
    # lost events: ask the files): the (rank, stream) files written to, and the ranks
    # whose error file appeared.
    written: set[tuple[int, int]] | None = None
    error_files: set[int] | None = None
    polled: bool = False  # followed without inotify: the files tell when ranks wrote
    # (local rank, file name) -> why that file is not read (see `note_problem`)
    problems: dict[tuple[int, str], str] = field(default_factory=dict)

    @property
    def log_dir(self) -> str:
        """The agent's log directory: `<log_dir>/<run>/attempt_<n>`."""
        return os.path.dirname(os.path.dirname(self.attempt_dir))

    def rank_dir(self, local_rank: int) -> str:
        return os.path.join(self.attempt_dir, str(local_rank))

    def path(self, local_rank: int, stream: int) -> str:
        return os.path.join(self.attempt_dir, str(local_rank), STREAM_FILES[stream])

    def error_file(self, local_rank: int) -> str:
        return os.path.join(self.attempt_dir, str(local_rank), ERROR_FILE)

    def mark_ended(self) -> None:
        self.ended = True
        self.pulse.fire()

    def size(self, local_rank: int, stream: int) -> int:
        """Bytes in a file (-1: missing, or not a regular file: then noted, see
        `note_problem`). A file nobody wrote to, deleted or renamed over is empty (it was
        created so): no stat then. Call after `LogWatcher.drain`, so that no change is
        unseen."""
        if self.written is not None and (local_rank, stream) not in self.written:
            return 0
        try:
            return regular_size(self.path(local_rank, stream))
        except NotRegularFile as err:
            self.note_problem(local_rank, STREAM_FILES[stream], str(err))
            return -1

    def note_problem(self, local_rank: int, name: str, problem: str) -> None:
        """Record why the rank's file `name` is not read (Poll shows it, see
        `file_problems`); logged once per file."""
        key = (local_rank, name)
        if key not in self.problems:
            self.problems[key] = problem
            logger.warning("%s: not read", problem)

    def file_problems(self, local_rank: int) -> list[str]:
        """Why files of the rank are not read, one line each (empty: none)."""
        if not self.problems:
            return []
        return [
            f"{text}: not read" for (r, _), text in sorted(self.problems.items()) if r == local_rank
        ]

    def may_have_error_file(self, local_rank: int) -> bool:
        """False when the rank's error file surely does not exist (no stat); the same
        condition as `size`."""
        return self.error_files is None or local_rank in self.error_files

    def output_time(self, local_rank: int) -> float:
        """When the rank last wrote to its stdout or stderr (seconds since the epoch; 0:
        never): as inotify saw it, or for a polled attempt the files' modification time."""
        if not self.polled:
            return self.last_output.get(local_rank, 0.0)
        latest = 0.0
        for stream in STREAM_FILES:
            with contextlib.suppress(OSError):
                st = os.lstat(self.path(local_rank, stream))
                if st.st_size and stat.S_ISREG(st.st_mode):
                    latest = max(latest, st.st_mtime)
        return latest

    def output_times(self) -> dict[int, float]:
        """`output_time` of every rank that wrote, by local rank."""
        if not self.polled:
            return self.last_output
        times = {rank: self.output_time(rank) for rank in range(self.nprocs)}
        return {rank: t for rank, t in times.items() if t}


_REFUSED = -2  # the `fd` of a cursor whose file is not read (not a regular file)


class _FileCursor:
    """Reading state of one (rank, stream) file."""

    __slots__ = ("buf", "fd", "key", "packed", "path", "pos")

    def __init__(self, key: tuple[int, int], path: str, offset: int, packed: bool) -> None:
        self.key = key
        self.packed = packed  # emit Chunks (raw bytes) instead of Blocks
        self.path = path
        self.pos = offset  # next byte to read
        self.buf = b""  # bytes read after the last complete line
        self.fd = -1

    def open(self) -> bool:
        """Whether the file is open (False: not there yet, or refused). Raises
        NotRegularFile once, for a file that is not to be read (then it is refused)."""
        if self.fd == -1:
            try:
                self.fd = open_regular(self.path)
            except FileNotFoundError:
                return False
        return self.fd >= 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, budget: int, out: list[Any]) -> int:
        """Append blocks (or Chunks, if packed) of complete lines and cut pieces of
        over-long ones to `out`; return the number of bytes read."""
        if not self.open():
            return 0
        # A resume cursor may lie anywhere up to the largest offset; no file reaches it,
        # and pread refuses a read that would end beyond it (EINVAL): end-of-file.
        size = min(budget, READ_CHUNK, MAX_OFFSET - self.pos)
        if size <= 0:
            return 0
        data = os.pread(self.fd, size, self.pos)
        if not data:
            return 0
        self.pos += len(data)
        buf = self.buf + data if self.buf else data
        offset = self.pos - len(buf)
        end = buf.rfind(b"\n") + 1
        complete, tail = buf[:end], buf[end:]
        if complete and self.packed:
            offset = self._packed(complete, offset, out)
        elif complete:
            texts = complete.decode("ascii").split("\n") if complete.isascii() else None
            if texts is not None and max(lengths := list(map(len, texts))) <= MAX_LINE:
                # Fast path: one decode for the whole chunk; bytes == characters.
                texts.pop()
                lengths.pop()
                offsets = list(accumulate(map((1).__add__, lengths), initial=offset))
                del offsets[0]
                out.append(Block(*self.key, texts, offsets))
                offset += len(complete)
            else:
                offset = self._slow(complete, offset, out)
        # `>`, as for complete lines: a tail of exactly MAX_LINE may still end with its
        # newline in the next read and must then come out as one whole line.
        while len(tail) > MAX_LINE:
            if self.packed:
                out.append(Chunk(*self.key, offset, tail[:MAX_LINE], 1, True))
            else:
                out.append(Block(*self.key, [_decode(tail[:MAX_LINE])], [offset + MAX_LINE], True))
            offset += MAX_LINE
            tail = tail[MAX_LINE:]
        self.buf = tail
        return len(data)

    def _slow(self, complete: bytes, offset: int, out: list[Block]) -> int:
        """Line by line: invalid or non-ASCII UTF-8, or lines to cut at MAX_LINE."""
        texts: list[str] = []
        offsets: list[int] = []
        for raw in complete.split(b"\n")[:-1]:
            while len(raw) > MAX_LINE:
                if texts:
                    out.append(Block(*self.key, texts, offsets))
                    texts, offsets = [], []
                offset += MAX_LINE
                out.append(Block(*self.key, [_decode(raw[:MAX_LINE])], [offset], True))
                raw = raw[MAX_LINE:]
            offset += len(raw) + 1
            texts.append(_decode(raw))
            offsets.append(offset)
        if texts:
            out.append(Block(*self.key, texts, offsets))
        return offset

    def _packed(self, complete: bytes, offset: int, out: list[Any]) -> int:
        """Complete lines as one Chunk; lines over MAX_LINE are cut as for Blocks."""
        if not _has_long_line(complete):
            out.append(Chunk(*self.key, offset, complete, complete.count(b"\n")))
            return offset + len(complete)
        run: list[bytes] = []
        run_start = offset
        for raw in complete.split(b"\n")[:-1]:
            if len(raw) > MAX_LINE:
                if run:
                    out.append(Chunk(*self.key, run_start, b"".join(run), len(run)))
                    run = []
                while len(raw) > MAX_LINE:
                    out.append(Chunk(*self.key, offset, raw[:MAX_LINE], 1, True))
                    offset += MAX_LINE
                    raw = raw[MAX_LINE:]
                run_start = offset
            run.append(raw + b"\n")
            offset += len(raw) + 1
        if run:
            out.append(Chunk(*self.key, run_start, b"".join(run), len(run)))
        return offset

    def flush(self, out: list[Any]) -> None:
        """Emit the last line that has no newline (the writer is gone)."""
        if self.buf:
            if self.packed:
                out.append(Chunk(*self.key, self.pos - len(self.buf), self.buf, 1, True))
            else:
                out.append(Block(*self.key, [_decode(self.buf)], [self.pos], True))
            self.buf = b""


def _has_long_line(data: bytes) -> bool:
    """Whether a line of `data` (complete lines) is longer than MAX_LINE: hops from line
    start to the last newline within MAX_LINE + 1 bytes, a few C scans per chunk."""
    pos, end = 0, len(data)
    while end - pos > MAX_LINE:
        newline = data.rfind(b"\n", pos, pos + MAX_LINE + 1)
        if newline < 0:
            return True
        pos = newline + 1
    return False


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class LogReader:
    """Batches of lines from some files of one attempt.

    `follow=False`: what exists now, then stop. `follow=True`: until the attempt has
    ended and every file was read to its end (the last partial lines included)."""

    def __init__(
        self,
        logs: AttemptLogs,
        keys: Iterable[tuple[int, int]],
        *,
        cursors: dict[tuple[int, int], int] | None = None,
        follow: bool = False,
        line_filter: Callable[[str], bool] | None = None,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        packed: bool = False,
        notices: bool = False,
        heartbeat: float = 0.0,
    ) -> None:
        """`packed`: `blocks()` yields Chunks (raw bytes), not Blocks; no line_filter.
        `notices`: `blocks()` also yields, in batches of their own, a `Notice` for each
        file it does not read (not a regular file); it is noted in `logs` either way.
        `heartbeat` (seconds, with `follow`): `blocks()` yields an empty batch when it
        yielded nothing for that long."""
        if packed and line_filter is not None:
            raise ValueError("a packed reader cannot filter lines")
        cursors = cursors or {}
        self._logs = logs
        self._files = [_FileCursor(k, logs.path(*k), cursors.get(k, 0), packed) for k in keys]
        self._follow = follow
        self._filter = line_filter
        self._max_batch = max_batch_bytes
        self.packed = packed
        self._notices: list[Notice] | None = [] if notices else None
        self._heartbeat = heartbeat
        self._next = 0  # round-robin start, so one busy file cannot starve the others

    def _read_round(self) -> tuple[list[Any], int]:
        blocks: list[Any] = []
        budget = self._max_batch
        count = len(self._files)
        progress = True
        while budget > 0 and progress:
            progress = False
            for i in range(count):
                cursor = self._files[(self._next + i) % count]
                try:
                    got = cursor.read(min(budget, READ_CHUNK), blocks)
                except NotRegularFile as err:
                    self._refuse(cursor, err)
                    got = 0
                budget -= got
                progress = progress or got > 0
                if budget <= 0:
                    break
            self._next = (self._next + 1) % max(count, 1)
        return self._filtered(blocks), self._max_batch - budget

    def _refuse(self, cursor: _FileCursor, err: NotRegularFile) -> None:
        cursor.fd = _REFUSED  # (open_regular raised: nothing is open)
        rank, stream = cursor.key
        self._logs.note_problem(rank, STREAM_FILES[stream], str(err))
        if self._notices is not None:
            text = f"rankd-agent: {err}: not read"
            self._notices.append(Notice(rank, stream, cursor.pos, text))

    def _filtered(self, blocks: list[Any]) -> list[Any]:
        keep = self._filter
        if keep is None:
            return blocks
        kept = []
        for block in blocks:
            pairs = [(t, o) for t, o in zip(block.texts, block.offsets, strict=True) if keep(t)]
            if pairs:
                texts, offsets = map(list, zip(*pairs, strict=True))
                kept.append(block._replace(texts=texts, offsets=offsets))
        return kept

    async def blocks(self) -> AsyncIterator[list[Any]]:
        """Batches of Blocks (Chunks if packed), each batch at most MAX_BATCH_LINES
        lines."""
        sent = time.monotonic()
        try:
            while True:
                wake = self._logs.pulse.future()
                ended = self._logs.ended  # read before the files: what it promises is on disk
                batch, nbytes = self._read_round()
                if self._notices:
                    yield self._notices
                    self._notices = []
                    sent = time.monotonic()
                for part in _split(batch, MAX_BATCH_LINES):
                    yield part
                    sent = time.monotonic()
                if nbytes:
                    continue
                if ended or not self._follow:
                    if ended:
                        tail: list[Any] = []
                        for cursor in self._files:
                            cursor.flush(tail)
                        tail = self._filtered(tail)
                        if tail:
                            yield tail
                    return
                if self._heartbeat:
                    # counted from the last batch, not from the last wake: other
                    # ranks' output wakes this reader without giving it anything
                    left = sent + self._heartbeat - time.monotonic()
                    if left <= 0 or not (await asyncio.wait({wake}, timeout=left))[0]:
                        yield []  # a heartbeat
                        sent = time.monotonic()
                    continue
                # shielded: the pulse's future is shared by every reader of the attempt,
                # and a reader cancelled while it waits (its client went away) would
                # cancel it for all of them (asyncio.wait above never cancels it)
                await asyncio.shield(wake)
        finally:
            for cursor in self._files:
                cursor.close()

    async def batches(self) -> AsyncIterator[list[LogLine]]:
        """Batches of single lines (the same content as `blocks`)."""
        async for blocks in self.blocks():
            yield [line for block in blocks for line in block.lines()]


def _split(blocks: list[Any], limit: int) -> Iterator[list[Any]]:
    """Cut a batch into parts of at most `limit` lines, keeping the order. Chunks are
    not cut (their bytes are bounded by the batch's)."""
    if blocks and isinstance(blocks[0], Chunk):
        yield blocks
        return
    part: list[Block] = []
    size = 0
    for block in blocks:
        while size + len(block.texts) > limit:
            room = limit - size
            if room:
                part.append(block._replace(texts=block.texts[:room], offsets=block.offsets[:room]))
                block = block._replace(texts=block.texts[room:], offsets=block.offsets[room:])
            yield part
            part, size = [], 0
        if block.texts:
            part.append(block)
            size += len(block.texts)
    if part:
        yield part
