"""The manual clock that tests of time-based behaviour drive (gateway/core/clock.py)."""

from __future__ import annotations

import pytest

from gateway.core.clock import ManualClock


def test_timers_fire_in_due_order_then_in_the_order_they_were_set() -> None:
    clock = ManualClock(start=10.0)
    fired: list[tuple[str, float]] = []

    def note(name: str) -> None:
        fired.append((name, clock.now()))

    clock.call_later(2.0, note, "b")
    clock.call_later(1.0, note, "a")
    clock.call_later(2.0, note, "c")
    assert clock.advance(0.5) == 0
    assert fired == []
    assert clock.advance(1.5) == 3
    # Each callback sees the time it fell due, not the time the clock was moved to.
    assert fired == [("a", 11.0), ("b", 12.0), ("c", 12.0)]
    assert clock.now() == 12.0


def test_a_cancelled_timer_never_fires_and_lets_go_of_its_callback() -> None:
    clock = ManualClock()
    fired: list[int] = []
    payload = [1]
    timer = clock.call_later(1.0, fired.append, payload)
    assert clock.pending == 1
    timer.cancel()
    assert clock.pending == 0
    assert clock.next_due() is None
    clock.advance(5.0)
    assert fired == []
    timer.cancel()  # twice is fine


def test_timers_set_by_callbacks_fire_within_the_same_advance_when_due() -> None:
    clock = ManualClock(start=0.0)
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(clock.now())
        clock.call_later(1.0, tick)

    clock.call_later(1.0, tick)
    assert clock.advance(3.5) == 3
    assert ticks == [1.0, 2.0, 3.0]
    assert clock.next_due() == 4.0
    assert clock.now() == 3.5


def test_the_wall_clock_moves_with_the_monotonic_one_and_time_does_not_go_back() -> None:
    clock = ManualClock(start=5.0, wall_start=1_000.0)
    clock.advance(2.5)
    assert clock.wall() == 1_002.5
    assert clock.now() == 7.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
    # A delay in the past or zero falls due at the next advance, even of zero.
    fired: list[str] = []
    clock.call_later(-3, fired.append, "late")
    clock.advance(0)
    assert fired == ["late"]
