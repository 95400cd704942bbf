"""Per-principal quotas: open sockets, concurrent streams and stream starts per minute.

PURE: the caller passes `now` (seconds, any monotonic clock). State is kept only for principals
that hold something (a socket, a stream, or a bucket that is not yet full again), so memory is
bounded by activity, not by how many principals ever connected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

UNLIMITED: Final = 0


@dataclass(slots=True)
class _Usage:
    sockets: int = 0
    streams: int = 0
    tokens: float = 0.0
    stamp: float = 0.0
    bucket_started: bool = field(default=False)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a quota said no, and when trying again could work (ms), if known."""

    message: str
    retry_after_ms: int | None = None


class Quotas:
    """Quota bookkeeping for every principal of one process (0 means unlimited)."""

    def __init__(
        self,
        sockets_per_principal: int = UNLIMITED,
        streams_per_principal: int = UNLIMITED,
        starts_per_minute: int = UNLIMITED,
    ) -> None:
        self.sockets_per_principal = sockets_per_principal
        self.streams_per_principal = streams_per_principal
        self.starts_per_minute = starts_per_minute
        self._usage: dict[str, _Usage] = {}

    def __len__(self) -> int:
        """Principals with state held (for tests and memory checks)."""
        return len(self._usage)

    def _get(self, principal: str) -> _Usage:
        usage = self._usage.get(principal)
        if usage is None:
            usage = self._usage[principal] = _Usage()
        return usage

    def _forget_if_idle(self, principal: str, now: float) -> None:
        usage = self._usage.get(principal)
        if usage is None or usage.sockets or usage.streams:
            return
        if self.starts_per_minute and self._refill(usage, now) < self.starts_per_minute:
            return  # the bucket still remembers recent starts
        del self._usage[principal]

    # -- sockets

    def open_socket(self, principal: str) -> Refusal | None:
        """Count a new socket of `principal`, or refuse it (close code 4429)."""
        usage = self._get(principal)
        if self.sockets_per_principal and usage.sockets >= self.sockets_per_principal:
            return Refusal(f"at most {self.sockets_per_principal} open sockets per principal")
        usage.sockets += 1
        return None

    def close_socket(self, principal: str, now: float) -> None:
        usage = self._usage.get(principal)
        if usage is not None and usage.sockets:
            usage.sockets -= 1
        self._forget_if_idle(principal, now)

    # -- streams

    def _refill(self, usage: _Usage, now: float) -> float:
        rate = self.starts_per_minute
        if not usage.bucket_started:
            usage.tokens, usage.stamp, usage.bucket_started = float(rate), now, True
        elif now > usage.stamp:
            usage.tokens = min(float(rate), usage.tokens + (now - usage.stamp) * rate / 60.0)
            usage.stamp = now
        return usage.tokens

    def start_stream(self, principal: str, now: float) -> Refusal | None:
        """Admit one more stream of `principal` now, or say why not.

        Concurrent streams are checked first (a refusal there costs no rate token); the rate is
        a token bucket holding one minute's worth of starts, so bursts up to the per-minute
        figure are fine and sustained load is held to it.
        """
        usage = self._get(principal)
        if self.streams_per_principal and usage.streams >= self.streams_per_principal:
            return Refusal(f"at most {self.streams_per_principal} concurrent streams per principal")
        if self.starts_per_minute:
            tokens = self._refill(usage, now)
            if tokens < 1.0:
                wait_ms = int((1.0 - tokens) * 60_000 / self.starts_per_minute) + 1
                return Refusal(
                    f"at most {self.starts_per_minute} stream starts per minute", wait_ms
                )
            usage.tokens = tokens - 1.0
        usage.streams += 1
        return None

    def end_stream(self, principal: str, now: float) -> None:
        usage = self._usage.get(principal)
        if usage is not None and usage.streams:
            usage.streams -= 1
        self._forget_if_idle(principal, now)
