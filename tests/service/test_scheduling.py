"""Scheduling pending jobs: each says why it waits, younger jobs backfill idle workers,
and a job that waited past ``reserve_after_s`` reserves the next free ones (no starvation)."""
from __future__ import annotations

import pytest

from psgrid.client.job_client import JobServiceClient
from psgrid.errors import FailedPrecondition
from psgrid.server.scheduler import waiting_reason
from psgrid.spec import JobState
from psgrid.worker.ps_client import ParameterServerClient

from helpers.inproc import spec
from helpers.wait import wait_until


class Cluster:
    """Registered workers (real RegisterWorker/Heartbeat calls) and a job client."""

    def __init__(self, port: int, workers: int):
        address = f"127.0.0.1:{port}"
        self.ps = ParameterServerClient(address, timeout_s=10, retry_for_s=0)
        self.jobs = JobServiceClient(address, timeout_s=10, retry_for_s=0)
        self.workers = [self.add(f"w{i}") for i in range(workers)]

    def add(self, name: str) -> str:
        return self.ps.register(name, "localhost", 1, "cpu")[0]

    def submit(self, num_workers: int) -> str:
        return self.jobs.submit(spec(num_workers=num_workers)).job_id

    def info(self, job_id: str):
        return self.jobs.get(job_id)

    def on(self, job_id: str) -> set[str]:
        """The workers a beat hands ``job_id`` to (a beat also runs the scheduler)."""
        return {w for w in self.workers if (a := self.ps.heartbeat(w, "")[0]) is not None and a.job_id == job_id}

    def running(self, job_id: str) -> bool:
        self.on(job_id)
        return self.info(job_id).state is JobState.RUNNING


@pytest.mark.parametrize("need,live,idle,said", [
    (5, 2, 2, "needs 5 workers, 2 are alive"),
    (1, 0, 0, "needs 1 worker, none is alive"),
    (3, 1, 1, "needs 3 workers, 1 is alive"),
    (3, 4, 1, "needs 3 workers, 1 of the 4 alive is free"),
    (2, 3, 0, "needs 2 workers, 0 of the 3 alive are free"),
])
def test_the_reason_names_what_is_missing(need, live, idle, said):
    assert waiting_reason(need, live, idle) == said


def test_a_job_too_big_says_why_and_a_later_one_that_fits_runs_meanwhile(server_factory):
    c = Cluster(server_factory(reserve_after_s=3600).port, workers=2)
    big = c.submit(3)
    assert c.info(big).state is JobState.PENDING and c.info(big).waiting == "needs 3 workers, 2 are alive"
    small = c.submit(2)
    wait_until(lambda: c.running(small), 10, message="the small job runs beside the waiting big one")
    assert c.info(small).waiting == ""
    c.workers.append(c.add("w2"))  # a third worker arrives: now the big one could run once the small ends
    wait_until(lambda: c.info(big).waiting == "needs 3 workers, 1 of the 3 alive is free", 10,
               message="the reason follows the cluster")
    c.jobs.cancel(small)
    wait_until(lambda: c.running(big), 10, message="the big job starts when its workers are free")
    assert c.on(big) == set(c.workers) and c.info(big).waiting == ""


def test_a_job_that_waited_long_enough_reserves_the_next_free_workers(server_factory):
    """Backfill until the big job's wait passes reserve_after_s; then nothing younger starts
    before it, so freed workers go to it and it runs."""
    c = Cluster(server_factory(reserve_after_s=1.0, heartbeat_interval_s=0.2).port, workers=3)
    first = c.submit(2)
    wait_until(lambda: c.running(first), 10, message="the first job runs")
    big = c.submit(3)
    filler = c.submit(1)
    wait_until(lambda: c.running(filler), 10, message="a young big job lets a small one backfill")
    late = c.submit(1)
    assert c.info(late).waiting == "needs 1 worker, 0 of the 3 alive are free"
    wait_until(lambda: c.info(late).waiting.startswith(f"waits behind {big}"), 10,
               message="once the big job waited 1 s, it reserves the workers")
    c.jobs.cancel(filler)  # a worker frees up: it is the big job's now, not the late small one's
    c.on(late)
    assert c.info(late).state is JobState.PENDING
    c.jobs.cancel(first)
    wait_until(lambda: c.running(big), 10, message="the big job runs on the workers it reserved")
    assert c.info(late).state is JobState.PENDING
    assert c.info(late).waiting == "needs 1 worker, 0 of the 3 alive are free"


def test_a_job_bigger_than_the_cluster_never_reserves(server_factory):
    c = Cluster(server_factory(reserve_after_s=0).port, workers=2)
    huge = c.submit(5)
    small = c.submit(1)
    wait_until(lambda: c.running(small), 10, message="a job that can never fit holds nothing up")
    assert c.info(huge).waiting == "needs 5 workers, 2 are alive"


def test_a_shard_refuses_a_job_submitted_to_it_and_names_the_coordinator(server_factory):
    shard = server_factory(shard_name="shard-1")
    jobs = JobServiceClient(f"127.0.0.1:{shard.port}", timeout_s=10, retry_for_s=0)
    with pytest.raises(FailedPrecondition, match="submit jobs to its coordinator"):
        jobs.submit(spec())
    assert jobs.list() == []
