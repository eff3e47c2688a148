"""How the agent notices log growth: one inotify instance for the agent, or, where
inotify is not to be had (its instances or watches used up, or `mode="poll"`), a bounded
poll of the running attempts every `POLL_INTERVAL` seconds. Either way it fires the
attempt's `Pulse`, which wakes the readers of :mod:`rankd.agent.logs`.

It opens no rank's file itself: readers do, never following a link nor opening what is
not a regular file (see `rankd.agent.logs`). A rank's output file deleted or renamed
over, or its rank directory moved, makes the agent ask the file again (its size and
kind) instead of trusting what inotify saw before."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time

from rankd.agent import resources
from rankd.agent.linux import (
    IN_CREATE,
    IN_MODIFY,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
    inotify_limit,
)
from rankd.agent.logs import ERROR_FILE, FILE_STREAMS, AttemptLogs

__all__ = ["FOLLOW_MODES", "POLL_INTERVAL", "LogWatcher"]

#: Seconds between two looks at the files of an attempt followed without inotify.
POLL_INTERVAL = 0.025
#: How a LogWatcher follows files: "auto" (inotify, polling where it cannot), "poll".
FOLLOW_MODES = ("auto", "poll")
# (not in rankd.agent.linux, which the write side owns)
_IN_MOVED_FROM = 0x00000040
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_ONLYDIR = 0x01000000
_IN_DONT_FOLLOW = 0x02000000
# An output file deleted or renamed over (by its rank): whatever stands there now is to
# be asked, never trusted (see AttemptLogs.size).
_REPLACED = _IN_DELETE | _IN_MOVED_FROM | IN_MOVED_TO
# A rank directory itself moved or deleted: nothing more is seen in it; ask the files.
_GONE = _IN_DELETE_SELF | _IN_MOVE_SELF
# a write to an output file, or its replacement; the error file appearing, also by rename
_WATCHED = IN_MODIFY | IN_CREATE | _REPLACED | _GONE
# a watch is on the rank directory the agent made, never on what a link points to
_WATCH_FLAGS = _WATCHED | _IN_ONLYDIR | _IN_DONT_FOLLOW

logger = logging.getLogger(__name__)


class LogWatcher:
    """Wakes the readers of the attempts' logs. One inotify instance for the agent, made
    at once: it marks when each rank last wrote and wakes the readers of its attempt, and
    costs nothing while no rank writes.

    Without inotify (`mode="poll"`, or when the instance cannot be made: this user's
    fs.inotify.max_user_instances are used up), and for an attempt whose directories
    cannot be watched (fs.inotify.max_user_watches), it fires the pulses of the running
    attempts every POLL_INTERVAL seconds instead (only a reader that waits does any
    work then), and the files themselves tell sizes and times. Each fallback is logged
    once, with the sysctl to raise. Events are delivered once `attach`ed to a loop."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in FOLLOW_MODES:
            raise ValueError(f"log follow mode must be one of {FOLLOW_MODES}, not {mode!r}")
        self._inotify: Inotify | None = None
        if mode == "auto":
            try:
                self._inotify = Inotify()
            except OSError as err:
                logger.warning("%s", _no_instance(err))
        #: "inotify" or "poll": how the files of a new attempt are followed.
        self.mode = "poll" if self._inotify is None else "inotify"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: dict[int, tuple[AttemptLogs, int]] = {}
        self._by_attempt: dict[int, list[int]] = {}
        self._polled: dict[int, AttemptLogs] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._watches_warned = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events on `loop` from now on. Idempotent."""
        if self._loop is not None:
            return
        if self._inotify is not None:
            loop.add_reader(self._inotify.fileno(), self._on_events)
        self._loop = loop
        if self._polled:
            self._timer = loop.call_later(POLL_INTERVAL, self._tick)

    def detach(self) -> None:
        """Undo `attach` (the inotify instance is kept). Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None and self._inotify is not None:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                self._loop.remove_reader(self._inotify.fileno())
        self._loop = None

    @property
    def polled(self) -> int:
        """Attempts followed by polling now."""
        return len(self._polled)

    def watch(self, logs: AttemptLogs) -> None:
        """Watch an attempt's rank directories; before its ranks start, so that every
        write is seen (see AttemptLogs.written). Never fails: an attempt that cannot be
        watched is polled."""
        if self._inotify is not None:
            wds: list[int] = []
            try:
                for rank in range(logs.nprocs):
                    wds.append(self._inotify.add_watch(logs.rank_dir(rank), _WATCH_FLAGS))
            except OSError as err:
                for wd in wds:
                    self._inotify.rm_watch(wd)
                self._no_watch(logs, err)
            else:
                for rank, wd in enumerate(wds):
                    self._watches[wd] = (logs, rank)
                self._by_attempt[id(logs)] = wds
                logs.written, logs.error_files = set(), set()
                return
        logs.polled = True
        logs.written = logs.error_files = None
        self._polled[id(logs)] = logs
        if self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(POLL_INTERVAL, self._tick)

    def _no_watch(self, logs: AttemptLogs, err: OSError) -> None:
        if self._watches_warned:
            logger.debug("polling the logs of %s: %s", logs.attempt_dir, err)
            return
        self._watches_warned = True
        if err.errno == errno.ENOSPC:
            why = _raise_sysctl("max_user_watches", "this user's inotify watches are used up")
        else:
            why = f"inotify_add_watch failed: {err.strerror or err}"
        logger.warning(
            "cannot watch %s with inotify: following its logs (and those of later attempts "
            "that cannot be watched) by polling every %d ms instead; %s",
            logs.attempt_dir,
            POLL_INTERVAL * 1000,
            why,
        )

    def _tick(self) -> None:
        self._timer = None
        for logs in self._polled.values():
            logs.pulse.fire()  # nothing to do unless a reader waits
        if self._polled and self._loop is not None:
            self._timer = self._loop.call_later(POLL_INTERVAL, self._tick)

    def unwatch(self, logs: AttemptLogs) -> None:
        logs.written = logs.error_files = None
        self._polled.pop(id(logs), None)
        for wd in self._by_attempt.pop(id(logs), ()):
            self._watches.pop(wd, None)
            if self._inotify is not None:
                self._inotify.rm_watch(wd)

    def drain(self) -> None:
        """Take every event queued so far (a rank's writes are queued before its exit
        can be seen)."""
        if self._inotify is not None:
            self._on_events()

    def _on_events(self) -> None:
        assert self._inotify is not None
        now = time.time()
        woken: dict[int, AttemptLogs] = {}
        for wd, mask, name in self._inotify.read():
            if mask & IN_Q_OVERFLOW:  # events were lost: every file must be asked
                for logs, _ in self._watches.values():
                    logs.written = logs.error_files = None
                    woken[id(logs)] = logs
                continue
            target = self._watches.get(wd)
            if target is None:
                continue
            logs, rank = target
            if mask & _GONE:
                logs.written = logs.error_files = None
                continue
            stream = FILE_STREAMS.get(name)
            if stream is not None:
                if mask & IN_MODIFY:  # (its creation by spawn tells nothing)
                    logs.last_output[rank] = now
                    if logs.written is not None:
                        logs.written.add((rank, stream))
                    woken[id(logs)] = logs
                elif mask & _REPLACED and logs.written is not None:
                    logs.written.add((rank, stream))
            elif name == ERROR_FILE and logs.error_files is not None:
                logs.error_files.add(rank)
        for logs in woken.values():
            logs.pulse.fire()

    def close(self) -> None:
        """Stop delivering events and release the inotify instance. Idempotent."""
        self.detach()
        self._polled.clear()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


def _no_instance(err: OSError) -> str:
    """The warning for an inotify instance that could not be made."""
    if err.errno == errno.EMFILE:
        count, soft = resources.fd_usage()
        if count >= soft - 1:
            why = f"this process is out of file descriptors ({count} of {soft}); raise `ulimit -n`"
        else:
            why = _raise_sysctl("max_user_instances", "this user's inotify instances are used up")
    elif err.errno == errno.ENOSYS:
        why = "this kernel has no inotify"
    else:
        why = f"inotify_init1 failed: {err.strerror or err}"
    return (
        f"cannot use inotify: following log files by polling every "
        f"{POLL_INTERVAL * 1000:.0f} ms instead; {why}"
    )


_SUGGESTED = {"max_user_instances": 1024, "max_user_watches": 524288}


def _raise_sysctl(name: str, what: str) -> str:
    now = inotify_limit(name)
    value = "" if now is None else f" (now {now})"
    suggested = max(_SUGGESTED[name], 2 * (now or 0))
    return f"{what}: raise fs.inotify.{name}{value}, e.g. `sysctl -w fs.inotify.{name}={suggested}`"
