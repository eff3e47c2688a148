"""An attempt's mirrors: its ranks' lines copied, prefixed with their rank's header, to
the agent's console (`tee`, limited by `local_ranks_filter`) and to the attempt's
`filtered_stdout.log` / `filtered_stderr.log` (the lines holding one of the spec's
duplicate filters), as torch's `TailLog` does. Each mirror is a task that follows the
files until the attempt ends and it has written every line, and lets the loop serve
others after each batch: the duplicate filters run in `agent.filters`' threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TextIO

from rankd.agent import logdir, resources
from rankd.agent.filters import LineFilter, any_of
from rankd.agent.logs import STDERR, STDOUT, AttemptLogs, LogReader
from rankd.agent.model import Attempt
from rankd.agent.specs import Std

__all__ = ["FILTERED_FILES", "start_mirrors"]

logger = logging.getLogger(__name__)

FILTERED_FILES = {STDOUT: "filtered_stdout.log", STDERR: "filtered_stderr.log"}


def start_mirrors(attempt: Attempt, console_out: TextIO, console_err: TextIO) -> None:
    """Start the attempt's mirrors as tasks, kept in `attempt.mirrors` (see
    `Attempt.drained`)."""
    spec, logs = attempt.spec, attempt.logs
    tee = spec.tee_map()
    shown = spec.local_ranks_filter or frozenset(range(spec.nprocs))
    for stream, flag, console in ((STDOUT, Std.OUT, console_out), (STDERR, Std.ERR, console_err)):
        keys = [(r, stream) for r in range(spec.nprocs) if tee[r] & flag and r in shown]
        if keys:
            attempt.mirrors.append(
                asyncio.ensure_future(_mirror(logs, keys, console, None, close=False))
            )
    for stream, needles in (
        (STDOUT, spec.duplicate_stdout_filters),
        (STDERR, spec.duplicate_stderr_filters),
    ):
        if needles:
            keys = [(r, stream) for r in range(spec.nprocs)]
            path = os.path.join(logs.attempt_dir, FILTERED_FILES[stream])
            try:
                # 0600, never through a link or into a FIFO a rank planted there
                sink = os.fdopen(logdir.open_append(path), "a", encoding="utf-8")
            except OSError as err:  # the ranks run on: only this copy is lost
                logger.warning(
                    "%s", _trouble(err, f"writing {path}", logs), extra=attempt.log_extra()
                )
                continue
            attempt.mirrors.append(
                asyncio.ensure_future(_mirror(logs, keys, sink, any_of(needles), close=True))
            )


async def _mirror(
    logs: AttemptLogs,
    keys: list[tuple[int, int]],
    sink: TextIO,
    line_filter: LineFilter | None,
    *,
    close: bool,
) -> None:
    """Copy lines, prefixed with their rank's header, to `sink` until the attempt ends."""
    try:
        async for blocks in LogReader(logs, keys, follow=True).blocks():
            if line_filter is not None:
                blocks = await line_filter.apply(blocks)
            else:  # a flood's copy: the loop serves others between batches
                await asyncio.sleep(0)
            prefixes = logs.prefixes
            sink.write("".join(f"{prefixes[b.local_rank]}{t}\n" for b in blocks for t in b.texts))
            sink.flush()
    except OSError as err:  # out of descriptors or disk space: say which, no traceback
        logger.warning("%s", _trouble(err, f"mirroring the output of {logs.attempt_dir}", logs))
    except Exception:
        logger.exception("mirroring the output of %s failed", logs.attempt_dir)
    finally:
        if close:
            with contextlib.suppress(OSError):  # (a full disk: said above)
                sink.close()


def _trouble(err: OSError, what: str, logs: AttemptLogs) -> str:
    """What went wrong, as the agent says it elsewhere for descriptors and disk space."""
    limit = resources.exhausted(err, what, log_dir=logs.log_dir)
    return str(limit) if limit is not None else f"{what} failed: {err}"
