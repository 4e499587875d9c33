"""The supervisor's restart policy and loop, on a fake process table and a scripted clock."""
from __future__ import annotations

import random

import pytest

from psgrid.supervisor.base import ChildState, Supervisor
from psgrid.supervisor.policy import (Action, ChildSpec, ExitKind, ExitReason, RestartIntensity,
                                      RestartPolicy, RestartType, Strategy, SupervisorSpec)

P, T, TMP = RestartType.PERMANENT, RestartType.TRANSIENT, RestartType.TEMPORARY


def child(name, restart=P, **kw):
    """A child with exact delays (no jitter): 1, 2, 4, capped at 8 seconds."""
    kw = {"backoff_initial_s": 1.0, "backoff_max_s": 8.0, "backoff_jitter": 0.0, **kw}
    return ChildSpec(name, restart, **kw)


def spec(*children, strategy=Strategy.ONE_FOR_ONE, max_restarts=100, period_s=10.0):
    children = children or tuple(child(n) for n in "abcd")
    return SupervisorSpec(children, strategy, max_restarts, period_s)


class FakeSupervisor(Supervisor):
    """A dict for a process table: the test decides when children exit and whether they are live."""

    def __init__(self, spec, rng=None):
        super().__init__(spec, rng or random.Random(0))
        self.running: dict[str, int] = {}
        self.pending_exit: dict[str, ExitReason] = {}
        self.live: dict[str, bool] = {}
        self.fail_start: set[str] = set()
        self.events: list[tuple[str, str]] = []
        self.graces: list[float] = []
        self.live_checks: list[str] = []
        self._pid = 100

    def start_child(self, spec):
        self.events.append(("start", spec.name))
        if spec.name in self.fail_start:
            raise OSError(f"cannot start {spec.name}")
        assert spec.name not in self.running, "started a child that was still running"
        self._pid += 1
        self.running[spec.name] = self._pid
        return self._pid

    def stop_child(self, name, grace_s):
        self.events.append(("stop", name))
        self.graces.append(grace_s)
        self.running.pop(name, None)
        self.pending_exit.pop(name, None)

    def poll_child(self, name):
        if name in self.pending_exit:
            del self.running[name]
            return self.pending_exit.pop(name)
        return None

    def is_live(self, name, now):
        self.live_checks.append(name)
        return self.live.get(name, True)

    def exit(self, name, code=1):
        assert name in self.running, f"{name} is not running"
        self.pending_exit[name] = ExitReason.exited(code)

    def take_events(self):
        events, self.events = self.events, []
        return events


def started(*names):
    return [("start", n) for n in names]


def stopped(*names):
    return [("stop", n) for n in names]


def crash_and_tick(sup, name, now, code=1):
    sup.exit(name, code)
    sup.tick(now)


# ---- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("bad, named", [
    (dict(name=""), "''"),
    (dict(restart="sometimes"), "sometimes"),
    (dict(backoff_initial_s=0), "0"),
    (dict(backoff_initial_s=9.0, backoff_max_s=8.0), "9.0"),
    (dict(backoff_max_s=float("inf")), "inf"),
    (dict(backoff_multiplier=0.5), "0.5"),
    (dict(backoff_jitter=1.5), "1.5"),
    (dict(healthy_after_s=-1), "-1"),
    (dict(liveness_timeout_s=0), "0"),
    (dict(shutdown_s=-2.0), "-2.0"),
])
def test_bad_child_specs_are_rejected_naming_the_value(bad, named):
    kw = {"name": "a", **bad}
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        child(**kw)


@pytest.mark.parametrize("bad, named", [
    (dict(children=(child("a"), child("a"))), "duplicate child name 'a'"),
    (dict(max_restarts=-1), "-1"),
    (dict(max_restarts=1.5), "1.5"),
    (dict(max_restarts=True), "True"),
    (dict(period_s=0), "0"),
    (dict(period_s=float("nan")), "nan"),
    (dict(strategy="one_for_some"), "one_for_some"),
    (dict(children=("a",)), "'a'"),
])
def test_bad_supervisor_specs_are_rejected_naming_the_value(bad, named):
    kw = {"children": (child("a"),), **bad}
    with pytest.raises(ValueError, match=named):
        SupervisorSpec(**kw)


