"""When to retry an upstream request, and how long to wait first. PURE: no clock, no sleep.

Only failures that happen before any output are retried (connect failures, 429, 502/503/504):
after the first chunk the upstream cannot resume and a second answer would differ, so those end
the stream instead (docs/reliability.md, "Upstream faults").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Statuses worth another try: rate limiting and the gateway/proxy family. 500 is not retried:
#: it usually means this request is bad for the upstream and would fail again.
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Jittered exponential backoff within a count and a time budget."""

    retries: int = 2
    #: Most seconds one stream may spend waiting between attempts (Retry-After included).
    budget: float = 10.0
    base: float = 0.25
    cap: float = 4.0

    def delay(
        self, attempt: int, retry_after: float | None, waited: float, rand: float
    ) -> float | None:
        """Seconds to wait before retry number `attempt` (1-based), or None to give up.

        `rand` in [0, 1) supplies the jitter ("equal jitter": half fixed, half random, so that
        many streams failing together spread out without retrying at once). A Retry-After from
        the upstream is a floor; when it does not fit in the budget we give up at once rather
        than wait for a wait we cannot finish.
        """
        if attempt > self.retries:
            return None
        ceiling = min(self.cap, self.base * 2.0 ** (attempt - 1))
        wait = ceiling / 2 + rand * ceiling / 2
        if retry_after is not None:
            wait = max(wait, retry_after)
        if waited + wait > self.budget:
            return None
        return wait
