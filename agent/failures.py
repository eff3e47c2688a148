"""Rank failures as data, in the spirit of torch's `ProcessFailure`.

The error file is read in both of torch's formats: ``{"message": "...", "timestamp": N}``
and ``{"message": {"message": ..., "extraInfo": {"py_callstack": ..., "timestamp": N}}}``.
A missing file is normal; a corrupt one is reported in `error_file_problem`, never raised,
and so is one that is not a regular file (a FIFO, a symbolic link: a rank may replace its
files), which is never opened nor followed (see `rankd.agent.rankfiles`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from rankd.agent.rankfiles import NotRegularFile, open_regular

__all__ = ["NOT_AVAILABLE", "Failure", "read_failure", "root_cause", "stderr_tail"]

NOT_AVAILABLE = "<N/A>"
STDERR_TAIL_LINES = 20
_STDERR_TAIL_BYTES = 16 * 1024
_MAX_ERROR_FILE_BYTES = 4 * 1024 * 1024


@dataclass
class Failure:
    """Why one rank did not succeed. Root cause = earliest `timestamp` among the failures
    that were not `terminated_by_agent`."""

    local_rank: int
    pid: int
    exit_code: int
    signal_name: str = ""
    message: str = ""
    error_file: str = NOT_AVAILABLE
    error_file_data: str = ""
    traceback: str = ""
    timestamp: float = 0.0
    stderr_tail: list[str] = field(default_factory=list)
    terminated_by_agent: bool = False
    error_file_problem: str = ""


@functools.cache
def signal_name(exit_code: int) -> str:
    if exit_code >= 0:
        return ""
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return "<N/A>"


def read_failure(
    *,
    local_rank: int,
    pid: int,
    exit_code: int,
    exit_time: float,
    error_file: str,
    stderr_path: str,
    terminated_by_agent: bool,
    stderr_size: int | None = None,
    error_file_absent: bool = False,
) -> Failure:
    """Build the failure record of a rank that exited with `exit_code` at `exit_time`.
    What the caller knows spares system calls: `stderr_size` 0 an empty stderr's open,
    `error_file_absent` the error file's open."""
    failure = Failure(
        local_rank=local_rank,
        pid=pid,
        exit_code=exit_code,
        signal_name=signal_name(exit_code),
        timestamp=exit_time,
        terminated_by_agent=terminated_by_agent,
        stderr_tail=stderr_tail(stderr_path) if stderr_size != 0 else [],
    )
    if not error_file_absent:
        _apply_error_file(failure, error_file, exit_time)
    if not failure.message:
        if exit_code < 0:
            failure.message = f"Signal {-exit_code} ({failure.signal_name}) received by PID {pid}"
        else:
            failure.message = f"Process {pid} exited with code {exit_code}"
    return failure


def _apply_error_file(failure: Failure, path: str, exit_time: float) -> None:
    try:
        with open(open_regular(path), "rb") as f:  # bounded: a rank may write any amount
            raw = f.read(_MAX_ERROR_FILE_BYTES + 1)
        if len(raw) > _MAX_ERROR_FILE_BYTES:
            raise ValueError(f"larger than {_MAX_ERROR_FILE_BYTES} bytes")
        data = json.loads(raw.decode(errors="replace"))
        message, traceback, stamp = _parse_error_data(data)
    except FileNotFoundError:  # the common case: the rank wrote none
        return
    except NotRegularFile as err:
        failure.error_file_problem = f"error file {err}: not read"
        return
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as err:
        # OverflowError: a timestamp of Infinity; RecursionError: absurdly deep nesting.
        failure.error_file_problem = f"corrupt error file {path}: {type(err).__name__}: {err}"
        return
    failure.error_file = path
    failure.error_file_data = raw.decode(errors="replace")
    failure.message = message
    failure.traceback = traceback
    # torch stores whole seconds; the exit time we saw is more precise when it falls in
    # the same second, and the file's time is the truth when it is earlier.
    if stamp is not None and math.floor(exit_time) != stamp:
        failure.timestamp = min(float(stamp), exit_time)


def _parse_error_data(data: Any) -> tuple[str, str, int | None]:
    if not isinstance(data, dict) or "message" not in data:
        raise ValueError("no 'message' field")
    message = data["message"]
    if isinstance(message, str):
        stamp = data.get("timestamp")
        return message, "", int(stamp) if stamp is not None else None
    if not isinstance(message, dict):
        raise TypeError("'message' is neither a string nor an object")
    extra = message.get("extraInfo") or {}
    if not isinstance(extra, dict):
        raise TypeError("'extraInfo' is not an object")
    stamp = extra.get("timestamp")
    return (
        str(message.get("message", "")),
        str(extra.get("py_callstack", "")),
        int(stamp) if stamp is not None else None,
    )


def stderr_tail(path: str, lines: int = STDERR_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a rank's file (bounded read; decoded with replacement);
    none when it is missing or not a regular file (see rankfiles.open_regular)."""
    try:
        fd = open_regular(path)
    except OSError:
        return []
    try:
        size = os.fstat(fd).st_size
        if size == 0:  # the common case of a killed rank: no open file object, no read
            return []
        start = max(0, size - _STDERR_TAIL_BYTES)
        data = os.pread(fd, size - start, start)
    except OSError:
        return []
    finally:
        os.close(fd)
    text = data.decode(errors="replace").splitlines()
    if size > _STDERR_TAIL_BYTES and text:
        text = text[1:]  # the first line was cut by the bounded read
    return text[-lines:]


def root_cause(failures: list[Failure]) -> Failure | None:
    """The earliest failure that happened on its own; else the earliest of all."""
    own = [f for f in failures if not f.terminated_by_agent]
    pool = own or failures
    return min(pool, key=lambda f: f.timestamp) if pool else None
