"""Clock-offset estimation from RPC round trips, as NTP does.

An answer that carries the agent's wall clock (``PollResponse.agent_time``,
``InfoResponse.agent_time``) was stamped somewhere between the client's send and
receive. Assuming the middle: ``offset = agent_time - (t_send + t_recv) / 2``,
with an error of at most ``rtt / 2``. The sample with the smallest round trip is
the tightest, so the estimator keeps that one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["ClockEstimator", "ClockSample", "RoundTrip"]


@dataclass(frozen=True)
class ClockSample:
    """``agent clock - client clock`` (seconds) and its uncertainty (``rtt / 2``)."""

    offset: float
    rtt: float

    @property
    def uncertainty(self) -> float:
        return self.rtt / 2

    def to_client_time(self, agent_timestamp: float) -> float:
        """An agent timestamp expressed on the client's clock."""
        return agent_timestamp - self.offset


class RoundTrip:
    """Times one RPC: wall clock at send, monotonic duration for the RTT."""

    __slots__ = ("_mono", "_wall")

    def __init__(self) -> None:
        self._wall = time.time()
        self._mono = time.monotonic()

    def sample(self, agent_time: float) -> ClockSample:
        rtt = max(time.monotonic() - self._mono, 0.0)
        midpoint = self._wall + rtt / 2
        return ClockSample(offset=agent_time - midpoint, rtt=rtt)


class ClockEstimator:
    """Keeps the best (smallest-RTT) clock sample of one agent. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._best: ClockSample | None = None
        self._count = 0

    def add(self, sample: ClockSample) -> None:
        with self._lock:
            self._count += 1
            if self._best is None or sample.rtt < self._best.rtt:
                self._best = sample

    @property
    def best(self) -> ClockSample | None:
        """The tightest sample so far, None before the first answer."""
        return self._best

    @property
    def samples(self) -> int:
        return self._count
