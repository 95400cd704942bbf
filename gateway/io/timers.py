"""The production clock: the event loop's timers, `time.monotonic()` and `time.time()`.

See `gateway.core.clock` for the port and why every timer of the gateway goes through it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from gateway.core.clock import Timer

__all__ = ["LoopClock"]


class LoopClock:
    """Timers on the running event loop. `now` is `time.monotonic` itself (the upstream read
    path reads it per chunk, and uvloop's own loop time is cached at a millisecond's
    resolution); loop timers are relative, so the two agree on delays."""

    __slots__ = ("_loop", "now", "wall")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.now: Callable[[], float] = time.monotonic
        self.wall: Callable[[], float] = time.time
        self._loop = loop

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.call_later(delay, callback, *args)
