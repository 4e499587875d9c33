"""psgrid.guard's pure parts: the admission limits and the watchdog's bookkeeping."""
from __future__ import annotations

import threading

import pytest

from psgrid.guard import COMPACT_AT, Admission, Watchdog


class Call:
    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


def test_a_late_call_is_cancelled_and_an_answered_one_is_not():
    dog = Watchdog()
    late, answered = Call(), Call()
    alarm = dog.arm(answered, 0.05, "an answer")
    dog.arm(late, 0.05, "an answer")
    alarm.disarm()
    assert late.cancelled.wait(10)
    assert not answered.cancelled.is_set()


def test_a_disarmed_alarm_lets_go_of_its_call_and_the_heap_stays_bounded():
    """A disarmed alarm waits in the heap for its time: it must not keep the call (and
    its request) alive meanwhile (the 20,000-message fuzz run grew 45 MB when it did)."""
    dog = Watchdog()
    for _ in range(3 * COMPACT_AT):
        alarm = dog.arm(Call(), 600, "a request")
        alarm.disarm()
        assert alarm.context is None
    assert len(dog._heap) <= COMPACT_AT


@pytest.mark.parametrize("field, value", [("calls_per_service", 0), ("arrive_s", 0), ("frame_idle_s", float("inf")),
                                          ("connection_idle_s", -1)])
def test_admission_refuses_limits_that_make_no_sense(field, value):
    with pytest.raises(ValueError, match=field):
        Admission(**{field: value})


def test_the_thread_pool_covers_every_services_bound():
    a = Admission(calls_per_service=8, health_calls=4)
    assert a.threads(["A", "B"]) >= 8 * 2 + 4
