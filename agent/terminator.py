"""The ranks' processes from their start to their reaping: their exits, their kill, and
what they leave behind.

Whoever owns a process owns its kill (torch's `SubprocessHandler.close`): from the moment
a launch hands its ranks over (`adopt`), the `Terminator` reaps them as they exit (pidfd,
see `procs.ExitWatcher`), terminates them on demand (the process groups, then what left
them, SIGKILL after a deadline), kills what an ended attempt left running, and, as the
agent's child subreaper, reaps the orphans it adopts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterable

from rankd.agent import procs
from rankd.agent.linux import set_child_subreaper
from rankd.agent.model import Attempt, Rank

__all__ = ["SIGKILL_WAIT", "Exit", "Terminator"]

logger = logging.getLogger(__name__)

# After SIGKILL a rank normally dies within milliseconds; one stuck in uninterruptible
# sleep (D state) may not, and must not wedge the caller.
SIGKILL_WAIT = 5.0

#: A rank that exited: ((its attempt, the rank), exit code, exit time).
Exit = tuple[tuple[Attempt, Rank], int, float]


class Terminator:
    """Owns the running ranks of every attempt. Call from one asyncio loop.

    `subreaper=True` (for the agent process, not for library use inside a process that
    runs other children) makes this process adopt orphaned descendants, so that nothing a
    rank started escapes the job, and reap them. `on_exits` receives each batch of exits
    (many ranks dying at once make one batch), after their pids were released."""

    def __init__(self, *, subreaper: bool, on_exits: Callable[[list[Exit]], None]) -> None:
        self._subreaper = subreaper
        self._on_exits = on_exits
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exits: procs.ExitWatcher[tuple[Attempt, Rank]] | None = None
        self._pids: set[int] = set()  # of the ranks that have not exited
        self._protected: set[int] = set()  # the agent's other children (its guardian)
        self._ours = _Either(self._pids, self._protected)  # never reaped as orphans
        self._orphans_waiting = False  # see _reap_orphans

    @property
    def running(self) -> int:
        """Ranks that have not exited, over every attempt."""
        return len(self._pids)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin watching exits (and adopting orphans) on `loop`. All or nothing: raises
        OSError (no descriptor for the epoll set) with nothing started; can be called
        again after that, or after `close`."""
        exits: procs.ExitWatcher[tuple[Attempt, Rank]] = procs.ExitWatcher(loop, self._exited)
        if self._subreaper:
            try:
                set_child_subreaper()
                loop.add_signal_handler(signal.SIGCHLD, self._reap_orphans)
            except BaseException:
                exits.close()
                raise
        self._loop, self._exits = loop, exits

    def protect(self, pid: int) -> None:
        """`pid`, a child of this process that is no rank (the guardian), is reaped by
        its owner, never as an orphan."""
        self._protected.add(pid)

    def release(self, pid: int) -> None:
        """Its owner has reaped `pid` (see `protect`)."""
        self._protected.discard(pid)
        if self._orphans_waiting and self._loop is not None:  # it may have held them up
            self._loop.call_soon(self._reap_orphans)

    def adopt(self, attempt: Attempt) -> None:
        """Take over a launched attempt's ranks (each with its pidfd). Their exits are
        watched from the loop's next turn (after Start's answer): until then an exit
        waits as a zombie, as nobody else reaps it."""
        assert self._loop is not None
        self._pids.update(r.pid for r in attempt.ranks)
        self._loop.call_soon(self._watch, attempt)

    def _watch(self, attempt: Attempt) -> None:
        for rank in attempt.ranks:
            fd, rank.pidfd = rank.pidfd, -1
            if self._exits is None:  # closed meanwhile
                os.close(fd)
            else:
                self._exits.watch_fd(fd, rank.pid, (attempt, rank))

    def _exited(self, exits: list[Exit]) -> None:
        for (_, rank), _, _ in exits:
            self._pids.discard(rank.pid)
        self._on_exits(exits)
        if self._orphans_waiting and self._loop is not None:  # after these exits' answers
            self._loop.call_soon(self._reap_orphans)

    def _reap_orphans(self) -> None:
        # A rank's zombie ahead of an orphan's stops the sweep; the next rank exit
        # finishes it (SIGCHLDs merge, so there may be no other signal for that orphan).
        self._orphans_waiting = not procs.reap_orphans(self._ours)

    async def terminate(
        self, attempt: Attempt, sig: int, timeout: float, *, escalate: bool = True
    ) -> None:
        """Signal every live rank's process group and every other process of the attempt;
        if `escalate`, mark the ranks `terminated_by_agent`, SIGKILL what is still alive
        after `timeout`, and wait for the attempt's end a bounded time (SIGKILL_WAIT).
        Idempotent; ignores processes that are already gone."""
        alive = [r for r in attempt.ranks if r.alive]
        if escalate:
            for rank in alive:
                rank.terminated_by_agent = True
        pgids = [r.pid for r in alive]
        if self._subreaper:
            # Process groups only, at once (as torch does): what left a group is adopted
            # by this process when its rank dies, and killed by `kill_leftovers`, which
            # the supervisor runs a moment after the attempt's end (at once if the job's
            # next Start or close() comes first); or by the SIGKILL below if a rank does
            # not die. A walk of the process tree here would delay every exit.
            procs.send_signal(pgids, (), sig)
            if not escalate:  # a signal that is not a kill reaches them now
                procs.signal_others(pgids, attempt.marker, sig)
        else:
            # Without the subreaper, a dead rank's descendants move to init and would be
            # lost: find them while the ranks still hold them.
            others = procs.attempt_processes(pgids, attempt.marker, skip_groups=pgids)
            procs.send_signal(pgids, others, sig)
        if not escalate or not alive:
            return
        pending = await _survivors(attempt, timeout)
        if pending:
            logger.warning(
                "job %s: local ranks %s survived signal %d for %.1fs; sending SIGKILL",
                attempt.spec.job_id,
                [r.local_rank for r in pending],
                sig,
                timeout,
                extra=attempt.log_extra(),
            )
            others = procs.attempt_processes([r.pid for r in pending], attempt.marker)
            procs.send_signal([r.pid for r in pending], others, signal.SIGKILL)
            stuck = await _survivors(attempt, SIGKILL_WAIT)
            if stuck:
                note = (
                    f"local ranks {[r.local_rank for r in stuck]} did not die within "
                    f"{SIGKILL_WAIT:g}s of SIGKILL (uninterruptible sleep?)"
                )
                logger.error("job %s: %s", attempt.spec.job_id, note, extra=attempt.log_extra())
                attempt.reason = f"{attempt.reason}; {note}" if attempt.reason else note

    def kill_now(self, attempts: Iterable[Attempt]) -> None:
        """SIGKILL every process of the running `attempts` at once (a second signal to
        the agent while its close waits for the ranks to end)."""
        for attempt in attempts:
            alive = [r for r in attempt.ranks if r.alive]
            if attempt.ended or not alive:
                continue
            for rank in alive:
                rank.terminated_by_agent = True
            pgids = [r.pid for r in alive]
            procs.send_signal(pgids, procs.attempt_processes(pgids, attempt.marker), signal.SIGKILL)

    def kill_leftovers(self, attempt: Attempt) -> None:
        """SIGKILL every process an ended attempt left running (found by its marker)."""
        leftovers = procs.attempt_processes([], attempt.marker)
        if leftovers:
            logger.info(
                "job %s: killing %d leftover processes",
                attempt.spec.job_id,
                len(leftovers),
                extra=attempt.log_extra(),
            )
            procs.send_signal((), leftovers, signal.SIGKILL)

    def close(self) -> None:
        """Stop watching exits and adopting orphans (the processes are left as they are)."""
        if self._exits is not None:
            self._exits.close()
            self._exits = None
        if self._loop is not None and self._subreaper:
            self._loop.remove_signal_handler(signal.SIGCHLD)
        self._loop = None


async def _survivors(attempt: Attempt, timeout: float) -> list[Rank]:
    """Wait up to `timeout` for every rank of a running attempt to exit (its end);
    return those still alive."""
    await attempt.wait_end(timeout)
    return [r for r in attempt.ranks if r.alive]


class _Either:
    """`pid in` either of two sets, without making their union at each look."""

    __slots__ = ("_a", "_b")

    def __init__(self, a: set[int], b: set[int]) -> None:
        self._a, self._b = a, b

    def __contains__(self, pid: object) -> bool:
        return pid in self._a or pid in self._b