def test_specs_accept_enum_values_from_config_files():
    s = SupervisorSpec([ChildSpec("a", "transient")], strategy="rest_for_one")
    assert s.strategy is Strategy.REST_FOR_ONE and s.children[0].restart is RestartType.TRANSIENT
    assert isinstance(s.children, tuple) and s.names == ("a",)
    with pytest.raises(KeyError):
        s.child("zz")


def test_exit_reasons_classify_normal_and_abnormal_exits():
    assert ExitReason.exited(0).normal and ExitReason.shutdown().normal
    for reason in (ExitReason.exited(1), ExitReason.signaled(9), ExitReason.liveness(),
                   ExitReason.start_failed()):
        assert not reason.normal, reason
    assert ExitReason.from_returncode(-9) == ExitReason.signaled(9)
    assert ExitReason.from_returncode(3) == ExitReason.exited(3)
    assert str(ExitReason.signaled(15)) == "signal SIGTERM" and str(ExitReason.exited(2)) == "exit code 2"
    assert str(ExitReason.liveness()) == "liveness"
    with pytest.raises(ValueError):
        ExitReason(ExitKind.EXITED)
    with pytest.raises(ValueError):
        ExitReason(ExitKind.LIVENESS, code=1)
    with pytest.raises(ValueError):
        ExitReason.signaled(0)


# ---- the pure policy --------------------------------------------------------------------

@pytest.mark.parametrize("strategy, stop, restart", [
    (Strategy.ONE_FOR_ONE, (), ("b",)),
    (Strategy.ONE_FOR_ALL, ("d", "c", "a"), ("a", "b", "c", "d")),
    (Strategy.REST_FOR_ONE, ("d", "c"), ("b", "c", "d")),
])
def test_each_strategy_names_its_children_in_order(strategy, stop, restart):
    decision = RestartPolicy(spec(strategy=strategy)).on_exit("b", ExitReason.exited(1), 0.0)
    assert decision.action is Action.RESTART
    assert decision.stop == stop and decision.restart == restart


def test_a_temporary_sibling_is_stopped_with_the_group_but_not_restarted():
    s = spec(child("a"), child("b", T), child("c", TMP), strategy=Strategy.ONE_FOR_ALL)
    decision = RestartPolicy(s).on_exit("a", ExitReason.signaled(9), 0.0)
    assert decision.stop == ("c", "b") and decision.restart == ("a", "b")


@pytest.mark.parametrize("restart_type, reason, action", [
    (P, ExitReason.exited(0), Action.RESTART),
    (P, ExitReason.exited(1), Action.RESTART),
    (T, ExitReason.exited(0), Action.NONE),
    (T, ExitReason.exited(1), Action.RESTART),
    (T, ExitReason.signaled(9), Action.RESTART),
    (T, ExitReason.liveness(), Action.RESTART),
    (T, ExitReason.start_failed(), Action.RESTART),
    (TMP, ExitReason.exited(0), Action.NONE),
    (TMP, ExitReason.exited(1), Action.NONE),
    (TMP, ExitReason.liveness(), Action.NONE),
])
def test_restart_types(restart_type, reason, action):
    policy = RestartPolicy(spec(child("a", restart_type), child("b"), strategy=Strategy.ONE_FOR_ALL))
    decision = policy.on_exit("a", reason, 0.0)
    assert decision.action is action
    # Exits that restart nothing must not spend the restart budget.
    assert policy.intensity.count(0.0) == (1 if action is Action.RESTART else 0)


def test_intensity_window_is_inclusive_and_slides():
    window = RestartIntensity(max_restarts=2, period_s=10.0)
    window.record(0.0)
    window.record(1.0)
    assert not window.allow(5.0)
    assert not window.allow(10.0)  # the restart at 0 is exactly period_s old: it still counts
    assert window.allow(10.001) and window.count(10.001) == 1
    assert not RestartIntensity(0, 1.0).allow(0.0)


