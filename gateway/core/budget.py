"""Budgets per principal over a window: what each has spent, and whether it may start another
stream.

PURE: the caller passes the wall clock (`wall`, Unix seconds). Windows are fixed and aligned to
the Unix epoch (a `1d` window is a UTC day), so every instance agrees on which window a charge
belongs to without talking to the others (docs/security.md, "Budgets").
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from gateway.core.quotas import Refusal
from gateway.core.usage import NANOS, Usage

#: `--budget-window` values: a whole number and a unit.
_WINDOW_RE: Final = re.compile(r"([1-9][0-9]{0,8})([smhd])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Budget:
    """What a principal may spend in one window; None is no limit on that measure."""

    tokens: int | None = None
    cost: float | None = None

    def over(self, default: Budget) -> Budget:
        """This override on top of the gateway's `default`: a measure it does not set is the
        default's."""
        return Budget(
            self.tokens if self.tokens is not None else default.tokens,
            self.cost if self.cost is not None else default.cost,
        )

    @property
    def limited(self) -> bool:
        return self.tokens is not None or self.cost is not None


#: No budget at all.
UNLIMITED: Final = Budget()


def parse_window(text: str) -> int:
    """`1d`, `12h`, `30m`, `45s` -> seconds; ValueError for anything else."""
    match = _WINDOW_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a window: a whole number and s, m, h or d (e.g. 1d)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def window_start(wall: float, seconds: int) -> int:
    """The start (Unix seconds) of the window `wall` falls in."""
    return int(wall // seconds) * seconds


def format_window(seconds: int) -> str:
    """A window's length in its largest whole unit: 86400 -> `1d`, 43200 -> `12h`, 1800 ->
    `30m`, 90 -> `90s`."""
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def iso(epoch: float) -> str:
    """`epoch` (Unix seconds) as a UTC timestamp: `YYYY-MM-DDTHH:MM:SSZ`."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _usd(nanos: int, decimals: int) -> str:
    """`nanos` nano-USD as dollars with `decimals` (at most 9) decimals, rounded half up."""
    step = 10 ** (9 - decimals)
    units = (nanos + step // 2) // step
    whole, frac = divmod(units, 10**decimals)
    return f"${whole}.{frac:0{decimals}d}" if decimals else f"${whole}"


def _decimals(nanos: int) -> int:
    """Decimals that show `nanos` exactly: 4 at least (`$0.0100`), 9 at most."""
    decimals = 4
    while decimals < 9 and nanos % 10 ** (9 - decimals):
        decimals += 1
    return decimals


@dataclass(slots=True)
class Totals:
    """What was spent: token counts and the cost in nano-USD (integers: sums are exact).

    A total is a count: `sub` never takes a field below zero.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_nanos: int = 0

    @classmethod
    def of(cls, usage: Usage) -> Totals:
        """What one stream's `usage` adds to a principal's spend."""
        return cls(
            usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cost_nanos
        )

    def add(self, other: Totals) -> None:
        """Add `other` to this, in place."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.cost_nanos += other.cost_nanos

    def sub(self, other: Totals) -> None:
        """Take `other` from this, in place, each field no lower than zero."""
        self.prompt_tokens = max(0, self.prompt_tokens - other.prompt_tokens)
        self.completion_tokens = max(0, self.completion_tokens - other.completion_tokens)
        self.total_tokens = max(0, self.total_tokens - other.total_tokens)
        self.cost_nanos = max(0, self.cost_nanos - other.cost_nanos)

    def max_with(self, other: Totals) -> None:
        """Each field the larger of this one's and `other`'s, in place."""
        self.prompt_tokens = max(self.prompt_tokens, other.prompt_tokens)
        self.completion_tokens = max(self.completion_tokens, other.completion_tokens)
        self.total_tokens = max(self.total_tokens, other.total_tokens)
        self.cost_nanos = max(self.cost_nanos, other.cost_nanos)

    def copy(self) -> Totals:
        return Totals(
            self.prompt_tokens, self.completion_tokens, self.total_tokens, self.cost_nanos
        )

    def is_zero(self) -> bool:
        return not (
            self.prompt_tokens or self.completion_tokens or self.total_tokens or self.cost_nanos
        )

    @property
    def cost(self) -> float:
        """The cost in USD."""
        return self.cost_nanos / NANOS


@dataclass(slots=True)
class _Entry:
    """One principal's spend in window `start` (Ledger docstring)."""

    start: int
    shared: Totals = field(default_factory=Totals)
    unflushed: Totals = field(default_factory=Totals)
    inflight: Totals = field(default_factory=Totals)
    loaded: bool = False

    def spent(self) -> Totals:
        out = self.shared.copy()
        out.add(self.unflushed)
        out.add(self.inflight)
        return out

    @property
    def pending(self) -> bool:
        """Whether it holds charges Redis has not acknowledged (not to be evicted lightly)."""
        return not (self.unflushed.is_zero() and self.inflight.is_zero())


class Ledger:
    """Every principal's spend in the current window, as this process knows it.

    With Redis, the shared total lives there, and an I/O layer moves charges to and from it
    (the ledger itself never does I/O). Per principal the ledger keeps:

    - `shared`: the last total Redis reported for the window (it may include our own flushed
      charges);
    - `unflushed`: our charges not yet sent (`take_unflushed` moves them to `inflight`);
    - `inflight`: charges sent, not yet acknowledged (`flushed` drops them, as `shared` now
      holds them; `unsent` puts them back in `unflushed`).

    What a principal has spent is `shared + unflushed + inflight`. Totals from Redis are merged
    with a field-wise max, so duplicated or out-of-order reports never double count; a report
    that already includes a charge still in flight over-counts it until the ack, never under.
    Without Redis only `unflushed` ever grows and nothing takes it: per-process accounting.

    Entries belong to one window (`window_start(wall, window)`). The first call with a wall in
    a later window than any seen drops every entry at once, unflushed charges included (that
    window is over); a wall in an earlier window than the latest seen (a clock stepped back)
    counts in the latest one, so going back in time never reopens or resets a window.

    Memory is bounded: at most `max_principals` entries. A new entry evicts the least recently
    used one with nothing unflushed or in flight; when every entry has something pending, the
    least recently used one goes anyway (per-process mode then forgets the least recent
    principal's spend; with Redis its unacknowledged charges are lost). Entries are held in two
    LRU-ordered dicts, idle and pending, so that choice is O(1); every call is O(1) except
    `take_unflushed`, a window rollover and `unload_all`.
    """

    __slots__ = ("_current", "_idle", "_pending", "max_principals", "window")

    def __init__(self, window: int, max_principals: int = 100_000) -> None:
        if window <= 0:
            raise ValueError("the budget window must be at least a second")
        if max_principals < 1:
            raise ValueError("max_principals must be at least 1")
        self.window = window
        self.max_principals = max_principals
        #: The start of the latest window seen (None before the first call).
        self._current: int | None = None
        #: Entries with nothing unflushed or in flight, least recently used first.
        self._idle: OrderedDict[str, _Entry] = OrderedDict()
        #: Entries with charges Redis has not acknowledged, least recently used first.
        self._pending: OrderedDict[str, _Entry] = OrderedDict()

    def unacknowledged(self) -> int:
        """Principals with charges Redis has not acknowledged yet (unsent or in flight)."""
        return len(self._pending)

    def __len__(self) -> int:
        """Entries held."""
        return len(self._idle) + len(self._pending)

    # -- windows

    def _start(self, wall: float) -> int:
        """The start of the window a call at `wall` counts in (never before the latest seen)."""
        start = window_start(wall, self.window)
        return start if self._current is None or start > self._current else self._current

    def _roll(self, wall: float) -> int:
        """The current window's start, after dropping every entry if `wall` opened a new one."""
        start = self._start(wall)
        if start != self._current:
            self._idle.clear()
            self._pending.clear()
            self._current = start
        return start

    def resets_at(self, wall: float) -> float:
        """When the window a call at `wall` counts in ends (Unix seconds)."""
        return float(self._start(wall) + self.window)

    # -- entries

    def _find(self, principal: str, start: int, touch: bool) -> _Entry | None:
        """`principal`'s entry for window `start` (one from an older window is reset), moved to
        the most recently used end if `touch`."""
        table = self._pending
        entry = table.get(principal)
        if entry is None:
            table = self._idle
            entry = table.get(principal)
            if entry is None:
                return None
        if entry.start != start:  # a safeguard: a rollover drops every entry at once
            entry = _Entry(start)
            del table[principal]
            self._idle[principal] = entry
        elif touch:
            table.move_to_end(principal)
        return entry

    def _get(self, principal: str, start: int) -> _Entry:
        """`principal`'s entry for window `start`, created (evicting one if full) if missing."""
        entry = self._find(principal, start, touch=True)
        if entry is None:
            if len(self) >= self.max_principals:
                (self._idle or self._pending).popitem(last=False)
            entry = self._idle[principal] = _Entry(start)
        return entry

    def _place(self, principal: str, entry: _Entry) -> None:
        """Move `entry` between the idle and pending tables if its state changed."""
        if entry.pending:
            if principal in self._idle:
                del self._idle[principal]
                self._pending[principal] = entry
        elif principal in self._pending:
            del self._pending[principal]
            self._idle[principal] = entry

    # -- what principals spend

    def spent(self, principal: str, wall: float) -> Totals:
        """What `principal` has spent in the current window (a copy; zero if unknown)."""
        entry = self._find(principal, self._roll(wall), touch=True)
        return entry.spent() if entry is not None else Totals()

    def charge(self, principal: str, usage: Usage, wall: float) -> None:
        """Count one stream's `usage` against `principal` (unflushed until taken)."""
        entry = self._get(principal, self._roll(wall))
        entry.unflushed.add(Totals.of(usage))
        self._place(principal, entry)

    def check(self, principal: str, budget: Budget, wall: float) -> Refusal | None:
        """None when `budget` has no limit or `principal` is under every limit it sets; else
        why not, and when the window resets."""
        if not budget.limited:
            return None
        spent = self.spent(principal, wall)
        if budget.tokens is not None and spent.total_tokens >= budget.tokens:
            what = f"token budget used up: {spent.total_tokens} of {budget.tokens} tokens"
        elif budget.cost is not None and spent.cost_nanos >= (limit := round(budget.cost * NANOS)):
            decimals = _decimals(limit)
            what = (
                f"cost budget used up: {_usd(spent.cost_nanos, decimals)} of "
                f"{_usd(limit, decimals)}"
            )
        else:
            return None
        end = self.resets_at(wall)
        return Refusal(
            f"{what} in this {format_window(self.window)} window; it resets at {iso(end)}",
            max(1, math.ceil((end - wall) * 1000)),
        )

    # -- what the I/O layer does with Redis

    def take_unflushed(self, wall: float) -> list[tuple[str, int, Totals]]:
        """Every principal's unflushed charges for the current window, as `(principal,
        window_start, totals)`, moved to in flight (entries with none are skipped)."""
        start = self._roll(wall)
        out: list[tuple[str, int, Totals]] = []
        for principal, entry in self._pending.items():
            if entry.start != start or entry.unflushed.is_zero():
                continue
            sent, entry.unflushed = entry.unflushed, Totals()
            entry.inflight.add(sent)
            out.append((principal, start, sent))
        return out

    def flushed(self, principal: str, window_start: int, sent: Totals, total: Totals) -> None:
        """Redis acknowledged `sent` and reported the window's new `total`, which includes it
        (ignored if the entry is gone or belongs to another window)."""
        if window_start != self._current:
            return
        entry = self._find(principal, window_start, touch=False)
        if entry is None:
            return
        entry.inflight.sub(sent)
        entry.shared.max_with(total)
        self._place(principal, entry)

    def unsent(self, principal: str, window_start: int, sent: Totals) -> None:
        """Sending `sent` failed: it goes back to unflushed (still counted, retried at the next
        flush). Ignored for another window; an entry evicted meanwhile is made again."""
        if window_start != self._current:
            return
        entry = self._get(principal, window_start)
        entry.inflight.sub(sent)
        entry.unflushed.add(sent)
        self._place(principal, entry)

    def absorb(self, principal: str, window_start: int, total: Totals, wall: float) -> None:
        """Another instance (pub/sub) or a read reported the window's `total` for `principal`.

        Only the current window's totals count. A missing entry is made, unless that would
        evict one with charges pending (a total is only a cache: a later read brings it back).
        It does not mark the entry loaded: the caller does that after a read (`mark_loaded`).
        """
        start = self._roll(wall)
        if window_start != start:
            return
        entry = self._find(principal, start, touch=False)
        if entry is None:
            if len(self) >= self.max_principals and not self._idle:
                return
            entry = self._get(principal, start)
        entry.shared.max_with(total)

    def loaded(self, principal: str, wall: float) -> bool:
        """Whether this process has read `principal`'s shared total for the current window."""
        entry = self._find(principal, self._roll(wall), touch=True)
        return entry is not None and entry.loaded

    def mark_loaded(self, principal: str, wall: float) -> None:
        """This process has read `principal`'s shared total for the current window."""
        self._get(principal, self._roll(wall)).loaded = True

    def unload_all(self) -> None:
        """Every entry must be read again (after a pub/sub reconnect: reports may be lost)."""
        for table in (self._idle, self._pending):
            for entry in table.values():
                entry.loaded = False
