"""The parameter-server protocol over real gRPC: consistency, jobs, events, health."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psgrid.errors import FailedPrecondition, JobNotRunning, PushAhead
from psgrid.spec import JobState, OptimizerSpec

from helpers.inproc import make_rig, spec
from psgrid.worker.ps_client import push_header
from helpers.wait import wait_until


def ones(v: float):
    return {"w": torch.full((4, 3), v), "b": torch.full((4,), v)}


def test_bsp_averages_all_workers_and_applies_once(server):
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    start = rig.params()
    assert rig.push(0, 0, ones(1.0)) == (1, False)  # to be applied in version 1
    assert rig.version() == 0  # waiting for worker 1
    assert rig.push(1, 0, ones(3.0)) == (1, False)
    assert rig.version() == 1
    torch.testing.assert_close(rig.params()["w"], start["w"] - 0.5 * 2.0, rtol=0, atol=1e-6)


def test_bsp_pull_waits_for_the_round(server):
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    rig.push(0, 0, ones(1.0))
    got = {}
    puller = threading.Thread(target=lambda: got.update(p=rig.pull(0, 1)))
    puller.start()
    puller.join(0.3)
    assert puller.is_alive(), "worker 0 must not get step-1 weights before worker 1 pushed step 0"
    rig.push(1, 0, ones(1.0))
    puller.join(10)
    assert got["p"].version == 1 and got["p"].step == 1


def test_a_pull_asks_the_server_to_wait_no_longer_than_it_says(server_factory):
    from psgrid.errors import NotReady

    rig = make_rig(server_factory(pull_wait_s=120).port, spec(num_workers=2, staleness=0))
    rig.push(0, 0, ones(1.0))
    got = {}

    def pull():
        try:
            rig.ps.pull(rig.job_id, rig.workers[0], 1, False, lambda n: torch.empty(n, dtype=torch.uint8),
                        wait_s=0.2)
        except NotReady as exc:  # the round is not complete: worker 1 has not pushed
            got["error"] = exc

    puller = threading.Thread(target=pull)
    puller.start()
    wait_until(lambda: not puller.is_alive(), 30, message="the short pull to give up")
    assert isinstance(got.get("error"), NotReady)
    assert rig.version() == 0


def test_ssp_blocks_a_worker_beyond_the_bound(server):
    rig = make_rig(server.port, spec(num_workers=2, staleness=1))
    rig.pull(0, 0)
    rig.push(0, 0, ones(0.1))
    rig.pull(0, 1)  # 1 <= 0 + 1: allowed
    rig.push(0, 1, ones(0.1))
    with pytest.raises(FailedPrecondition):
        rig.push(0, 2, ones(0.1))  # beyond the bound: refused, not applied
    got = {}
    puller = threading.Thread(target=lambda: got.update(p=rig.pull(0, 2)))
    puller.start()
    puller.join(0.3)
    assert puller.is_alive()
    rig.push(1, 0, ones(0.1))
    puller.join(10)
    assert got["p"].step == 1 and got["p"].version == 3


def test_job_lifecycle_events_and_listing(server):
    rig = make_rig(server.port, spec(steps=2))
    for step in range(2):
        rig.pull(0, step)
        rig.push(0, step, ones(0.1))
    rig.ps.report(rig.workers[0], rig.job_id, "TRAINING", step=2, total_steps=2, loss=0.5, samples=10, seconds=1)
    rig.ps.report(rig.workers[0], rig.job_id, "FINISHED", step=2, total_steps=2)
    assert rig.jobs.get(rig.job_id).state is JobState.EVALUATING
    final = rig.ps.pull(rig.job_id, rig.workers[0], 0, True, lambda n: torch.empty(n, dtype=torch.uint8))
    assert final.version == 2
    rig.ps.report(rig.workers[0], rig.job_id, "EVALUATED", metrics={"test_accuracy": 0.97})
    events = list(rig.jobs.watch(rig.job_id, timeout_s=10))
    states = [e.job.state for e in events if e.kind == "state"]
    assert states == [JobState.RUNNING, JobState.EVALUATING, JobState.SUCCEEDED]
    assert [e.seq for e in events] == list(range(len(events)))
    last = events[-1].job
    assert last.metrics == {"test_accuracy": 0.97} and last.total_steps == 2 and last.loss == 0.5
    assert [j.job_id for j in rig.jobs.list()] == [rig.job_id]


def test_cancel_wakes_waiting_pulls_and_frees_workers(server):
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    rig.push(0, 0, ones(1.0))
    got = {}
    puller = threading.Thread(target=lambda: got.update(p=rig.pull(0, 1)))
    puller.start()
    assert rig.jobs.cancel(rig.job_id).state is JobState.CANCELLED
    puller.join(10)
    assert got["p"].state is JobState.CANCELLED and got["p"].layout is None
    with pytest.raises(JobNotRunning):
        rig.push(1, 0, ones(1.0))
    # the workers are idle again: a new job gets them
    second = rig.jobs.submit(spec(num_workers=2))
    assignment = wait_until(lambda: rig.ps.heartbeat(rig.workers[0], rig.job_id)[0])
    assert assignment.job_id == second.job_id


def test_a_failing_worker_fails_the_job(server):
    rig = make_rig(server.port)
    rig.ps.report(rig.workers[0], rig.job_id, "FAILED", error="ImportError: no module named foo")
    info = rig.jobs.get(rig.job_id)
    assert info.state is JobState.FAILED and "no module named foo" in info.error


def test_jobs_wait_for_enough_workers(server):
    rig = make_rig(server.port)
    pending = rig.jobs.submit(spec(num_workers=3))
    assert rig.jobs.get(pending.job_id).state is JobState.PENDING


def test_two_jobs_live_side_by_side(server):
    a = make_rig(server.port, spec(optimizer=OptimizerSpec("sgd", lr=1.0)))
    b = make_rig(server.port, spec(optimizer=OptimizerSpec("adam", lr=0.1)))
    a0, b0 = a.params(), b.params()
    a.push(0, 0, ones(0.5))
    assert torch.equal(b.params()["w"], b0["w"]) and a.version() == 1 and b.version() == 0
    torch.testing.assert_close(a.params()["w"], a0["w"] - 0.5)


def test_health_service_reports_serving(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "psgrid.v1.ParameterServer", "psgrid.v1.JobService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_model_larger_than_grpc_message_limit_moves_in_chunks(server):
    big = {"w": torch.randn(3 * 2**20), "b": torch.randn(10)}  # 12 MiB > 4 MiB default limit
    rig = make_rig(server.port, params=big)
    fetched = rig.params()
    assert torch.equal(fetched["w"], big["w"]) and torch.equal(fetched["b"], big["b"])
    rig.push(0, 0, {"w": torch.ones(3 * 2**20), "b": torch.ones(10)})
    torch.testing.assert_close(rig.params()["w"], big["w"] - 0.5)


def test_a_silent_worker_leaves_the_barrier_and_rejoins(server_factory):
    server = server_factory(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.4)
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    rig.push(0, 0, ones(1.0))
    # worker 1 goes silent: worker 0 keeps beating; the barrier drops worker 1 and round 0
    # starts again, worker 0 covering worker 1's data too (a round never leaves a rank out)
    wait_until(lambda: rig.ps.heartbeat(rig.workers[0], rig.job_id) and server.core.job(rig.job_id).lost,
               timeout=10, message="the barrier to drop the silent worker")
    again = rig.pull(0, 0)
    assert (again.clock, again.ranks, rig.version()) == (0, (0, 1), 0)
    with pytest.raises(PushAhead):  # computed on its own rank only: not what the round needs now
        rig.push(0, 0, ones(1.0))
    rig.push(0, 0, ones(1.0), ranks=(0, 1))
    assert rig.version() == 1
    rig.pull(0, 1)
    # worker 1 comes back: it skips ahead to the global step and the barrier waits for it again
    back = rig.pull(1, 0)
    assert back.clock == 1
    rig.push(0, 1, ones(1.0))
    assert rig.version() == 1
    rig.push(1, 1, ones(1.0))
    assert rig.version() == 2


def test_a_restarted_worker_takes_back_its_rank_and_clock(server):
    rig = make_rig(server.port, spec(num_workers=2, staleness=None))
    rig.push(1, 0, ones(0.1))
    rig.push(1, 1, ones(0.1))
    new_id, _ = rig.ps.register(rig.names[1], "localhost", 2, "cpu")  # worker 1, restarted
    assignment = rig.ps.heartbeat(new_id, "")[0]
    assert (assignment.job_id, assignment.rank, assignment.start_step) == (rig.job_id, 1, 2)
    with pytest.raises(Exception) as old:
        rig.push(1, 2, ones(0.1))  # the old incarnation is gone
    assert type(old.value).__name__ == "UnknownWorker"
    rig.workers[1] = new_id
    v, dup = rig.push(1, 2, ones(0.1))
    assert not dup and v == 3


def test_a_gone_workers_data_shard_is_covered_by_the_others(server_factory):
    server = server_factory(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.4)
    rig = make_rig(server.port, spec(num_workers=3, staleness=0))
    assert rig.pull(0, 0).ranks == (0,)
    # worker 2 goes silent; workers 0 and 1 keep beating until it is dropped
    wait_until(lambda: [rig.ps.heartbeat(w, rig.job_id) for w in rig.workers[:2]]
               and server.core.job(rig.job_id).lost, timeout=10, message="worker 2 to be dropped")
    covers = {rig.pull(0, 0).ranks, rig.pull(1, 0).ranks}
    assert covers == {(0, 2), (1,)}
    # BSP weights each gradient by its examples: 2 shards' worth from worker 0, 1 from worker 1
    start = rig.params()
    for worker, value, samples, ranks in ((0, 3.0, 64, (0, 2)), (1, 0.0, 32, (1,))):
        header = push_header(rig.job_id, rig.workers[worker], 0, 0, 0, rig.layout, ranks=ranks)
        header.samples = samples
        rig.ps.push(header, rig.layout.pack(ones(value)))
    torch.testing.assert_close(rig.params()["w"], start["w"] - 0.5 * 2.0, rtol=0, atol=1e-6)
    # back again: everyone covers only its own shard
    rig.pull(2, 1)
    assert rig.pull(0, 1).ranks == (0,)


def test_a_partition_barrier_waits_for_workers_that_have_not_joined_yet(server):
    from psgrid.codec import Layout
    from psgrid.worker.ps_client import ParameterServerClient

    ps = ParameterServerClient(f"127.0.0.1:{server.port}", timeout_s=10, retry_for_s=0)
    first, _ = ps.register("part-a", "localhost", 1, "cpu")
    ps.open_partition("job-shard1", spec(num_workers=2, staleness=0), ["part-a", "part-b"], 1, 2)
    layout = Layout.of([("w", torch.float32, (4, 3)), ("b", torch.float32, (4,))])
    ps.push(push_header("job-shard1", first, 0, 0, 0, layout, init=True), layout.pack(ones(0.0)))
    assert ps.push(push_header("job-shard1", first, 0, 0, 0, layout), layout.pack(ones(1.0))) == (1, False)
    job = server.core.job("job-shard1")
    assert job.store.version == 0  # part-b has not joined: the round waits for it
    second, _ = ps.register("part-b", "localhost", 2, "cpu")
    assert ps.push(push_header("job-shard1", second, 0, 0, 0, layout), layout.pack(ones(3.0))) == (1, False)
    assert job.store.version == 1
    torch.testing.assert_close(job.store.params["w"], torch.full((4, 3), -0.5 * 2.0))
