"""The dynamic batcher and the pipeline's stages: pure cores, a fake model, no sockets."""
from __future__ import annotations

import threading
import time

import pytest

from psgrid.errors import DeadlineExceeded, Internal, InvalidArgument, Overloaded, Unavailable
from psgrid.inference.batcher import BatchPolicy, DynamicBatcher, Ticket, TicketState
from psgrid.inference.pipeline import Pipeline, chain

from helpers.wait import wait_until


class FakeClock:
    """A scripted clock: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """Doubles every element of each payload (a list of numbers); records the batches."""

    def __init__(self, version: int = 1, fail_on=None):
        self.version, self.fail_on = version, fail_on
        self.batches: list[list[list[int]]] = []
        self.lock = threading.Lock()

    def __call__(self, payloads):
        with self.lock:
            self.batches.append(payloads)
        if self.fail_on is not None and any(self.fail_on in p for p in payloads):
            raise self.error()
        return [[2 * v for v in p] for p in payloads], self.version

    def error(self) -> Exception:
        return InvalidArgument("bad example") if self.fail_on == -1 else RuntimeError("model crashed")


def ticket(*values, deadline=None) -> Ticket:
    return Ticket(list(values), len(values), deadline)


# --- the policy: pure arithmetic -------------------------------------------------------------


def test_take_fills_whole_requests_up_to_the_limit():
    policy = BatchPolicy(max_batch_size=8)
    assert policy.take([3, 4, 5]) == 2  # 3 + 4 fit, 5 more would be 12
    assert policy.take([8, 1]) == 1
    assert policy.take([1] * 20) == 8
    assert policy.take([]) == 0


def test_a_request_larger_than_a_batch_runs_alone():
    policy = BatchPolicy(max_batch_size=8)
    assert policy.take([20, 1]) == 1
    assert policy.plan([20, 1], 21, oldest_arrival=0.0, now=0.0) == (1, None)


def test_plan_waits_for_the_timeout_unless_the_batch_is_full():
    policy = BatchPolicy(max_batch_size=10, batch_timeout_s=0.005)
    assert policy.plan([], 0, None, now=1.0) == (0, None)
    take, wait = policy.plan([2, 3], 5, oldest_arrival=1.0, now=1.002)
    assert take == 0 and wait == pytest.approx(0.003)
    assert policy.plan([2, 3], 5, oldest_arrival=1.0, now=1.005) == (2, None)
    assert policy.plan([4, 6], 10, oldest_arrival=1.0, now=1.0) == (2, None)
    assert policy.plan([2], 2, oldest_arrival=1.0, now=1.0, flush=True) == (1, None)


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"batch_timeout_s": -1}])
def test_policy_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        BatchPolicy(**kwargs)


# --- tickets ------------------------------------------------------------------------------------


def test_a_ticket_is_answered_once_and_a_late_answer_is_dropped():
    t = ticket(1)
    assert t.resolve([2], 3)
    assert not t.resolve([99], 4) and not t.fail(Internal("x")) and not t.drop()
    assert t.wait(0) == ([2], 3)

    gone = ticket(1)
    assert gone.drop()
    assert not gone.resolve([2], 3)
    assert gone.state is TicketState.DROPPED and gone.result is None


def test_waiting_past_the_timeout_drops_the_ticket():
    t = ticket(1)
    with pytest.raises(DeadlineExceeded):
        t.wait(0.01)
    assert t.state is TicketState.DROPPED
    assert not t.resolve([2], 1)


# --- the batcher with a scripted clock (no threads) --------------------------------------------------


def test_a_full_batch_is_due_at_once_and_rows_go_back_to_their_senders():
    clock, model = FakeClock(), FakeModel(version=7)
    b = DynamicBatcher(model, BatchPolicy(max_batch_size=4, batch_timeout_s=1.0), clock=clock)
    tickets = [ticket(1, 2), ticket(3), ticket(4), ticket(5)]
    for t in tickets:
        b.submit(t)
    batch = b.next_batch()
    assert batch == tickets[:3]  # 2 + 1 + 1 examples fill the batch of 4
    b.run(batch)
    assert [t.wait(0) for t in tickets[:3]] == [([2, 4], 7), ([6], 7), ([8], 7)]
    assert model.batches == [[[1, 2], [3], [4]]]
    assert tickets[3].pending and b.waiting() == 1


def test_a_partial_batch_waits_for_the_timeout():
    clock, model = FakeClock(), FakeModel()
    b = DynamicBatcher(model, BatchPolicy(max_batch_size=100, batch_timeout_s=0.005), clock=clock)
    b.submit(ticket(1))
    clock.now += 0.002
    b.submit(ticket(2))
    take, wait = b.policy.plan([1, 1], 2, 100.0, clock.now)
    assert take == 0 and wait == pytest.approx(0.003)
    clock.now += 0.003
    batch = b.next_batch()  # due now: returns without waiting
    assert [t.payload for t in batch] == [[1], [2]]


def test_a_full_buffer_rejects_at_once_and_a_discard_frees_a_place():
    b = DynamicBatcher(FakeModel(), capacity=2, clock=FakeClock())
    first, second = ticket(1), ticket(2)
    b.submit(first)
    b.submit(second)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        b.submit(ticket(3))
    assert time.monotonic() - started < 0.5
    assert b.stats().rejected == 1
    first.drop()
    assert b.discard(first) and not b.discard(first)
    b.submit(ticket(4))
    assert b.waiting() == 2


def test_dropped_and_expired_tickets_are_never_run():
    clock, model = FakeClock(), FakeModel()
    b = DynamicBatcher(model, BatchPolicy(max_batch_size=3, batch_timeout_s=1.0), clock=clock)
    expired, cancelled, live = ticket(1, deadline=clock.now + 0.5), ticket(2), ticket(3)
    for t in (expired, cancelled, live):
        b.submit(t)
    cancelled.drop()
    clock.now += 1.0
    batch = b.next_batch()
    b.run(batch)
    assert model.batches == [[[3]]]
    assert live.wait(0) == ([6], 1)
    assert expired.state is TicketState.DROPPED
    with pytest.raises(DeadlineExceeded):
        expired.wait(0)
    assert cancelled.result is None


def test_a_ticket_dropped_while_its_batch_runs_gets_nothing():
    gone = ticket(5)

    def model(payloads):
        gone.drop()  # the caller leaves while the model computes
        return [[v * 2 for v in p] for p in payloads], 1

    b = DynamicBatcher(model, clock=FakeClock())
    stay = ticket(6)
    b.run([gone, stay])
    assert gone.result is None and gone.state is TicketState.DROPPED
    assert stay.wait(0) == ([12], 1)


@pytest.mark.parametrize("fail_on, error", [(-1, InvalidArgument), (-2, Internal)])
def test_a_failing_request_fails_alone(fail_on, error):
    model = FakeModel(fail_on=fail_on)
    b = DynamicBatcher(model, clock=FakeClock())
    good, bad, other = ticket(1), ticket(fail_on), ticket(3)
    b.run([good, bad, other])
    assert good.wait(0) == ([2], 1) and other.wait(0) == ([6], 1)
    with pytest.raises(error):
        bad.wait(0)
    assert len(model.batches) == 4  # the shared batch, then each request alone


def test_a_model_returning_the_wrong_number_of_outputs_fails_the_batch():
    b = DynamicBatcher(lambda payloads: ([], 1), clock=FakeClock())
    tickets = [ticket(1), ticket(2)]
    b.run(tickets)
    for t in tickets:
        with pytest.raises(Internal, match="0 outputs for 1 requests"):
            t.wait(0)


def test_close_runs_what_waits_and_refuses_new_tickets():
    model = FakeModel()
    b = DynamicBatcher(model, BatchPolicy(batch_timeout_s=60)).start()
    t = ticket(4)
    b.submit(t)
    b.close()
    assert t.wait(0) == ([8], 1)
    with pytest.raises(Unavailable):
        b.submit(ticket(1))


# --- the batcher with threads and a real clock ------------------------------------------------------


def test_concurrent_callers_share_batches_and_each_gets_its_own_rows():
    model = FakeModel(version=3)
    b = DynamicBatcher(model, BatchPolicy(max_batch_size=16, batch_timeout_s=0.02), capacity=1000).start()
    results: dict[int, tuple] = {}

    def caller(i: int) -> None:
        t = Ticket([i, -i, i * 1000], 3)
        b.submit(t, block=True)
        results[i] = t.wait(10)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(200)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    b.close()
    assert results == {i: ([2 * i, -2 * i, 2000 * i], 3) for i in range(200)}
    sizes = [sum(len(p) for p in batch) for batch in model.batches]
    assert max(sizes) <= 16
    assert len(model.batches) < 200  # requests were mixed into shared batches
    stats = b.stats()
    assert stats.requests == 200 and stats.examples == 600 and stats.batches == len(model.batches)


def test_a_lone_request_goes_after_the_timeout():
    model = FakeModel()
    b = DynamicBatcher(model, BatchPolicy(max_batch_size=100, batch_timeout_s=0.05)).start()
    t = ticket(1)
    started = time.monotonic()
    b.submit(t)
    assert t.wait(10) == ([2], 1)
    assert time.monotonic() - started >= 0.05
    b.close()


def test_each_batch_reports_the_version_it_started_with():
    version = {"v": 1}

    def model(payloads):
        v = version["v"]
        version["v"] += 1  # a new version is swapped in after every batch
        return [[v] * len(p) for p in payloads], v

    b = DynamicBatcher(model, BatchPolicy(max_batch_size=1, batch_timeout_s=0)).start()
    tickets = [ticket(i) for i in range(5)]
    for t in tickets:
        b.submit(t)
    answers = [t.wait(10) for t in tickets]
    b.close()
    assert all(out == [v] for out, v in answers)
    assert [v for _, v in answers] == [1, 2, 3, 4, 5]


# --- the pipeline: bounded stages in front of the batcher -------------------------------------------


class Gate:
    """A preprocessing function that holds every request until opened."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.calls = 0

    def __call__(self, payload):
        self.calls += 1
        self.open.wait(10)
        return [v + 1 for v in payload]


