"""Reading the files a rank can reach: its log files, its error file, and job.json.

A rank runs, by default, as the agent's own user, so it can replace anything below the
log directory: put a FIFO where its `stderr.log` was (a plain `open` then blocks the
agent for good), a symbolic link to a secret where its `stdout.log` was (a plain `open`
then serves the secret), or a link in place of its rank directory. The agent therefore
opens these files only through `open_regular`: every component below the trusted log
directory is opened relative to its parent's descriptor without following symbolic
links, the file itself with `O_NONBLOCK` (a FIFO opens at once), and anything that is
not a regular file is refused with `NotRegularFile`, saying what it is.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "JOB_DEPTH",
    "MAX_OFFSET",
    "RANK_DEPTH",
    "NotRegularFile",
    "kind",
    "open_regular",
    "regular_size",
]

#: The largest file offset (off_t): a read from beyond it can only be end-of-file.
MAX_OFFSET = 2**63 - 1
#: Directories a rank can replace between the log directory and a rank's file:
#: `<log_dir>/<run>/attempt_<n>/<local_rank>/<file>`.
RANK_DEPTH = 3
#: The same for a job's record: `<log_dir>/<run>/job.json`.
JOB_DEPTH = 1

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# O_NOCTTY: whatever it is, it never becomes the agent's terminal
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotRegularFile(OSError):
    """A file that is not a regular file, or a path through a symbolic link, where the
    agent expects its own regular file; `str()` names the path and what it is."""


def kind(mode: int) -> str:
    """What a file of `mode` is, in words ("a FIFO")."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "an unknown kind of file"


def open_regular(path: str, *, depth: int = RANK_DEPTH) -> int:
    """A descriptor of `path` for reading, in blocking mode, if it is a regular file.
    The last `depth` directories of `path` and the file itself are opened without
    following symbolic links (what comes before them is the trusted log directory).
    Never blocks, whatever stands at `path`. Raises FileNotFoundError when something is
    missing, NotRegularFile when something is not what it should be, or the OSError
    of the open."""
    names: list[str] = []
    root = path
    for _ in range(depth + 1):
        root, name = os.path.split(root)
        if not name:
            break
        names.append(name)
    if not names:
        raise IsADirectoryError(errno.EISDIR, f"{path} names no file")
    names.reverse()
    fd = os.open(root or os.curdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = root
    try:
        for name in names[:-1]:
            walked = os.path.join(walked, name)
            try:
                step = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                raise _refused(err, fd, name, walked, "a directory") from None
            os.close(fd)
            fd = step
        walked = os.path.join(walked, names[-1])
        try:
            leaf = os.open(names[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as err:
            raise _refused(err, fd, names[-1], walked, "a regular file") from None
    finally:
        os.close(fd)
    try:
        mode = os.fstat(leaf).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{walked} is {kind(mode)}, not a regular file")
        # O_NONBLOCK does nothing to a regular file (open(2)); cleared all the same, so
        # that no file system that thinks otherwise answers a read with EAGAIN
        os.set_blocking(leaf, True)
    except BaseException:
        os.close(leaf)
        raise
    return leaf


def _refused(err: OSError, dir_fd: int, name: str, path: str, wanted: str) -> OSError:
    """The error to raise for an open of `name` (in `dir_fd`, at `path`) that failed
    with `err`: NotRegularFile when what stands there is not `wanted`."""
    # ELOOP: a symbolic link (O_NOFOLLOW); ENOTDIR: not a directory; ENXIO: a socket
    if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
        return err
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return err
    return NotRegularFile(f"{path} is {kind(mode)}, not {wanted}")


def regular_size(path: str) -> int:
    """Bytes in the file at `path` (not following a symbolic link there); -1 when it
    does not exist or cannot be asked. Raises NotRegularFile when it is not a regular
    file. One system call: directories above it are not checked (see open_regular)."""
    try:
        st = os.lstat(path)
    except OSError:
        return -1
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path} is {kind(st.st_mode)}, not a regular file")
    return st.st_size
