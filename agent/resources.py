"""The node's finite resources that ranks need besides CPUs: file descriptors and space on
the log file system.

Checked up front at each Start, cheaply (one listing of /proc/self/fd, one statvfs), so
that a Start that cannot succeed is refused with the arithmetic; and when they run out
later anyway (EMFILE, ENFILE, ENOSPC, EDQUOT) the same clear message is made by
`exhausted`, whatever was under way (a spawn, a Stream, a log follower).
"""

from __future__ import annotations

import errno
import os
import re
import resource

from rankd.agent.errors import LimitExceeded

__all__ = [
    "DISK_FULL",
    "FDS_PER_RANK",
    "check_fds",
    "check_free_space",
    "disk_full_note",
    "exhausted",
    "fd_usage",
    "filesystem",
    "format_size",
    "free_bytes",
    "parse_size",
    "raise_fd_limit",
]

#: Descriptors the agent holds per running rank: its pidfd, and its two log files while
#: one client follows them (a Stream, or the tee mirror).
FDS_PER_RANK = 3
#: Free bytes under which the log file system counts as full: a rank that fails then
#: is told that its output may not have been written.
DISK_FULL = 1 << 20

_FD_ERRORS = (errno.EMFILE, errno.ENFILE)
_OCTAL = re.compile(r"\\([0-7]{3})")
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)


# -- file descriptors ------------------------------------------------------------------


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, as daemons do (the
    soft one is often 1024 whatever the hard one allows). Returns (soft before, soft
    now, hard). Ranks inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # not on Linux (nr_open bounds it), but be safe
        return soft, soft, hard
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft, hard
    return soft, hard, hard


def fd_usage() -> tuple[int, int]:
    """(descriptors open in this process, its soft limit)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        count = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError as err:
        if err.errno not in _FD_ERRORS:
            raise
        count = soft  # not even one to list them with
    return count, soft


def check_fds(nprocs: int) -> None:
    """Raise LimitExceeded, with the arithmetic, when `nprocs` more ranks would need more
    descriptors than remain below the soft limit."""
    count, soft = fd_usage()
    free = max(soft - count, 0)
    if FDS_PER_RANK * nprocs > free:
        raise LimitExceeded(f"not enough file descriptors: {_fd_sums(nprocs, free, soft)}")


def _fd_sums(nprocs: int | None, free: int, soft: int) -> str:
    head = (
        "" if nprocs is None else f"{nprocs} ranks need about {FDS_PER_RANK * nprocs} descriptors; "
    )
    return f"{head}{free} free of {soft}; raise `ulimit -n`"


# -- disk space ------------------------------------------------------------------------


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def filesystem(path: str) -> str:
    """The file system holding `path`, as "<mount point> (<type>)" from
    /proc/self/mountinfo; "unknown file system" when it cannot be read."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                mount = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])  # \040: a space
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        return "unknown file system"
    return f"{best} ({kind})" if best else "unknown file system"


def check_free_space(path: str, minimum: int) -> None:
    """Raise LimitExceeded when the file system of `path` has less than `minimum` bytes
    free (0: no check)."""
    if minimum <= 0:
        return
    free = free_bytes(path)
    if free < minimum:
        raise LimitExceeded(
            f"log directory {path} has {format_size(free)} free, less than "
            f"--min-free-space {format_size(minimum)}; free some space there (old run "
            "directories can go) or lower --min-free-space"
        )


def disk_full_note(path: str) -> str:
    """ "log directory full: <path> on <fs>, <n> free" when the file system of `path` is
    full or nearly so (under DISK_FULL), else ""."""
    try:
        free = free_bytes(path)
    except OSError:
        return ""
    if free >= DISK_FULL:
        return ""
    return f"log directory full: {path} on {filesystem(path)}, {format_size(free)} free"


# -- both --------------------------------------------------------------------------------


def exhausted(
    err: BaseException, what: str, *, nprocs: int | None = None, log_dir: str = ""
) -> LimitExceeded | None:
    """The clear error for an OSError that says a resource ran out while doing `what`
    ("starting 40 ranks", "streaming logs"): descriptors (EMFILE, ENFILE) or disk space
    under `log_dir` (ENOSPC, EDQUOT). None for any other error."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code == errno.EMFILE:
        count, soft = fd_usage()
        sums = _fd_sums(nprocs, max(soft - count, 0), soft)
        return LimitExceeded(f"out of file descriptors while {what}: {sums}")
    if code == errno.ENFILE:
        return LimitExceeded(
            f"the system's file table is full (fs.file-max) while {what}: close files "
            "elsewhere on this node or raise fs.file-max"
        )
    if code in _DISK_ERRORS and log_dir:
        note = disk_full_note(log_dir) or f"log directory {log_dir}: {os.strerror(code)}"
        return LimitExceeded(f"{note} (while {what})")
    return None


# -- sizes -------------------------------------------------------------------------------

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "100M", "1.5G", "512K", "4096" (suffixes K, M, G, T: powers of 1024;
    a trailing "B" or "iB" is allowed). Raises ValueError."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad size {text!r}: use bytes or a number with K, M or G (e.g. 100M)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def format_size(size: int) -> str:
    """ "0 B", "812 KiB", "1.9 MiB", "100 MiB": one decimal below 10 units."""
    value, unit = float(size), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    if unit == "B" or value >= 10 or value == int(value):
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"