def test_the_restart_that_would_exceed_the_intensity_gives_up():
    policy = RestartPolicy(spec(max_restarts=2, period_s=10.0))
    assert policy.on_exit("b", ExitReason.exited(1), 0.0).action is Action.RESTART
    assert policy.on_exit("b", ExitReason.exited(1), 6.0).action is Action.RESTART
    decision = policy.on_exit("c", ExitReason.exited(1), 9.0)
    assert decision.action is Action.GIVE_UP
    assert decision.stop == ("d", "b", "a") and decision.restart == ()


def test_the_same_crashes_spread_over_more_than_the_period_are_fine():
    policy = RestartPolicy(spec(max_restarts=2, period_s=10.0))
    for now in (0.0, 6.0, 12.0, 18.0, 24.0, 30.0):
        assert policy.on_exit("b", ExitReason.exited(1), now).action is Action.RESTART, now


def test_back_off_grows_exponentially_to_its_cap():
    policy = RestartPolicy(spec(child("a", backoff_initial_s=0.5, backoff_max_s=3.0)))
    delays = []
    for i in range(6):
        policy.started("a", float(i))
        delays.append(policy.on_exit("a", ExitReason.exited(1), i + 0.5).delay_s)
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_jittered_delays_stay_within_bounds_and_are_reproducible():
    s = spec(child("a", backoff_initial_s=1.0, backoff_max_s=4.0, backoff_jitter=0.5))

    def delays(seed):
        policy = RestartPolicy(s, random.Random(seed))
        return [policy.on_exit("a", ExitReason.exited(1), float(i)).delay_s for i in range(40)]

    got = delays(7)
    nominal = [min(4.0, 2.0**i) for i in range(40)]
    assert all(d * 0.5 <= x <= d for x, d in zip(got, nominal))
    assert len({x / d for x, d in zip(got, nominal)}) > 30  # really jittered, not a constant factor
    assert delays(7) == got and delays(8) != got


def test_back_off_resets_after_the_child_ran_healthy_after_s():
    policy = RestartPolicy(spec(child("a", healthy_after_s=10.0)))
    policy.started("a", 0.0)
    assert policy.on_exit("a", ExitReason.exited(1), 1.0).delay_s == 1.0
    policy.started("a", 2.0)
    assert policy.on_exit("a", ExitReason.exited(1), 3.0).delay_s == 2.0
    policy.started("a", 5.0)
    assert policy.on_exit("a", ExitReason.exited(1), 14.9).delay_s == 4.0  # ran 9.9 s: not yet
    policy.started("a", 20.0)
    assert policy.on_exit("a", ExitReason.exited(1), 30.0).delay_s == 1.0  # ran 10 s: reset


def test_unknown_children_are_refused():
    policy = RestartPolicy(spec())
    with pytest.raises(KeyError):
        policy.on_exit("zz", ExitReason.exited(1), 0.0)
    with pytest.raises(KeyError):
        policy.started("zz", 0.0)


# ---- the supervisor loop ----------------------------------------------------------------

def test_start_all_starts_children_in_order():
    sup = FakeSupervisor(spec())
    sup.start_all(0.0)
    assert sup.take_events() == started("a", "b", "c", "d")
    assert [s.state for s in sup.statuses()] == [ChildState.RUNNING] * 4
    assert [s.pid for s in sup.statuses()] == [101, 102, 103, 104]
    assert all(s.restarts == 0 and s.last_start == 0.0 for s in sup.statuses())
    with pytest.raises(RuntimeError):
        sup.start_all(1.0)


def test_a_failed_start_stops_the_started_children_in_reverse_and_raises():
    sup = FakeSupervisor(spec())
    sup.fail_start.add("c")
    with pytest.raises(OSError):
        sup.start_all(0.0)
    assert sup.take_events() == started("a", "b", "c") + stopped("b", "a")
    assert not sup.running


