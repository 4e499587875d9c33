"""The consistency model's clocks: BSP rounds, SSP bounds, async, dedupe."""
from __future__ import annotations

import pytest

from psgrid.errors import FailedPrecondition, PushAhead
from psgrid.server.consistency import StepClock


def test_bsp_applies_once_per_round_when_all_arrived():
    c = StepClock(0, ["a", "b"])
    assert c.may_compute("a", 0) and not c.may_compute("a", 1)
    assert c.accept("a", 0) is False
    assert not c.may_compute("a", 1)  # b has not pushed step 0 yet
    assert c.accept("b", 0) is True
    c.round_applied()
    assert c.global_step == 1 and c.may_compute("a", 1) and c.may_compute("b", 1)


def test_bsp_rejects_a_push_ahead_of_the_round():
    c = StepClock(0, ["a", "b"])
    c.accept("a", 0)
    with pytest.raises(FailedPrecondition):
        c.accept("a", 1)


def test_ssp_bound():
    c = StepClock(2, ["fast", "slow"])
    for step in range(3):
        assert c.may_compute("fast", step)
        c.accept("fast", step)
    assert c.global_step == 0
    assert not c.may_compute("fast", 3)  # 3 > 0 + 2
    with pytest.raises(FailedPrecondition):
        c.check_push("fast", 3)
    c.accept("slow", 0)
    assert c.global_step == 1 and c.may_compute("fast", 3)


def test_async_never_waits():
    c = StepClock(None, ["a", "b"])
    for step in range(100):
        assert c.may_compute("a", step)
        assert c.accept("a", step)


def test_duplicates_and_gaps():
    c = StepClock(None, ["a"])
    c.accept("a", 0)
    assert c.is_duplicate("a", 0) and not c.is_duplicate("a", 1)
    with pytest.raises(PushAhead):  # the server went back: the worker must pull again
        c.check_push("a", 5)


def test_a_worker_that_leaves_no_longer_holds_the_barrier():
    c = StepClock(0, ["a", "b"])
    assert c.accept("a", 0) is False
    c.leave("b")
    assert c.round_complete()
