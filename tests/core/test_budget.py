"""Budgets per principal over a window: windows, the ledger of spend and its Redis flush cycle
(gateway/core/budget.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.core.budget import (
    UNLIMITED,
    Budget,
    Ledger,
    Totals,
    format_window,
    iso,
    parse_window,
    window_start,
)
from gateway.core.quotas import Refusal
from gateway.core.usage import NANOS, Usage

DAY = 86_400
#: 2026-12-07T15:00:00Z: nine hours before its UTC day (a `1d` window) ends.
WALL = datetime(2026, 12, 7, 15, tzinfo=UTC).timestamp()
NINE_HOURS_MS = 9 * 3600 * 1000


def totals(tokens: int, cost_nanos: int = 0) -> Totals:
    """Totals of `tokens` prompt tokens costing `cost_nanos`."""
    return Totals(tokens, 0, tokens, cost_nanos)


# -- windows


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1d", DAY), ("12h", 43_200), ("30m", 1_800), ("45s", 45), (" 1d ", DAY), ("7d", 7 * DAY)],
)
def test_a_window_is_a_whole_number_and_a_unit(text: str, seconds: int) -> None:
    """`--budget-window` values in s, m, h or d parse to seconds, surrounding blanks ignored."""
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["0s", "1.5h", "-1d", "1w", "", "d", "1", "1 d", "01d", "1D"])
def test_anything_else_is_not_a_window(text: str) -> None:
    """Zero, fractions, signs, other units and empty text are refused with a ValueError."""
    with pytest.raises(ValueError, match="is not a window"):
        parse_window(text)


def test_windows_are_aligned_to_the_epoch() -> None:
    """A `1d` window is a UTC day: it starts at midnight, and midnight starts the next one."""
    midnight = int(datetime(2026, 12, 7, tzinfo=UTC).timestamp())
    assert window_start(WALL, DAY) == midnight
    assert window_start(midnight, DAY) == midnight
    assert window_start(midnight - 0.001, DAY) == midnight - DAY
    assert window_start(midnight + DAY, DAY) == midnight + DAY


@given(st.floats(min_value=0, max_value=4e9), st.integers(min_value=1, max_value=30 * DAY))
def test_every_wall_falls_in_exactly_one_aligned_window(wall: float, seconds: int) -> None:
    """The window a wall falls in starts on a multiple of its length and holds the wall."""
    start = window_start(wall, seconds)
    assert start % seconds == 0
    assert start <= wall < start + seconds


@pytest.mark.parametrize(
    ("seconds", "label"),
    [(DAY, "1d"), (2 * DAY, "2d"), (43_200, "12h"), (3_600, "1h"), (1_800, "30m"), (90, "90s")],
)
def test_a_window_is_labelled_in_its_largest_whole_unit(seconds: int, label: str) -> None:
    """Messages name a window the way `--budget-window` would spell it."""
    assert format_window(seconds) == label


def test_times_are_shown_as_utc_iso_timestamps() -> None:
    """Reset times read as `YYYY-MM-DDTHH:MM:SSZ` in UTC, whole seconds."""
    assert iso(WALL + 0.75) == "2026-12-07T15:00:00Z"
    assert iso(0) == "1970-01-01T00:00:00Z"


def test_a_budget_override_falls_back_to_the_default_per_measure() -> None:
    """An override keeps the measures it sets and takes the default's for the others."""
    default = Budget(tokens=1_000, cost=1.0)
    assert Budget(tokens=5).over(default) == Budget(5, 1.0)
    assert Budget(cost=0.5).over(default) == Budget(1_000, 0.5)
    assert Budget().over(default) == default
    assert Budget(tokens=0).over(default) == Budget(0, 1.0)
    assert Budget(tokens=5).over(UNLIMITED) == Budget(5, None)
    assert not UNLIMITED.limited
    assert Budget(cost=0.0).limited


# -- totals