@pytest.mark.parametrize("strategy, stops, starts", [
    (Strategy.ONE_FOR_ONE, [], ["b"]),
    (Strategy.ONE_FOR_ALL, ["d", "c", "a"], ["a", "b", "c", "d"]),
    (Strategy.REST_FOR_ONE, ["d", "c"], ["b", "c", "d"]),
])
def test_each_strategy_stops_in_reverse_then_restarts_in_order(strategy, stops, starts):
    sup = FakeSupervisor(spec(strategy=strategy))
    sup.start_all(0.0)
    sup.take_events()
    crash_and_tick(sup, "b", 5.0)
    assert sup.take_events() == stopped(*stops)
    assert all(sup.state(n) is ChildState.BACKOFF for n in starts)
    assert all(sup.state(n) is ChildState.RUNNING for n in "abcd" if n not in starts)
    sup.tick(6.0)
    assert sup.take_events() == started(*starts)
    assert sorted(sup.running) == ["a", "b", "c", "d"]
    assert [sup.status(n).restarts for n in "abcd"] == [int(n in starts) for n in "abcd"]
    assert sup.status("b").last_exit == ExitReason.exited(1)


def test_siblings_stopped_by_a_group_restart_record_shutdown():
    sup = FakeSupervisor(spec(strategy=Strategy.ONE_FOR_ALL))
    sup.start_all(0.0)
    crash_and_tick(sup, "b", 5.0)
    assert sup.status("a").last_exit == ExitReason.shutdown() and sup.status("a").pid is None
    assert sup.policy.intensity.count(5.0) == 1


def test_two_crashes_in_one_tick_under_one_for_all_restart_the_group_once():
    sup = FakeSupervisor(spec(strategy=Strategy.ONE_FOR_ALL))
    sup.start_all(0.0)
    sup.take_events()
    sup.exit("a")
    sup.exit("c")
    sup.tick(5.0)
    assert sup.take_events() == stopped("d", "c", "b")
    assert sup.policy.intensity.count(5.0) == 1
    sup.tick(6.0)
    assert sup.take_events() == started("a", "b", "c", "d")


def test_a_restart_waits_until_the_clock_reaches_its_delay():
    sup = FakeSupervisor(spec(child("a", backoff_initial_s=2.0)))
    sup.start_all(0.0)
    sup.take_events()
    crash_and_tick(sup, "a", 10.0)
    assert sup.status("a").restart_at == 12.0 and sup.status("a").pid is None
    sup.tick(11.0)
    sup.tick(11.999)
    assert sup.take_events() == [] and sup.state("a") is ChildState.BACKOFF
    sup.tick(12.0)
    assert sup.take_events() == started("a")
    assert sup.status("a").last_start == 12.0 and sup.status("a").restart_at is None


def test_back_off_grows_between_crash_loops_and_resets_once_healthy():
    sup = FakeSupervisor(spec(child("a", backoff_max_s=4.0, healthy_after_s=30.0)))
    sup.start_all(0.0)
    now, waits = 0.0, []
    for _ in range(5):
        now += 0.1
        crash_and_tick(sup, "a", now)
        waits.append(round(sup.status("a").restart_at - now, 9))
        now = sup.status("a").restart_at
        sup.tick(now)
        assert sup.state("a") is ChildState.RUNNING
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    crash_and_tick(sup, "a", now + 30.0)  # ran healthy_after_s: back to the initial delay
    assert sup.status("a").restart_at == pytest.approx(now + 31.0)


@pytest.mark.parametrize("restart_type, code, end", [
    (T, 0, ChildState.STOPPED),
    (TMP, 0, ChildState.STOPPED),
    (TMP, 3, ChildState.FAILED),
])
def test_children_that_are_not_restarted_stay_down(restart_type, code, end):
    sup = FakeSupervisor(spec(child("a", restart_type), child("b")))
    sup.start_all(0.0)
    sup.take_events()
    crash_and_tick(sup, "a", 1.0, code)
    for now in (2.0, 100.0, 1000.0):
        sup.tick(now)
    assert sup.take_events() == [] and sup.state("a") is end
    assert sup.status("a").last_exit == ExitReason.exited(code)
    assert sup.policy.intensity.count(1.0) == 0


def test_a_transient_child_that_crashes_is_restarted():
    sup = FakeSupervisor(spec(child("a", T)))
    sup.start_all(0.0)
    crash_and_tick(sup, "a", 1.0, code=2)
    sup.tick(2.0)
    assert sup.state("a") is ChildState.RUNNING and sup.status("a").restarts == 1


