"""The few Linux facilities the agent needs and Python's stdlib lacks: inotify, the child
subreaper flag, walks of the process tree, and glibc's posix_spawn with the options the
agent needs (os.posix_spawn has no chdir and holds the GIL)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import weakref
from collections.abc import Iterable, Iterator

__all__ = [
    "IN_CREATE",
    "IN_MODIFY",
    "IN_MOVED_TO",
    "IN_Q_OVERFLOW",
    "MARKER_ENV",
    "Inotify",
    "Spawner",
    "children_of",
    "descendants",
    "inotify_limit",
    "rename_noreplace",
    "set_child_subreaper",
    "task_children",
]

IN_MODIFY = 0x00000002
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000  # events were lost (wd is -1)
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


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(src: str, dst: str) -> None:
    """Rename `src` to `dst`, which must not exist (renameat2 RENAME_NOREPLACE; a plain
    rename silently replaces an empty directory). FileExistsError if it does."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)  # FileExistsError for EEXIST


# glibc's posix_spawn flags (spawn.h)
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSID = 0x80


class _Opaque(ctypes.Structure):
    # posix_spawn_file_actions_t is 80 bytes and posix_spawnattr_t 336 on x86_64 and
    # aarch64 glibc; 1 KiB holds either anywhere, as does a sigset_t (128 bytes).
    _fields_ = [("_", ctypes.c_byte * 1024)]


class Spawner:
    """Starts processes with glibc's posix_spawn (vfork-style: no page tables copied, no
    Python-side fork machinery), each in a new session, with stdin from /dev/null and
    stdout/stderr on descriptors the caller opened, every signal at its default (SIGPIPE
    and SIGXFSZ, which Python ignores, and any the agent inherited ignored) and none
    blocked, and no descriptor but 0-2 (as Popen with close_fds). Needs glibc 2.34
    (posix_spawn_file_actions_addclosefrom_np)."""

    def __init__(self) -> None:
        # AttributeError here, not at the first spawn, when glibc lacks one of them
        _libc.posix_spawn_file_actions_addclosefrom_np  # noqa: B018
        _libc.posix_spawn_file_actions_addchdir_np  # noqa: B018
        self._attr = _Opaque()
        attr = ctypes.byref(self._attr)
        _spawn_check(_libc.posix_spawnattr_init(attr), "posix_spawnattr_init")
        defaults, empty = _Opaque(), _Opaque()
        # every signal: also those the agent inherited ignored (`cmd &` in a script
        # ignores SIGINT and SIGQUIT, nohup SIGHUP) and those Python ignores (SIGPIPE,
        # SIGXFSZ); an ignored disposition would survive the exec. glibc's sigfillset
        # leaves out its internal signals.
        _libc.sigfillset(ctypes.byref(defaults))
        _libc.sigemptyset(ctypes.byref(empty))
        _libc.posix_spawnattr_setsigdefault(attr, ctypes.byref(defaults))
        _libc.posix_spawnattr_setsigmask(attr, ctypes.byref(empty))
        flags = _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK
        _spawn_check(_libc.posix_spawnattr_setflags(attr, ctypes.c_short(flags)), "setflags")

    def spawn(
        self,
        path: str,
        argv: list[str],
        env: list[bytes],
        *,
        stdout_fd: int,
        stderr_fd: int,
        cwd: str | None = None,
    ) -> int:
        """Start `path` with `argv` and `env` ("KEY=value" bytes), its stdout and stderr
        copies of `stdout_fd` and `stderr_fd` (left open here); return its pid. Raises
        OSError (errno, strerror, path) when it cannot be started (not found, not
        executable)."""
        actions = _Opaque()
        fa = ctypes.byref(actions)
        _spawn_check(_libc.posix_spawn_file_actions_init(fa), "file_actions_init")
        try:
            # the output files are opened by the caller, who can check what they are: in
            # the child, between vfork and exec, a FIFO would block the agent too
            for fd, target in ((stdout_fd, 1), (stderr_fd, 2)):
                _spawn_check(
                    _libc.posix_spawn_file_actions_adddup2(fa, fd, target), "file_actions_adddup2"
                )
            _spawn_check(
                _libc.posix_spawn_file_actions_addopen(fa, 0, b"/dev/null", os.O_RDONLY, 0),
                "file_actions_addopen",
            )
            # as Popen's close_fds: descriptors inherited from whoever started the agent
            # may lack close-on-exec (and the caller's two are copied to 1 and 2)
            _spawn_check(_libc.posix_spawn_file_actions_addclosefrom_np(fa, 3), "addclosefrom_np")
            if cwd:
                _spawn_check(
                    _libc.posix_spawn_file_actions_addchdir_np(fa, os.fsencode(cwd)),
                    "file_actions_addchdir_np",
                )
            args = (ctypes.c_char_p * (len(argv) + 1))(*map(os.fsencode, argv), None)
            envp = (ctypes.c_char_p * (len(env) + 1))(*env, None)
            pid = ctypes.c_int()
            err = _libc.posix_spawn(
                ctypes.byref(pid), os.fsencode(path), fa, ctypes.byref(self._attr), args, envp
            )
            if err:  # exec failures are reported here too (glibc waits for the exec)
                raise OSError(err, os.strerror(err), path)
            return pid.value
        finally:
            _libc.posix_spawn_file_actions_destroy(fa)


def _spawn_check(err: int, what: str) -> None:
    """posix_spawn* functions return an error number, not -1 and errno."""
    if err:
        raise OSError(err, f"{what}: {os.strerror(err)}")


class Inotify:
    """A non-blocking inotify instance; `fileno()` is readable when events are queued.
    Raises OSError (EMFILE: this user's fs.inotify.max_user_instances are used up, or
    this process's descriptors)."""

    def __init__(self) -> None:
        self._fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        # closed with its owner if nobody calls close() (a Supervisor never closed)
        self._closer = weakref.finalize(self, os.close, self._fd)

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
        """Every queued event as (watch descriptor, mask, name); empty when none are
        queued."""
        while True:
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
        self._closer()
        self._fd = -1


def inotify_limit(name: str) -> int | None:
    """The value of the sysctl fs.inotify.<name> (max_user_instances, max_user_watches),
    or None when it cannot be read."""
    try:
        with open(f"/proc/sys/fs/inotify/{name}", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    """The direct children of `pid`, from the kernel's per-thread children lists (a
    child forked by any thread is listed under that thread). Empty when it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    return [child for tid in tids for child in task_children(pid, int(tid))]


def task_children(pid: int, tid: int) -> list[int]:
    """The children forked by one thread `tid` of `pid` (or handed to it as a
    subreaper). Empty when the thread is gone."""
    try:
        fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return [int(child) for child in os.read(fd, 1 << 16).split()]
    except OSError:
        return []
    finally:
        os.close(fd)


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
