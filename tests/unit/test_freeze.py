"""psgrid.worker.freeze: a thaw is seen whichever thread runs first after SIGCONT."""
from __future__ import annotations

import threading

from psgrid.worker import freeze
from psgrid.worker.freeze import FreezeWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_steady_ticks_are_no_freeze():
    clock = Clock()
    watch = FreezeWatch(tick_s=0.1, gap_s=1.0, clock=clock)
    since = clock.now
    for _ in range(50):
        clock.now += 0.1
        watch.tick()
    assert not watch.frozen_since(since)


def test_a_late_tick_is_a_thaw_after_the_time_before_it_only():
    clock = Clock()
    watch = FreezeWatch(tick_s=0.1, gap_s=1.0, clock=clock)
    before = clock.now
    clock.now += 5.0  # frozen
    watch.tick()  # the watching thread ran first after the thaw
    assert watch.frozen_since(before)
    clock.now += 0.1
    watch.tick()
    after = clock.now
    assert not watch.frozen_since(after)


def test_an_overdue_tick_is_a_thaw_before_the_watching_thread_has_run():
    clock = Clock()
    watch = FreezeWatch(tick_s=0.1, gap_s=1.0, clock=clock)
    before = clock.now
    clock.now += 5.0  # thawed; the caller's thread runs before the watcher's
    assert watch.frozen_since(before)


def test_hold_after_thaw_waits_for_the_stop_only_after_a_freeze(monkeypatch):
    monkeypatch.setattr(freeze, "HOLD_S", 0.05)
    clock = Clock()
    watch = FreezeWatch(clock=clock)
    stop = threading.Event()
    assert not watch.hold_after_thaw(clock.now, stop)
    stop.set()
    assert watch.hold_after_thaw(clock.now, stop)  # stopping, frozen or not
    stop.clear()
    before = clock.now
    clock.now += 5.0
    assert not watch.hold_after_thaw(before, stop)  # thawed, but no SIGTERM came
    monkeypatch.setattr(freeze, "HOLD_S", 30.0)
    threading.Timer(0.01, stop.set).start()
    assert watch.hold_after_thaw(before, stop)  # the SIGTERM came with the SIGCONT: at once