def test_too_many_crashes_within_the_period_give_up_and_stop_all_in_reverse():
    sup = FakeSupervisor(spec(child("a"), child("b"), child("c"), max_restarts=2, period_s=10.0))
    sup.start_all(0.0)
    crash_and_tick(sup, "b", 1.0)
    sup.tick(2.0)
    crash_and_tick(sup, "b", 3.0)
    sup.tick(5.0)
    assert not sup.gave_up and sup.state("b") is ChildState.RUNNING
    sup.take_events()
    crash_and_tick(sup, "b", 8.0)
    assert sup.gave_up
    assert sup.take_events() == stopped("c", "a")
    assert [sup.state(n) for n in "abc"] == [ChildState.STOPPED, ChildState.FAILED, ChildState.STOPPED]
    sup.tick(100.0)
    sup.request_restart("a")
    sup.tick(101.0)
    assert sup.take_events() == [] and not sup.running


def test_the_same_crashes_spread_over_more_than_the_period_do_not_give_up():
    # healthy_after_s=0.5 keeps every delay at 1 s, so only the intensity is tested.
    sup = FakeSupervisor(spec(child("a"), child("b", healthy_after_s=0.5), max_restarts=2, period_s=10.0))
    sup.start_all(0.0)
    for now in (1.0, 3.0, 14.0, 16.0, 27.0, 29.0):
        crash_and_tick(sup, "b", now)
        sup.tick(now + 1.0)
        assert sup.state("b") is ChildState.RUNNING, now
    assert not sup.gave_up and sup.status("b").restarts == 6


def test_a_child_failing_liveness_is_killed_and_restarted_with_reason_liveness():
    sup = FakeSupervisor(spec(child("a", liveness_timeout_s=5.0, shutdown_s=2.5), child("b")))
    sup.start_all(0.0)
    assert sup.state("a") is ChildState.STARTING and sup.state("b") is ChildState.RUNNING
    sup.tick(1.0)
    assert sup.state("a") is ChildState.RUNNING
    sup.take_events()
    sup.live["a"] = False
    for now in (2.0, 4.0, 7.0):  # failing since 2.0: 5 s is not yet *over* 5 s
        sup.tick(now)
    assert sup.take_events() == [] and sup.state("a") is ChildState.RUNNING
    sup.tick(7.5)
    assert sup.take_events() == stopped("a") and sup.graces == [2.5]
    assert sup.status("a").last_exit == ExitReason.liveness()
    assert sup.state("a") is ChildState.BACKOFF
    sup.live["a"] = True
    sup.tick(8.5)
    assert sup.take_events() == started("a") and sup.state("a") is ChildState.STARTING
    assert "b" not in sup.live_checks  # no liveness timeout: never asked


def test_a_child_that_never_answers_after_starting_is_killed():
    sup = FakeSupervisor(spec(child("a", liveness_timeout_s=3.0)))
    sup.live["a"] = False
    sup.start_all(0.0)
    sup.tick(3.0)
    assert sup.state("a") is ChildState.STARTING
    sup.tick(3.1)
    assert sup.status("a").last_exit == ExitReason.liveness()


def test_a_health_check_that_recovers_restarts_the_liveness_clock():
    sup = FakeSupervisor(spec(child("a", liveness_timeout_s=5.0)))
    sup.start_all(0.0)
    sup.live["a"] = False
    sup.tick(1.0)
    sup.live["a"] = True
    sup.tick(5.0)
    sup.live["a"] = False
    sup.tick(8.0)
    sup.tick(12.0)  # failing since 8.0, not since the start
    assert sup.state("a") is ChildState.RUNNING


def test_request_restart_restarts_one_child_without_spending_intensity():
    sup = FakeSupervisor(spec(max_restarts=1, strategy=Strategy.ONE_FOR_ALL))
    sup.start_all(0.0)
    sup.take_events()
    for i in range(3):
        sup.request_restart("b")
        assert sup.take_events() == []  # nothing happens until the loop's next tick
        sup.tick(1.0 + i)
        assert sup.take_events() == stopped("b") + started("b")
    assert not sup.gave_up and sup.policy.intensity.count(3.0) == 0
    assert sup.status("b").restarts == 3 and sup.status("a").restarts == 0
    with pytest.raises(KeyError):
        sup.request_restart("zz")