def test_totals_add_take_and_merge_field_by_field() -> None:
    """Totals add, subtract (never below zero) and take a field-wise max, all in place."""
    usage = Usage(10, 5, cost=0.25)
    one = Totals.of(usage)
    assert one == Totals(10, 5, 15, NANOS // 4)
    assert one.cost == 0.25
    two = one.copy()
    two.add(Totals(1, 2, 3, 4))
    assert two == Totals(11, 7, 18, NANOS // 4 + 4)
    assert one == Totals(10, 5, 15, NANOS // 4)  # a copy is independent
    two.sub(Totals(20, 1, 1, 4))
    assert two == Totals(0, 6, 17, NANOS // 4)
    two.max_with(Totals(3, 1, 20, 0))
    assert two == Totals(3, 6, 20, NANOS // 4)
    assert Totals().is_zero()
    assert not Totals(cost_nanos=1).is_zero()
    assert Totals.of(Usage()) == Totals()


# -- checks


def test_no_limit_never_refuses() -> None:
    """An unlimited budget admits a principal whatever it has spent."""
    ledger = Ledger(DAY)
    ledger.charge("p", Usage(10**9, 10**9, cost=1e6), WALL)
    assert ledger.check("p", UNLIMITED, WALL) is None


@pytest.mark.parametrize(("spent", "refused"), [(999, False), (1_000, True), (1_200, True)])
def test_the_token_budget_refuses_at_and_over_its_limit(spent: int, refused: bool) -> None:
    """A principal with as many tokens as its budget, or more, is refused until the window
    resets, and told when that is."""
    ledger = Ledger(DAY)
    ledger.charge("p", Usage(spent - 200, 200), WALL)
    result = ledger.check("p", Budget(tokens=1_000), WALL)
    if not refused:
        assert result is None
        return
    assert result == Refusal(
        f"token budget used up: {spent} of 1000 tokens in this 1d window; "
        "it resets at 2026-12-08T00:00:00Z",
        NINE_HOURS_MS,
    )


@pytest.mark.parametrize(
    ("cost", "shown"), [(0.0099, None), (0.01, "$0.0100"), (0.0123, "$0.0123")]
)
def test_the_cost_budget_refuses_at_and_over_its_limit(cost: float, shown: str | None) -> None:
    """A principal that has spent its budget's cost, or more, is refused until the window
    resets; amounts are shown in dollars."""
    ledger = Ledger(DAY)
    ledger.charge("p", Usage(1, 1, cost=cost), WALL)
    result = ledger.check("p", Budget(tokens=1_000, cost=0.01), WALL)
    if shown is None:
        assert result is None
        return
    assert result == Refusal(
        f"cost budget used up: {shown} of $0.0100 in this 1d window; "
        "it resets at 2026-12-08T00:00:00Z",
        NINE_HOURS_MS,
    )


def test_a_tiny_cost_budget_is_shown_to_the_nano_dollar() -> None:
    """A cost limit below a hundredth of a cent is not shown as zero."""
    ledger = Ledger(3_600)
    ledger.charge("p", Usage(1, 1, cost=0.0000125), WALL)
    result = ledger.check("p", Budget(cost=0.0000125), WALL)
    assert result is not None
    assert result.message.startswith("cost budget used up: $0.0000125 of $0.0000125 in this 1h")


def test_a_zero_budget_refuses_before_anything_is_spent() -> None:
    """A budget of zero tokens refuses a principal that has spent nothing yet."""
    ledger = Ledger(DAY)
    assert ledger.check("new", Budget(tokens=0), WALL) is not None
    assert ledger.check("new", Budget(cost=0.0), WALL) is not None
    assert ledger.check("new", Budget(tokens=1, cost=0.01), WALL) is None


def test_retry_after_is_rounded_up_and_at_least_a_millisecond() -> None:
    """Retrying after `retry_after_ms` always lands in the next window."""
    ledger = Ledger(60)
    end = ledger.resets_at(WALL)
    assert end == WALL + 60
    ledger.charge("p", Usage(5, 0), WALL)
    late = end - 0.0004
    result = ledger.check("p", Budget(tokens=5), late)
    assert result is not None
    assert result.retry_after_ms == 1
    result = ledger.check("p", Budget(tokens=5), end - 1.2345)
    assert result is not None
    assert result.retry_after_ms == 1_235
    assert result.message.endswith("in this 1m window; it resets at 2026-12-07T15:01:00Z")


# -- windows in the ledger


def test_a_new_window_resets_spend_and_drops_unflushed_charges() -> None:
    """Once the ledger sees a later window, every principal starts again from zero and the
    previous window's charges are never flushed."""
    ledger = Ledger(DAY)
    ledger.charge("p", Usage(600, 600), WALL)
    ledger.charge("q", Usage(1, 0), WALL)
    ledger.mark_loaded("q", WALL)
    budget = Budget(tokens=1_000)
    assert ledger.check("p", budget, WALL) is not None
    old = window_start(WALL, DAY)
    later = WALL + DAY
    assert ledger.check("p", budget, later) is None
    assert ledger.spent("p", later) == Totals()
    assert not ledger.loaded("q", later)
    assert len(ledger) == 0
    assert ledger.take_unflushed(later) == []
    # Reports about the window that is over change nothing.
    ledger.absorb("p", old, totals(5_000), later)
    ledger.unsent("p", old, totals(5_000))
    ledger.flushed("p", old, totals(5_000), totals(5_000))
    assert ledger.spent("p", later) == Totals()
    assert len(ledger) == 0


def test_a_clock_stepped_back_does_not_reopen_the_previous_window() -> None:
    """A wall in an earlier window than the latest seen counts in the latest one."""
    ledger = Ledger(DAY)
    ledger.charge("p", Usage(10, 0), WALL + DAY)
    assert ledger.spent("p", WALL).total_tokens == 10
    [(_, start, _)] = ledger.take_unflushed(WALL)
    assert start == window_start(WALL + DAY, DAY)


def test_spent_of_an_unknown_principal_is_zero_and_creates_nothing() -> None:
    """Asking what a principal has spent holds no memory for it."""
    ledger = Ledger(DAY)
    assert ledger.spent("nobody", WALL) == Totals()
    assert ledger.check("nobody", Budget(tokens=1), WALL) is None
    assert not ledger.loaded("nobody", WALL)
    assert len(ledger) == 0
    ledger.spent("nobody", WALL).add(totals(5))
    assert ledger.spent("nobody", WALL) == Totals()


# -- the flush cycle


def test_flushing_keeps_what_was_spent_constant_throughout() -> None:
    """Charges taken, acknowledged or put back after a failed send are counted exactly once at
    every step."""
    ledger = Ledger(DAY)
    ledger.charge("p", Usage(100, 20, cost=0.5), WALL)
    ledger.charge("p", Usage(10, 2), WALL)
    ledger.charge("q", Usage(7, 0), WALL)
    spent = ledger.spent("p", WALL)
    assert spent == Totals(110, 22, 132, NANOS // 2)
    start = window_start(WALL, DAY)

    batch = dict((p, t) for p, _, t in ledger.take_unflushed(WALL))
    assert batch == {"p": spent, "q": totals(7)}
    assert ledger.take_unflushed(WALL) == []  # nothing new since
    assert ledger.spent("p", WALL) == spent
    # Redis held 1000 tokens from other instances; it now holds ours as well.
    shared = totals(1_000)
    shared.add(spent)
    ledger.flushed("p", start, batch["p"], shared)
    assert ledger.spent("p", WALL) == shared

    ledger.charge("p", Usage(5, 0), WALL)
    shared_then = ledger.spent("p", WALL)
    [(principal, _, sent)] = [b for b in ledger.take_unflushed(WALL) if b[0] == "p"]
    assert (principal, sent) == ("p", totals(5))
    assert ledger.spent("p", WALL) == shared_then
    ledger.unsent("p", start, sent)
    assert ledger.spent("p", WALL) == shared_then
    [(_, _, again)] = [b for b in ledger.take_unflushed(WALL) if b[0] == "p"]
    assert again == totals(5)
    assert ledger.spent("p", WALL) == shared_then


def test_an_acknowledgement_after_a_rollover_or_eviction_is_ignored() -> None:
    """A flush result for an entry that is gone changes nothing and makes no entry."""
    ledger = Ledger(DAY)
    start = window_start(WALL, DAY)
    ledger.flushed("ghost", start, totals(1), totals(10))  # before any window was seen
    ledger.spent("other", WALL)
    ledger.flushed("ghost", start, totals(1), totals(10))
    assert len(ledger) == 0
    assert ledger.spent("ghost", WALL) == Totals()


def test_a_failed_send_for_an_evicted_entry_is_still_counted() -> None:
    """Charges whose send failed are never forgotten because their entry was evicted
    meanwhile."""
    ledger = Ledger(DAY, max_principals=1)
    ledger.charge("p", Usage(3, 0), WALL)
    [(_, start, sent)] = ledger.take_unflushed(WALL)
    ledger.charge("q", Usage(1, 0), WALL)  # evicts p, in flight: nothing idle to evict
    assert ledger.spent("p", WALL) == Totals()
    ledger.unsent("p", start, sent)
    assert ledger.spent("p", WALL) == totals(3)
    assert [b[0] for b in ledger.take_unflushed(WALL)] == ["p"]


def test_absorbed_totals_merge_by_maximum_so_nothing_is_counted_twice() -> None:
    """Duplicated or out-of-order totals from other instances never add up."""
    ledger = Ledger(DAY)
    start = window_start(WALL, DAY)
    ledger.absorb("p", start, totals(500, 10), WALL)
    ledger.absorb("p", start, totals(500, 10), WALL)
    ledger.absorb("p", start, totals(800, 5), WALL)
    ledger.absorb("p", start, totals(600, 30), WALL)
    assert ledger.spent("p", WALL) == Totals(800, 0, 800, 30)
    ledger.charge("p", Usage(50, 0), WALL)
    assert ledger.spent("p", WALL).total_tokens == 850
    # Another window's totals, and those of a window the ledger has not reached, are ignored.
    ledger.absorb("p", start - DAY, totals(10**6), WALL)
    ledger.absorb("p", start + DAY, totals(10**6), WALL)
    assert ledger.spent("p", WALL).total_tokens == 850
    assert ledger.loaded("p", WALL) is False


# -- loading


def test_an_entry_is_loaded_only_once_its_shared_total_was_read() -> None:
    """Charging or absorbing does not make a principal loaded; a read does, until every entry
    is unloaded after a reconnect."""
    ledger = Ledger(DAY)
    start = window_start(WALL, DAY)
    ledger.charge("p", Usage(1, 0), WALL)
    ledger.absorb("q", start, totals(3), WALL)
    assert not ledger.loaded("p", WALL)
    assert not ledger.loaded("q", WALL)
    ledger.mark_loaded("p", WALL)
    ledger.mark_loaded("r", WALL)
    assert ledger.loaded("p", WALL)
    assert ledger.loaded("r", WALL)
    assert len(ledger) == 3
    ledger.unload_all()
    assert not ledger.loaded("p", WALL)
    assert not ledger.loaded("r", WALL)
    assert ledger.spent("p", WALL) == totals(1)


# -- memory bound


def test_eviction_keeps_the_bound_and_prefers_entries_with_nothing_pending() -> None:
    """At the bound, the least recently used entry with nothing unflushed or in flight goes
    first; only when every entry has charges pending does the least recently used go."""
    ledger = Ledger(DAY, max_principals=3)
    start = window_start(WALL, DAY)
    ledger.absorb("idle-old", start, totals(1), WALL)
    ledger.absorb("idle-new", start, totals(2), WALL)
    ledger.charge("busy", Usage(5, 0), WALL)
    ledger.spent("idle-old", WALL)  # now used more recently than idle-new
    ledger.charge("x", Usage(1, 0), WALL)
    assert len(ledger) == 3
    assert ledger.spent("idle-new", WALL) == Totals()
    assert ledger.spent("idle-old", WALL) == totals(1)
    assert ledger.spent("busy", WALL) == totals(5)

    ledger.charge("y", Usage(1, 0), WALL)  # idle-old was the last idle one
    assert len(ledger) == 3
    assert ledger.spent("idle-old", WALL) == Totals()

    # Everything pending: the least recently used goes anyway (busy, charged first).
    ledger.charge("x", Usage(1, 0), WALL)
    ledger.charge("y", Usage(1, 0), WALL)
    ledger.charge("z", Usage(1, 0), WALL)
    assert len(ledger) == 3
    assert ledger.spent("busy", WALL) == Totals()
    assert ledger.spent("x", WALL) == totals(2)


def test_an_acknowledged_entry_becomes_evictable_again() -> None:
    """Once Redis acknowledged its charges, an entry is preferred for eviction over ones with
    charges pending."""
    ledger = Ledger(DAY, max_principals=2)
    ledger.charge("a", Usage(1, 0), WALL)
    ledger.charge("b", Usage(1, 0), WALL)
    for principal, start, sent in ledger.take_unflushed(WALL):
        if principal == "b":
            ledger.flushed(principal, start, sent, sent)
    ledger.charge("c", Usage(1, 0), WALL)
    assert ledger.spent("a", WALL) == totals(1)
    assert ledger.spent("b", WALL) == Totals()


def test_an_absorbed_total_never_evicts_pending_charges() -> None:
    """A report about a new principal is dropped rather than evicting unacknowledged charges."""
    ledger = Ledger(DAY, max_principals=1)
    start = window_start(WALL, DAY)
    ledger.charge("mine", Usage(4, 0), WALL)
    ledger.absorb("theirs", start, totals(100), WALL)
    assert len(ledger) == 1
    assert ledger.spent("mine", WALL) == totals(4)
    assert ledger.spent("theirs", WALL) == Totals()


@settings(max_examples=50)
@given(st.lists(st.integers(min_value=0, max_value=30), max_size=200))
def test_the_bound_holds_for_any_sequence_of_principals(principals: list[int]) -> None:
    """However many principals come, the ledger never holds more entries than its bound."""
    ledger = Ledger(DAY, max_principals=8)
    start = window_start(WALL, DAY)
    for n in principals:
        if n % 3 == 0:
            ledger.absorb(f"p{n}", start, totals(n), WALL)
        elif n % 3 == 1:
            ledger.mark_loaded(f"p{n}", WALL)
        else:
            ledger.charge(f"p{n}", Usage(n, 0), WALL)
        assert len(ledger) <= 8


def test_bad_arguments_are_refused() -> None:
    """A ledger needs a window of a second or more and room for a principal."""
    with pytest.raises(ValueError, match="window"):
        Ledger(0)
    with pytest.raises(ValueError, match="max_principals"):
        Ledger(DAY, max_principals=0)


# -- never under-count


class FlushCycle(RuleBasedStateMachine):
    """The ledger against a model of Redis: sends applied (perhaps acknowledged later, perhaps
    their reply lost), failed, and totals reported again in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(DAY)
        self.start = window_start(WALL, DAY)
        self.charged: dict[str, Totals] = {}
        self.redis: dict[str, Totals] = {}
        self.reported: list[tuple[str, Totals]] = []
        #: Sent, not yet applied by Redis.
        self.sent: list[tuple[str, Totals]] = []
        #: Applied by Redis, the reply (with the total after it) not yet back.
        self.applied: list[tuple[str, Totals, Totals]] = []
        #: Principals whose charges Redis applied twice (a reply lost, then resent).
        self.doubled: set[str] = set()

    principals = st.sampled_from(["a", "b", "c"])

    @rule(
        principal=principals,
        prompt=st.integers(0, 1_000),
        completion=st.integers(0, 1_000),
        cost=st.none() | st.floats(0, 1),
        offset=st.floats(0, DAY - 1),
    )
    def charge(
        self, principal: str, prompt: int, completion: int, cost: float | None, offset: float
    ) -> None:
        usage = Usage(prompt, completion, cost=cost)
        self.ledger.charge(principal, usage, self.start + offset)
        self.charged.setdefault(principal, Totals()).add(Totals.of(usage))

    @rule()
    def take(self) -> None:
        for principal, start, totals_ in self.ledger.take_unflushed(WALL):
            assert start == self.start
            assert not totals_.is_zero()
            self.sent.append((principal, totals_))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        principal, sent = self.sent.pop(data.draw(st.integers(0, len(self.sent) - 1)))
        total = self.redis.setdefault(principal, Totals())
        total.add(sent)
        self.applied.append((principal, sent, total.copy()))
        self.reported.append((principal, total.copy()))

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def acknowledge(self, data: st.DataObject) -> None:
        principal, sent, total = self.applied.pop(data.draw(st.integers(0, len(self.applied) - 1)))
        self.ledger.flushed(principal, self.start, sent, total)

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        principal, sent = self.sent.pop(data.draw(st.integers(0, len(self.sent) - 1)))
        self.ledger.unsent(principal, self.start, sent)

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def lose_reply(self, data: st.DataObject) -> None:
        principal, sent, _ = self.applied.pop(data.draw(st.integers(0, len(self.applied) - 1)))
        self.ledger.unsent(principal, self.start, sent)
        self.doubled.add(principal)

    @precondition(lambda self: self.reported)
    @rule(data=st.data())
    def report(self, data: st.DataObject) -> None:
        """A total published or read again: maybe a stale one, maybe a duplicate."""
        principal, total = data.draw(st.sampled_from(self.reported))
        self.ledger.absorb(principal, self.start, total.copy(), WALL)

    @invariant()
    def never_under_counts(self) -> None:
        in_doubt = {principal for principal, _, _ in self.applied} | self.doubled
        for principal in ("a", "b", "c"):
            charged = self.charged.get(principal, Totals())
            spent = self.ledger.spent(principal, WALL)
            if principal in in_doubt:
                # Redis may hold a charge the ledger also holds in flight or unflushed.
                for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cost_nanos"):
                    assert getattr(spent, name) >= getattr(charged, name)
            else:
                assert spent == charged


FlushCycle.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
test_any_flush_interleaving_counts_every_charge = FlushCycle.TestCase
