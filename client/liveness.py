"""Is a node still there? What the client heard from each agent, and when a node is lost.

Every answer from an agent (a unary reply, a Watch message or heartbeat, a batch of log
lines) marks it *heard*; every failed call with UNAVAILABLE (connection refused, reset,
or closed by the channel's keepalive because the agent stopped answering pings) marks
it *down* until the next answer. A node is **lost** when, counted from when the caller
began relying on it:

- nothing arrived from it for ``node_timeout`` seconds ("no answer for 10 s"), or
- it has been down for :data:`REFUSED_GRACE` seconds in a row ("connection refused"):
  a refused connection is retried that long, never longer, as it is not a blip.

The channel's keepalive (:func:`keepalive_options`) pings every ``node_timeout / 2``
seconds and gives up after as long again, so a silent connection also ends in a
failed call, whichever of the two tells first.
"""

from __future__ import annotations

import math
import time

__all__ = [
    "DEFAULT_NODE_TIMEOUT",
    "REFUSED_GRACE",
    "Liveness",
    "check_node_timeout",
    "keepalive_options",
]

#: Seconds without any answer after which a node is lost (``rankd launch --node-timeout``).
DEFAULT_NODE_TIMEOUT = 10.0
#: Seconds a refused or reset connection is retried before the node is lost.
REFUSED_GRACE = 1.5
# gRPC agents accept pings at most once a second (see rankd.agent.server).
_MIN_PING = 1.0


def check_node_timeout(seconds: float) -> float:
    """``seconds`` when it is a usable node timeout (> 0, finite); else ValueError."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"node_timeout must be a positive number of seconds, not {seconds}")
    return float(seconds)


def keepalive_options(node_timeout: float) -> list[tuple[str, int]]:
    """Channel options that close a connection whose agent stopped answering HTTP/2
    pings within about ``node_timeout`` seconds (at least 2 s: one ping a second)."""
    half = max(_MIN_PING, node_timeout / 2)
    return [
        ("grpc.keepalive_time_ms", int(half * 1000)),
        ("grpc.keepalive_timeout_ms", int(half * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _cause(details: str) -> str:
    """A broken connection in a few words."""
    text = details.lower()
    if "keepalive" in text or "ping" in text:
        return "no answer to keepalive pings"
    if "refused" in text:
        return "connection refused"
    if "reset" in text or "closed" in text or "goaway" in text or "eof" in text:
        return "connection reset"
    return "unreachable"


class Liveness:
    """What one client heard from its agent. Written from one event loop or, for the
    blocking client, from the calling threads (single attribute stores)."""

    def __init__(self) -> None:
        self.last_heard = time.monotonic()
        self.last_heard_wall = time.time()
        self.down_since: float | None = None
        self.down_since_wall = 0.0
        self.down_details = ""

    def heard(self) -> None:
        """An answer arrived: the node is up."""
        self.last_heard = time.monotonic()
        self.last_heard_wall = time.time()
        self.down_since = None

    def broke(self, code: str, details: str) -> None:
        """A call failed with status ``code``; UNAVAILABLE marks the node down."""
        if code != "UNAVAILABLE":
            return  # a deadline is silence, measured by last_heard; others are answers
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.down_since_wall = time.time()
        self.down_details = details

    def verdict(
        self,
        node_timeout: float,
        *,
        since: float = 0.0,
        grace: float = REFUSED_GRACE,
        quiet_from: float = 0.0,
    ) -> tuple[str, float] | None:
        """``(why, when)`` if the node is lost, counting from monotonic time ``since``
        (when the caller began relying on it); ``when`` is the wall-clock time it went
        silent or down. None while it is alive. ``quiet_from``: silence counts from
        then at the earliest (the caller could not read what came before: its own
        stall); a refused or reset connection is evidence all the same."""
        now = time.monotonic()
        if self.down_since is not None and now - max(self.down_since, since) >= grace:
            why = f"{_cause(self.down_details)} (retried for {grace:g} s: {self.down_details})"
            return why, self.down_since_wall
        if now - max(self.last_heard, since, quiet_from) >= node_timeout:
            when = self.last_heard_wall if self.last_heard >= since else time.time() - node_timeout
            return f"no answer for {node_timeout:g} s", when
        return None
