"""Many deadlines that all lie the same delay after they were set, on one timer.

The sockets' idle (--idle-timeout) and authentication (--auth-timeout) deadlines: thousands
of sockets, one delay each. A dict keeps insertion order, so it is also in deadline order:
setting one is a pop and an insert, and only the earliest is armed on the clock, instead of
a timer per socket.

PURE: time comes from the `Clock` it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from gateway.core.clock import Clock, Timer

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """`start(key)` calls `on_due(key)` `delay` seconds later, unless `cancel(key)` comes
    first. Keys that fall due together are called in the order they were started, after
    they have all been removed (so `on_due` may start or cancel any key)."""

    __slots__ = ("_clock", "_deadlines", "_on_due", "_timer", "delay")

    def __init__(self, clock: Clock, delay: float, on_due: Callable[[K], object]) -> None:
        self.delay = delay
        self._clock = clock
        self._on_due = on_due
        self._deadlines: dict[K, float] = {}
        self._timer: Timer | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, key: object) -> bool:
        return key in self._deadlines

    def start(self, key: K, *, restart: bool = True) -> None:
        """Call `key` due `delay` from now (from its first start if not `restart`)."""
        deadlines = self._deadlines
        if key in deadlines:
            if not restart:
                return
            del deadlines[key]
        deadlines[key] = self._clock.now() + self.delay
        if self._timer is None:
            self._arm()

    def cancel(self, key: K) -> None:
        self._deadlines.pop(key, None)

    def stop(self) -> None:
        """Forget every deadline and the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()

    def _arm(self) -> None:
        for when in self._deadlines.values():
            self._timer = self._clock.call_later(when - self._clock.now(), self._fire)
            return
        self._timer = None

    def _fire(self) -> None:
        now = self._clock.now()
        deadlines = self._deadlines
        due = []
        for key, when in deadlines.items():
            if when > now:
                break
            due.append(key)
        for key in due:
            del deadlines[key]
        self._arm()
        on_due = self._on_due
        for key in due:
            on_due(key)
