"""The log directory: whose it must be, and the modes of what the agent makes in it.

Everything under the log dir belongs to the agent's user, who is also its ranks' user:
directories are made 0700 (`DIR_MODE`) and files 0600 (`FILE_MODE`). The modes are
given to every mkdir and open, so no umask can widen them (a umask only clears bits).

At startup `check_log_dir` refuses a log dir that another user could change under the
agent: one owned by someone else, writable by group or others, or below a directory
that someone but root and the agent's user could change. Such a user could swap a job's
directories for their own and read its ranks' output, or plant job records. Refusals
are one line with the fix.

Output files are opened with `open_append`: never through a symbolic link, never
blocking on a FIFO, and only when they are regular files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shlex
import stat
from collections.abc import Iterator

from rankd.agent.errors import SpecError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "LogDirError",
    "check_log_dir",
    "open_append",
    "open_dir",
    "tighten_run_dirs",
]

logger = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
# a directory's handle for lookups below it: needs no read permission on it (an ancestor
# may be 0711), follows no symbolic link
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_APPEND_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
)
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class LogDirError(SpecError):
    """The log directory cannot be used, or is not safe to use: the agent does not start.
    (A bad argument to the supervisor, hence a SpecError.)"""


def check_log_dir(path: str) -> str:
    """The log dir's real absolute path (symbolic links resolved once, here, so that no
    link can be re-pointed later), made if missing with any missing parent, each 0700.
    Raises LogDirError, with the fix, when the log dir is not a directory, is owned by
    another user than this process's effective one, is writable by group or others,
    or lies below a directory owned by another user than root and this one, or writable
    by anyone without the sticky bit (all of which could replace it). A group-writable
    directory above it without the sticky bit is logged as a warning only: shared group
    directories are common on clusters."""
    real = os.path.realpath(path)
    where = "/"
    fd = os.open(where, _DIR_FLAGS)
    try:
        names = [name for name in real.split("/") if name]
        for i, name in enumerate(names):
            _check_above(path, where, os.fstat(fd))
            where = os.path.join(where, name)
            child = _open_or_make(path, where, name, fd, last=i == len(names) - 1)
            os.close(fd)
            fd = child
        _check_own(path, real, os.fstat(fd))
    finally:
        os.close(fd)
    return real


def _open_or_make(path: str, where: str, name: str, parent: int, *, last: bool) -> int:
    """A handle of the directory `name` in `parent`, made (0700) if missing."""
    try:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # another agent made it meanwhile
                os.mkdir(name, DIR_MODE, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            if stat.S_IMODE(os.fstat(fd).st_mode) != DIR_MODE:  # a umask took owner bits
                _set_mode(fd, DIR_MODE)
            return fd
    except NotADirectoryError:  # or a symbolic link that appeared since realpath
        if last:
            raise LogDirError(f"log dir {path!r} exists and is not a directory") from None
        raise LogDirError(f"log dir {path!r}: {where} is not a directory") from None
    except OSError as err:
        raise LogDirError(f"cannot use log dir {path!r}: {where}: {err.strerror}") from None


def _check_above(path: str, where: str, info: os.stat_result) -> None:
    """Refuse a directory above the log dir whose owner or others could replace it."""
    me = os.geteuid()
    if info.st_uid not in (0, me):
        raise LogDirError(
            f"log dir {path!r}: {where} above it is owned by uid {info.st_uid}, who could "
            f"replace it: use a directory of your own (uid {me}), e.g. `mktemp -d`"
        )
    sticky = info.st_mode & stat.S_ISVTX
    if info.st_mode & stat.S_IWOTH and not sticky:
        q = shlex.quote(where)
        raise LogDirError(
            f"log dir {path!r}: {where} above it is writable by anyone without the sticky "
            f"bit (mode {stat.S_IMODE(info.st_mode):o}), so anyone could replace it: "
            f"chmod o-w {q} (or chmod +t {q}), or use another directory"
        )
    if info.st_mode & stat.S_IWGRP and not sticky:
        logger.warning(
            "log dir %s: %s above it is writable by group %d (mode %o): its members could "
            "replace the log dir; chmod g-w %s, or use a directory only you can change",
            path,
            where,
            info.st_gid,
            stat.S_IMODE(info.st_mode),
            shlex.quote(where),
        )


def _check_own(path: str, real: str, info: os.stat_result) -> None:
    me = os.geteuid()
    if info.st_uid != me:
        raise LogDirError(
            f"log dir {path!r} is owned by uid {info.st_uid}, not this agent's user "
            f"(uid {me}): use a directory of your own, e.g. `mktemp -d`"
        )
    if info.st_mode & _OTHERS_WRITE:
        raise LogDirError(
            f"log dir {path!r} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}): chmod 700 {shlex.quote(real)}"
        )


def _set_mode(fd: int, mode: int) -> None:
    """chmod through a handle opened with O_PATH (which fchmod does not take)."""
    os.chmod(f"/proc/self/fd/{fd}", mode)


def tighten_run_dirs(log_dir: str) -> int:
    """Make every directory directly in `log_dir` that this user owns 0700 if group or
    others have any access to it (earlier agents made some 0755; a run directory closed
    to them closes everything in it, whatever the modes inside). Returns how many changed."""
    me = os.geteuid()
    changed = 0
    dir_fd = os.open(log_dir, _DIR_FLAGS)
    try:
        with os.scandir(log_dir) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                    if not stat.S_ISDIR(info.st_mode) or info.st_uid != me:
                        continue
                    if stat.S_IMODE(info.st_mode) & 0o077:
                        fd = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                        try:
                            _set_mode(fd, DIR_MODE)
                        finally:
                            os.close(fd)
                        changed += 1
                except OSError as err:  # gone meanwhile, or not ours after all
                    logger.warning("cannot make %s private (0700): %s", entry.path, err)
    finally:
        os.close(dir_fd)
    if changed:
        logger.info("%d run directories in %s made private (0700)", changed, log_dir)
    return changed


@contextlib.contextmanager
def open_dir(path: str, *, dir_fd: int | None = None) -> Iterator[int]:
    """A handle (O_PATH) of the directory `path` for lookups relative to it, closed on
    exit; raises OSError (ENOTDIR also for a symbolic link: never followed)."""
    fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def open_append(path: str, *, dir_fd: int | None = None) -> int:
    """A descriptor appending to the regular file `path`, created 0600 if missing:
    close-on-exec, blocking, never 0-2. Raises OSError, its strerror naming the path,
    when it is a symbolic link (never followed) or a FIFO, socket or device (never
    waited on); else the open's own (EMFILE, ENOSPC, ...)."""
    try:
        fd = os.open(path, _APPEND_FLAGS, FILE_MODE, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(err.errno, f"{path} is a symbolic link: not followed") from None
        if err.errno == errno.ENXIO:  # a FIFO without a reader, or a socket
            raise OSError(err.errno, f"{path} is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        # O_NONBLOCK was for the open alone: the rank inherits a plain descriptor
        os.set_blocking(fd, True)
        if fd < 3:  # 0-2 were closed: a spawn could not copy it to 1 or 2 unharmed
            fd, low = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3), fd
            os.close(low)
    except BaseException:
        os.close(fd)
        raise
    return fd
