"""Deadline waits: check a condition until it holds, fail with what was awaited after
``timeout`` seconds. Tests wait with these, never with a bare sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["wait_until", "wait_until_async"]

_PERIOD = 0.01


def _expired(deadline: float, timeout: float, what: str, predicate: object) -> None:
    if time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Check ``predicate`` every 10 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        _expired(deadline, timeout, what, predicate)
        time.sleep(_PERIOD)


async def wait_until_async(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = ""
) -> None:
    """`wait_until` for a test on the event loop: the loop runs while it waits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        _expired(deadline, timeout, what, predicate)
        await asyncio.sleep(_PERIOD)