def test_a_full_pipeline_rejects_at_the_door_and_recovers():
    gate = Gate()
    p = Pipeline(FakeModel(), preprocess=gate, queue_capacity=2, preprocess_concurrency=1,
                 batch_timeout_s=0.001).start()
    admitted = [ticket(i) for i in range(3)]
    p.submit(admitted[0])
    wait_until(lambda: gate.calls == 1, timeout=5, message="the first request in preprocessing")
    p.submit(admitted[1])
    p.submit(admitted[2])
    for _ in range(20):
        with pytest.raises(Overloaded):
            p.submit(ticket(99))
    stats = p.stats()
    assert stats.waiting["preprocess"] == 2 and stats.rejected == 20
    gate.open.set()
    assert [t.wait(10)[0] for t in admitted] == [[2], [4], [6]]  # (i + 1) * 2
    late = ticket(10)
    p.submit(late)
    assert late.wait(10) == ([22], 1)
    p.close()


def test_back_pressure_holds_processors_and_the_door_rejects():
    release = threading.Event()

    def slow_model(payloads):
        release.wait(10)
        return [[2 * v for v in p] for p in payloads], 1

    p = Pipeline(slow_model, preprocess=lambda x: x, queue_capacity=1, preprocess_concurrency=1,
                 max_batch_size=1, batch_timeout_s=0).start()
    # One runs in the model, one waits in the batcher, one blocks its processor, one waits in preprocess.
    held = [ticket(i) for i in range(4)]
    for t in held[:3]:
        p.submit(t)
        wait_until(lambda: p.stats().waiting["preprocess"] == 0, timeout=5,
                   message="the processor taking the request")
    p.submit(held[3])
    with pytest.raises(Overloaded):
        p.submit(ticket(9))
    assert p.stats().waiting == {"preprocess": 1, "batcher": 1}  # every buffer bounded, none over
    release.set()
    assert [t.wait(10)[0] for t in held] == [[0], [2], [4], [6]]
    p.close()


