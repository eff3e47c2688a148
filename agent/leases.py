"""Job leases: an attempt whose spec has a lease is stopped when no client renewed it for
that long, so that a launcher that died or was cut off takes its job down (as srun's
steps do)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rankd.agent.model import Attempt

__all__ = ["Leases"]


class Leases:
    """Lease timers on the loop's monotonic clock, which also counts the time this
    process spent stopped (SIGSTOP, a suspended host): a node resumed after a partition
    finds its lease lapsed at its loop's first turn, before it reads renewals that were
    sent while it was stopped and queued on its sockets. `on_lapse(attempt, reason)`
    stops a lapsed attempt."""

    def __init__(self, on_lapse: Callable[[Attempt, str], None]) -> None:
        self._on_lapse = on_lapse

    def hold(self, attempt: Attempt, loop: asyncio.AbstractEventLoop) -> None:
        """A leased attempt counts its lease from its Start."""
        if attempt.spec.lease <= 0:
            return
        attempt.renewed = loop.time()
        attempt.lease_timer = loop.call_later(attempt.spec.lease, self._check, attempt, loop)

    @staticmethod
    def renew(attempt: Attempt, loop: asyncio.AbstractEventLoop | None) -> float:
        """A client renewed the lease: seconds until it lapses now (0: no lease, or the
        attempt has ended)."""
        if attempt.spec.lease <= 0 or attempt.ended or loop is None:
            return 0.0
        attempt.renewed = loop.time()
        return attempt.spec.lease

    def _check(self, attempt: Attempt, loop: asyncio.AbstractEventLoop) -> None:
        """Re-armed while renewals come, else the attempt is stopped."""
        attempt.lease_timer = None
        if attempt.ended:
            return
        left = attempt.renewed + attempt.spec.lease - loop.time()
        if left > 0:
            attempt.lease_timer = loop.call_later(left, self._check, attempt, loop)
            return
        self._on_lapse(attempt, f"lease expired: no client for {attempt.spec.lease:g} s")
