"""Many same-delay deadlines on one timer (gateway/core/deadlines.py), on the manual clock."""

from __future__ import annotations

from gateway.core.clock import ManualClock
from gateway.core.deadlines import Deadlines


def test_deadlines_fire_in_order_and_a_restart_moves_one_to_the_back() -> None:
    """Each key times out its delay after it was last started; a restart postpones it, a
    start without restart keeps its place, a cancel drops it."""
    clock = ManualClock(start=0.0)
    fired: list[tuple[str, float]] = []
    deadlines: Deadlines[str] = Deadlines(clock, 5.0, lambda key: fired.append((key, clock.now())))
    for key in "abcd":
        deadlines.start(key)
    clock.advance(1.0)
    deadlines.start("a")  # restarted: now due at 6, after d
    deadlines.start("b", restart=False)  # kept its place: due at 5
    deadlines.cancel("c")
    assert len(deadlines) == 3
    # One timer on the clock for all of them, however many keys there are.
    assert clock.pending == 1
    clock.advance(3.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [("b", 5.0), ("d", 5.0)]
    clock.advance(0.9)
    assert fired == [("b", 5.0), ("d", 5.0)]
    clock.advance(0.1)
    assert fired == [("b", 5.0), ("d", 5.0), ("a", 6.0)]
    assert len(deadlines) == 0
    assert clock.pending == 0  # nothing left armed


def test_a_due_key_may_start_again_from_its_callback() -> None:
    """on_due runs after the due keys are removed: it may start any key again (a socket whose
    idle deadline passed during a close restarts nothing, but nothing breaks if it does)."""
    clock = ManualClock(start=0.0)
    fired: list[float] = []
    deadlines: Deadlines[str] = Deadlines(clock, 2.0, lambda key: None)

    def on_due(key: str) -> None:
        fired.append(clock.now())
        if len(fired) < 3:
            deadlines.start(key)

    deadlines = Deadlines(clock, 2.0, on_due)
    deadlines.start("x")
    clock.advance(10.0)
    assert fired == [2.0, 4.0, 6.0]
    assert "x" not in deadlines


def test_stop_forgets_every_deadline_and_its_timer() -> None:
    clock = ManualClock()
    fired: list[str] = []
    deadlines: Deadlines[str] = Deadlines(clock, 1.0, fired.append)
    deadlines.start("a")
    deadlines.start("b")
    deadlines.stop()
    assert clock.pending == 0
    clock.advance(5.0)
    assert fired == []
    deadlines.start("c")  # usable again after a stop
    clock.advance(1.0)
    assert fired == ["c"]