def test_a_cancelled_request_frees_its_place_and_is_never_processed():
    gate = Gate()
    p = Pipeline(FakeModel(), preprocess=gate, queue_capacity=1, preprocess_concurrency=1).start()
    first, queued = ticket(1), ticket(2)
    p.submit(first)
    wait_until(lambda: gate.calls == 1, timeout=5, message="the first request in preprocessing")
    p.submit(queued)
    with pytest.raises(Overloaded):
        p.submit(ticket(3))
    p.cancel(queued)
    assert p.stats().waiting["preprocess"] == 0
    replacement = ticket(4)
    p.submit(replacement)
    gate.open.set()
    assert first.wait(10)[0] == [4] and replacement.wait(10)[0] == [10]
    assert gate.calls == 2 and queued.result is None
    p.close()


def test_a_stage_error_fails_only_its_request():
    def picky(payload):
        if payload == [0]:
            raise ValueError("zero is not allowed")
        return payload

    p = Pipeline(FakeModel(), preprocess=picky, batch_timeout_s=0.001).start()
    bad, good = ticket(0), ticket(1)
    p.submit(bad)
    p.submit(good)
    with pytest.raises(InvalidArgument, match="zero"):
        bad.wait(10)
    assert good.wait(10) == ([2], 1)
    p.close()


def test_chain_applies_the_stages_in_order_and_skips_none():
    assert chain(None, lambda x: x + 1, None, lambda x: x * 10)(1) == 20
    assert chain()(5) == 5


def test_tiny_buffers_under_many_producers_lose_no_wake_up():
    """Stages wake one consumer per ticket and producers only when a full queue frees a
    place: with buffers of 2 between concurrent processors, every ticket still arrives."""
    def slowish(payloads):
        time.sleep(0.001)
        return [[2 * v for v in p] for p in payloads], 1

    p = Pipeline(slowish, preprocess=lambda x: x, features=lambda x: x, queue_capacity=2,
                 preprocess_concurrency=2, features_concurrency=2, max_batch_size=3,
                 batch_timeout_s=0.0005).start()
    answers: dict[int, list[int]] = {}

    def producer(first: int) -> None:
        sent = {}
        for i in range(first, first + 50):
            sent[i] = ticket(i)
            while True:
                try:
                    p.submit(sent[i])
                    break
                except Overloaded:
                    time.sleep(0.0005)
        for i, t in sent.items():
            answers[i] = t.wait(10)[0]

    threads = [threading.Thread(target=producer, args=(k * 1000,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert answers == {i: [2 * i] for k in range(6) for i in range(k * 1000, k * 1000 + 50)}
    assert p.stats().queued == 0
    p.close()
