"""The few Linux facilities the agent needs and Python's stdlib lacks: inotify, the child
subreaper flag, and a one-pass scan of the process table."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterable, Iterator

__all__ = [
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_MODIFY",
    "MARKER_ENV",
    "Inotify",
    "children_of",
    "descendants",
    "set_child_subreaper",
]

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_CREATE = 0x00000100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_PR_SET_CHILD_SUBREAPER = 36
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def set_child_subreaper() -> None:
    """Make this process the reaper of every orphaned descendant (prctl
    PR_SET_CHILD_SUBREAPER), so a rank's grandchildren that lose their parent stay
    within reach of the agent instead of moving to init."""
    _check(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


class Inotify:
    """A non-blocking inotify instance; `fileno()` is readable when events are queued."""

    def __init__(self) -> None:
        self._fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: str, mask: int) -> int:
        return _check(
            _libc.inotify_add_watch(self._fd, os.fsencode(path), mask), "inotify_add_watch"
        )

    def rm_watch(self, wd: int) -> None:
        # EINVAL when the watch is already gone (directory deleted): nothing to do.
        _libc.inotify_rm_watch(self._fd, wd)

    def read(self) -> Iterator[tuple[int, int, str]]:
        """Queued events as (watch descriptor, mask, name); empty when none are queued."""
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        pos = 0
        while pos < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size
            name = data[pos : pos + length].rstrip(b"\0").decode(errors="replace")
            pos += length
            yield wd, mask, name

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def children_of(pid: int) -> list[int]:
    """The direct children of `pid`, from the kernel's per-thread children lists (a
    child forked by any thread is listed under that thread). Empty when it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # the thread ended meanwhile
            continue
        try:
            found.extend(map(int, os.read(fd, 1 << 16).split()))
        except OSError:
            continue
        finally:
            os.close(fd)
    return found


def descendants(roots: Iterable[int]) -> list[int]:
    """Every process below the roots (also those that left their process group or
    session), excluding the roots. Walks only these subtrees, not all of /proc."""
    found: list[int] = []
    stack = list(roots)
    while stack:
        kids = children_of(stack.pop())
        found.extend(kids)
        stack.extend(kids)
    return found


# Every process of a job attempt carries RANKD_ATTEMPT=<agent tag>/<job id>/<attempt>.
MARKER_ENV = "RANKD_ATTEMPT"


def read_environ_marker(pid: int, key: bytes = MARKER_ENV.encode()) -> bytes | None:
    """The value of one environment variable (the attempt marker by default) of a live
    process, or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    prefix = key + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :]
    return None
