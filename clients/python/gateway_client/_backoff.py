"""Reconnect pacing: exponential backoff with full jitter (pure, no clock)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before each reconnect attempt.

    Attempt n (0 for the first try after the socket dropped) waits a uniformly random time in
    ``[0, min(cap, base * factor**n)]`` ("full jitter"), so thousands of clients dropped by one
    gateway deploy do not come back in lockstep. After `max_attempts` consecutive failed
    connects the client gives up: streams waiting to be resumed fail with `ConnectionLost`, and
    the next `start()` tries again from attempt 0. None retries forever.
    """

    base: float = 0.25
    factor: float = 2.0
    cap: float = 10.0
    max_attempts: int | None = 8

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.factor < 1:
            raise ValueError("Backoff needs base >= 0, cap >= 0 and factor >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("Backoff.max_attempts must be at least 1 (or None)")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt `attempt` (0-based)."""
        exponent = min(max(attempt, 0), 64)  # beyond 2**64 every sane cap has won
        return float(min(self.cap, self.base * self.factor**exponent))

    def delay(self, attempt: int, rand: float) -> float:
        """The wait before attempt `attempt`, given `rand` drawn uniformly from [0, 1)."""
        return self.ceiling(attempt) * rand

    def gives_up(self, failures: int) -> bool:
        """Whether `failures` consecutive failed connects exhaust the attempts."""
        return self.max_attempts is not None and failures >= self.max_attempts
