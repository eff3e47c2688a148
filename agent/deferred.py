"""Chores put off for a moment, so that they do not compete with the answer in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Deferred"]


class Deferred:
    """Callbacks put off by `delay` seconds, at most one per key: putting another under
    a key runs the waiting one first, and `flush` runs one key's, or all, at once. Used
    from one event loop."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._waiting: dict[str, tuple[asyncio.TimerHandle, Callable[[], None]]] = {}

    def put(self, key: str, callback: Callable[[], None]) -> None:
        self.flush(key)
        handle = asyncio.get_running_loop().call_later(self._delay, self._run, key)
        self._waiting[key] = (handle, callback)

    def flush(self, key: str | None = None) -> None:
        for each in [key] if key is not None else list(self._waiting):
            self._run(each)

    def _run(self, key: str) -> None:
        handle, callback = self._waiting.pop(key, (None, None))
        if handle is not None and callback is not None:
            handle.cancel()
            callback()
