"""Line filters: a Stream's `contains` and `regex`, and a spec's duplicate filters
(the lines copied to `filtered_stdout.log` / `filtered_stderr.log`), checked when they
are asked for and run where they cannot hold the event loop.

Regular expressions use RE2 (google-re2), whose time is linear in the line: no
backtracking, so `(a+)+$` over 32 `a`s and a `!` costs microseconds (Python's `re`
took minutes, and 4 s for 25). Its syntax is Python's less backreferences and lookaround
(https://github.com/google/re2/wiki/Syntax); `\\d`, `\\w`, `\\s` and `\\b` are ASCII, and
`\\Z` is spelled `\\z`. Literal filters (`contains`, duplicate filters) are one RE2
alternation, searched over a whole block of lines at once.

What keeps the loop free, measured on a loaded 2-core machine:
- Compiling holds the GIL, so it is bounded where it happens: a regex of at most
  `MAX_REGEX_BYTES`, whose counted repetitions add up to at most `MAX_REPEAT` and which
  names at most `MAX_UNICODE_CLASSES` Unicode classes (each costs 0.1-0.2 ms to build),
  gets a program of at most `REGEX_MEMORY` bytes: the worst compiles in about 2 ms.
- Matching runs in `POOL_THREADS` threads of its own, a batch of lines at a time (at
  most 1 MiB and 4096 lines), while RE2 releases the GIL. A Stream whose regex spends
  more than `MATCH_BUDGET` seconds of CPU on one batch is ended (RESOURCE_EXHAUSTED):
  linear time can still be slow, at about 1 µs per byte for the worst programs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import re2

from rankd.agent.errors import LimitExceeded, SpecError
from rankd.agent.logs import Block

__all__ = [
    "LITERALS_MEMORY",
    "MATCH_BUDGET",
    "MAX_CONTAINS_BYTES",
    "MAX_REGEX_BYTES",
    "MAX_REPEAT",
    "MAX_UNICODE_CLASSES",
    "REGEX_MEMORY",
    "LineFilter",
    "any_of",
    "filtered",
    "stream_filter",
]

#: Longest `contains` of a Stream, UTF-8 bytes.
MAX_CONTAINS_BYTES = 1024
#: Longest `regex` of a Stream, UTF-8 bytes.
MAX_REGEX_BYTES = 1024
#: Largest sum of a regex's counted repetitions (`x{n,m}` counts max(n, m)); RE2 allows
#: 1000 for one. Their expansion, before RE2 checks the program's size, costs time.
MAX_REPEAT = 1000
#: Most Unicode classes (`\p{..}`, `\P{..}`) in one regex.
MAX_UNICODE_CLASSES = 4
#: RE2's memory for one regex (program and DFA cache): programs of ~5,000 instructions.
REGEX_MEMORY = 128 * 1024
#: RE2's memory for the alternation of a job's duplicate filters or a Stream's `contains`:
#: room for a fast DFA (the program of 4 KiB of literals is ~7,000 instructions).
LITERALS_MEMORY = 2 * 1024 * 1024
#: Seconds of CPU a Stream's filter may spend on one batch of lines.
MATCH_BUDGET = 1.0
#: Threads that run filters.
POOL_THREADS = 2

#: Python's empty lookahead, which RE2 has not: the "no line" regex with which rankd's
#: client waits for a job's end (`rankd.client.streams.follow_to_end`), kept working.
NEVER_MATCHES = "(?!)"
_SYNTAX = "RE2 syntax (https://github.com/google/re2/wiki/Syntax): no backreferences or lookaround"
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
_UNICODE_CLASS = re.compile(r"\\[pP]")
# Budget checks cost ~0.6 µs; make one per 16 KiB of text, a line counting 256 bytes at least.
_CHECK_EVERY = 16 * 1024
_LINE_COST = 256

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _options(max_mem: int | None = None) -> Any:
    options = re2.Options()
    options.log_errors = False  # errors are raised (and answered), not printed on stderr
    if max_mem is not None:
        options.max_mem = max_mem
    return options


class LineFilter:
    """Keeps the lines that hold one of `literals` (if any) and match `regex` (if any),
    or no line at all (`never`). `budget`: seconds of CPU per batch, then LimitExceeded.
    Safe to share between threads (compiled RE2 objects are)."""

    def __init__(
        self,
        *,
        literals: Sequence[str] = (),
        regex: Any = None,
        never: bool = False,
        budget: float | None = None,
    ) -> None:
        # a line never holds a newline: a literal with one matches no line (and would
        # break the block search below, which relies on matches within one line)
        kept = [s for s in literals if "\n" not in s]
        self.never = never or (bool(literals) and not kept)
        self._literals = (
            re2.compile("|".join(re2.escape(s) for s in kept), _options(LITERALS_MEMORY))
            if kept
            else None
        )
        self._single = kept[0] if len(kept) == 1 else None
        self._regex = regex
        self._budget = budget

    async def apply(self, batch: list[Any]) -> list[Any]:
        """`batch` with the lines of its Blocks filtered (Blocks left empty dropped,
        anything else kept as it is). Runs in the filter threads; yields the loop even
        when there is nothing to match. Raises LimitExceeded past the budget."""
        if self.never:
            await asyncio.sleep(0)  # a flood filtered to nothing must still let others in
            return [item for item in batch if not isinstance(item, Block)]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_threads(), self.filter_batch, batch)

    def filter_batch(self, batch: list[Any]) -> list[Any]:
        """As `apply`, in the calling thread."""
        clock = _Clock(self._budget, self._regex)
        out: list[Any] = []
        for item in batch:
            if not isinstance(item, Block):
                out.append(item)
                continue
            keep = self.keep(item.texts, clock)
            if len(keep) == len(item.texts):
                out.append(item)
            elif keep:
                texts, offsets = item.texts, item.offsets
                out.append(
                    item._replace(
                        texts=[texts[i] for i in keep], offsets=[offsets[i] for i in keep]
                    )
                )
        return out

    def keep(self, texts: list[str], clock: _Clock | None = None) -> list[int]:
        """Indices of the lines of `texts` (without newlines) to keep, in order."""
        if self.never:
            return []
        indices = (
            range(len(texts))
            if self._literals is None
            else _holding(self._literals, texts, self._single)
        )
        if self._regex is None:
            return list(indices)
        clock = clock or _Clock(self._budget, self._regex)
        search = self._regex.search
        kept = []
        for i in indices:
            text = texts[i]
            if search(text) is not None:
                kept.append(i)
            clock.spent(len(text))
        return kept


class _Clock:
    """The CPU a batch's matching may still spend (`time.thread_time`, so that a loaded
    machine does not count against it)."""

    def __init__(self, budget: float | None, regex: Any) -> None:
        self._end = None if budget is None else time.thread_time() + budget
        self._budget = budget
        self._regex = regex
        self._units = 0

    def spent(self, nbytes: int) -> None:
        if self._end is None:
            return
        self._units += max(nbytes, _LINE_COST)
        if self._units < _CHECK_EVERY:
            return
        self._units = 0
        if time.thread_time() > self._end:
            pattern = self._regex.pattern if self._regex is not None else ""
            raise LimitExceeded(
                f"the regex {pattern!r} took more than {self._budget:g} s of CPU to filter "
                "one batch of lines (at most 1 MiB): the agent's limit; simplify it"
            )


def _holding(literals: Any, texts: list[str], single: str | None) -> list[int]:
    """Indices of the lines that hold a match of `literals` (literal strings without
    newlines, so no match spans two lines): one search over the joined block, then one
    per line found, each from the start of the next line. For a `single` literal, the
    lines after the first found are checked with `in` (RE2's Python wrapper costs ~3 µs a
    call; `in` is linear too, and the interpreter may switch threads between lines)."""
    data = "\n".join(texts).encode()
    found: list[int] = []
    pos = line = 0
    search = literals.search
    while (match := search(data, pos)) is not None:
        start = match.start()
        line += data.count(b"\n", pos, start)
        found.append(line)
        if single is not None:
            found.extend(i for i in range(line + 1, len(texts)) if single in texts[i])
            break
        end = data.find(b"\n", start)
        if end < 0:
            break
        pos = end + 1
        line += 1
    return found


async def filtered(
    batches: AsyncIterator[list[Any]], line_filter: LineFilter | None
) -> AsyncIterator[list[Any]]:
    """`batches` (of a `LogReader`) through `line_filter` (None: as they are), without
    the batches it left empty (an empty batch from the reader, a heartbeat, passes);
    closes `batches` when closed."""
    try:
        async for batch in batches:
            if line_filter is not None and batch:
                batch = await line_filter.apply(batch)
                if not batch:
                    continue
            yield batch
    finally:
        aclose = getattr(batches, "aclose", None)  # a generator's: its files are closed
        if aclose is not None:
            await aclose()


def _threads() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                POOL_THREADS, thread_name_prefix="rankd-filter"
            )
        return _pool


def stream_filter(contains: str, regex: str) -> LineFilter | None:
    """The filter of a Stream request (None: every line). Raises SpecError naming the
    limit or the syntax error; compiles in about 2 ms at most."""
    size = len(contains.encode())
    if size > MAX_CONTAINS_BYTES:
        raise SpecError(f"contains is {size} bytes long, over the limit of {MAX_CONTAINS_BYTES}")
    if not regex:
        return LineFilter(literals=[contains], budget=MATCH_BUDGET) if contains else None
    literals = [contains] if contains else []
    if regex == NEVER_MATCHES:
        return LineFilter(never=True)
    return LineFilter(literals=literals, regex=compile_regex(regex), budget=MATCH_BUDGET)


def compile_regex(regex: str) -> Any:
    """`regex` compiled by RE2 within the limits above; SpecError naming the one broken."""
    size = len(regex.encode())
    if size > MAX_REGEX_BYTES:
        raise SpecError(f"regex is {size} bytes long, over the limit of {MAX_REGEX_BYTES}")
    repeats = sum(max(int(low), int(high or 0)) for low, high in _REPEAT.findall(regex))
    if repeats > MAX_REPEAT:
        raise SpecError(
            f"regex: its counted repetitions ({{n,m}}) add up to {repeats}, over the limit "
            f"of {MAX_REPEAT}"
        )
    classes = len(_UNICODE_CLASS.findall(regex))
    if classes > MAX_UNICODE_CLASSES:
        raise SpecError(
            f"regex names {classes} Unicode classes (\\p, \\P), over the limit of "
            f"{MAX_UNICODE_CLASSES}"
        )
    try:
        return re2.compile(regex, _options(REGEX_MEMORY))
    except re2.error as err:
        reason = err.args[0] if err.args else err
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", errors="replace")
        if "too large" in str(reason):
            reason = f"its program is larger than the agent's limit of {REGEX_MEMORY // 1024} KiB"
        raise SpecError(f"invalid regex {regex!r}: {reason}; the agent uses {_SYNTAX}") from None


def any_of(needles: Sequence[str]) -> LineFilter:
    """The filter of a spec's duplicate filters: lines holding any of `needles`
    (validated by `JobSpec.validate`: few and short, so this compiles in about 1 ms)."""
    return LineFilter(literals=needles)