def test_request_restart_skips_a_pending_back_off_and_revives_a_stopped_child():
    sup = FakeSupervisor(spec(child("a", backoff_initial_s=8.0), child("b", TMP)))
    sup.start_all(0.0)
    crash_and_tick(sup, "a", 1.0)
    crash_and_tick(sup, "b", 1.0)
    assert sup.state("a") is ChildState.BACKOFF and sup.state("b") is ChildState.FAILED
    sup.take_events()
    sup.request_restart("a")
    sup.request_restart("b")
    sup.tick(2.0)
    assert sup.take_events() == started("a", "b")
    assert sup.state("a") is ChildState.RUNNING and sup.state("b") is ChildState.RUNNING


def test_a_restart_that_fails_to_start_counts_as_a_crash():
    sup = FakeSupervisor(spec(child("a"), max_restarts=2, period_s=100.0))
    sup.start_all(0.0)
    sup.fail_start.add("a")
    crash_and_tick(sup, "a", 1.0)
    sup.tick(2.0)  # start fails: back off again, longer
    assert sup.status("a").last_exit == ExitReason.start_failed()
    assert sup.state("a") is ChildState.BACKOFF and sup.status("a").restart_at == 4.0
    sup.tick(4.0)  # third restart in the period: give up
    assert sup.gave_up and sup.state("a") is ChildState.FAILED


def test_giving_up_while_restarting_a_group_starts_no_more_of_it():
    sup = FakeSupervisor(spec(child("a"), child("b"), child("c"), max_restarts=1,
                              strategy=Strategy.ONE_FOR_ALL))
    sup.start_all(0.0)
    crash_and_tick(sup, "b", 1.0)
    sup.fail_start.add("b")
    sup.take_events()
    sup.tick(2.0)  # a starts, b fails to: a second restart exceeds the intensity
    assert sup.take_events() == started("a", "b") + stopped("a")
    assert sup.gave_up and [sup.state(n) for n in "abc"] == [ChildState.STOPPED, ChildState.FAILED,
                                                             ChildState.STOPPED]


def test_shutdown_stops_children_in_reverse_and_cancels_restarts():
    sup = FakeSupervisor(spec())
    sup.start_all(0.0)
    crash_and_tick(sup, "b", 1.0)
    sup.take_events()
    sup.shutdown(grace_s=0.25)
    assert sup.take_events() == stopped("d", "c", "a") and set(sup.graces) == {0.25}
    assert all(s.state is ChildState.STOPPED for s in sup.statuses())
    sup.shutdown()
    sup.tick(50.0)
    assert sup.take_events() == [] and not sup.running


class ScriptedClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ScriptedEvent:
    """A stop event whose wait advances the clock and runs the test's script instead of sleeping."""

    def __init__(self, clock, script):
        self.clock, self.script, self.waits = clock, script, 0

    def wait(self, timeout):
        self.clock.now += timeout
        self.waits += 1
        return self.script(self.waits)


def test_run_ticks_until_stopped_then_shuts_down():
    sup = FakeSupervisor(spec(child("a"), child("b")))
    clock = ScriptedClock()

    def script(waits):
        if waits == 2:
            sup.exit("a")
        return waits == 10

    assert sup.run(ScriptedEvent(clock, script), clock, interval_s=0.5) == 0
    assert sup.status("a").restarts == 1 and sup.status("a").last_start == 2.0
    assert sup.take_events()[-2:] == stopped("b", "a")
    assert not sup.running


def test_run_returns_non_zero_when_it_gives_up():
    sup = FakeSupervisor(spec(child("a"), child("b"), max_restarts=0))
    clock = ScriptedClock()
    event = ScriptedEvent(clock, lambda waits: sup.exit("a") if waits == 1 else False)
    assert sup.run(event, clock, interval_s=1.0) == 1
    assert sup.gave_up and event.waits == 1 and not sup.running
