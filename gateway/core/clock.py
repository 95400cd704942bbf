"""Time as an input: the clock port every timer of the gateway goes through.

The resume grace and retention, the auth and idle deadlines, the keepalive pings and the
upstream read-gap watchdog all ask a `Clock` what time it is and to call them back later,
never the event loop or the `time` module directly. In production that is the event loop's
clock (`gateway.io.timers.LoopClock`); in tests it is a `ManualClock`, which moves only when
the test says so: a 30-second grace expires in a test without anyone waiting 30 seconds,
and nothing time-based needs a sleep to be tested.

PURE: no asyncio, no `time`; the manual clock runs what falls due synchronously, inside
`advance()`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Clock", "ManualClock", "Timer"]


class Timer(Protocol):
    """A callback waiting for its time (asyncio's TimerHandle is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Where the gateway reads time and sets timers."""

    def now(self) -> float:
        """Monotonic seconds: for durations, deadlines and timers."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch: for token expiry, which is a date."""
        ...

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Call `callback(*args)` once, `delay` seconds from now (0 or less: soon)."""
        ...


class _ManualTimer:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback, self.args = _nothing, ()  # let go of what it would have called


def _nothing(*_args: object) -> None:
    return None


class ManualClock:
    """A clock that stands still until `advance()` moves it.

    Timers fire in the order of their due time (then the order they were set), each with the
    clock reading its due time, so a callback that sets another timer sees the time it would
    have seen in production. The wall clock moves with the monotonic one.
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        timer = _ManualTimer(self._now + max(0.0, delay), callback, args)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    @property
    def pending(self) -> int:
        """Timers set and neither fired nor cancelled."""
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    def next_due(self) -> float | None:
        """When the next live timer fires, or None when none is set."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def advance(self, seconds: float) -> int:
        """Move the clock `seconds` forward, firing every timer that falls due on the way
        (including timers those callbacks set, when they fall due too). Returns how many
        fired."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        end = self._now + seconds
        fired = 0
        while True:
            due = self.next_due()
            if due is None or due > end:
                break
            _, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, due)
            timer.cancelled = True  # fired: cancel() from now on is a no-op
            callback, args = timer.callback, timer.args
            timer.callback, timer.args = _nothing, ()
            callback(*args)
            fired += 1
        self._now = end
        return fired
