"""Putting a sharded BSP job's shard back to an earlier step: restore points and RollBack.

One shard (a partition opened as a worker opens it) driven through the real
gRPC client: step-aligned snapshots in memory and on disk, the compare-and-set
roll-back, what it deletes and what it refuses (leaving the job unchanged).
"""
from __future__ import annotations

import pytest
import torch

from psgrid.client.job_client import JobServiceClient
from psgrid.codec import Layout
from psgrid.errors import FailedPrecondition, UnknownCheckpoint
from psgrid.server.checkpoint import CheckpointStore
from psgrid.spec import OptimizerSpec
from psgrid.worker.ps_client import ParameterServerClient, push_header

from helpers.inproc import small_params, spec
from helpers.wait import wait_until

JOB = "job-part1"


def grads(step: int, worker: int):
    g = torch.Generator().manual_seed(1000 * worker + step)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}


class Shard:
    """A partition of a two-worker BSP job on ``app``, initialised, at step 0."""

    def __init__(self, app, staleness=0):
        address = f"127.0.0.1:{app.port}"
        self.app = app
        self.ps = ParameterServerClient(address, timeout_s=10, retry_for_s=0)
        self.jobs = JobServiceClient(address, timeout_s=10, retry_for_s=0)
        self.workers = [self.ps.register(n, "localhost", 1, "cpu")[0] for n in ("a", "b")]
        job_spec = spec(num_workers=2, staleness=staleness, optimizer=OptimizerSpec("adam", lr=0.05))
        self.ps.open_partition(JOB, job_spec, ["a", "b"], 1, 2)
        params = small_params()
        self.layout = Layout.of_tensors(params.items())
        self.ps.push(push_header(JOB, self.workers[0], 0, 0, 0, self.layout, init=True), self.layout.pack(params))
        self.step = 0

    def rounds(self, n: int) -> None:
        for _ in range(n):
            for w, worker in enumerate(self.workers):
                header = push_header(JOB, worker, self.step, 0, self.step, self.layout)
                self.ps.push(header, self.layout.pack(grads(self.step, w)))
            self.step += 1

    def params(self) -> dict[str, torch.Tensor]:
        pulled = self.jobs.fetch(JOB)
        return {k: v.clone() for k, v in pulled.layout.views(pulled.buffer).items()}

    def points(self):
        return self.ps.restore_points(JOB, self.workers[0])

    def roll_back(self, step: int, expect: int):
        return self.ps.roll_back(JOB, self.workers[1], step, expect)


def test_a_shard_goes_back_to_an_aligned_step_and_replays_it_exactly(server_factory, tmp_path):
    shard = Shard(server_factory(checkpoint_dir=str(tmp_path), checkpoint_every_steps=10))
    shard.rounds(10)
    at_10 = shard.params()
    shard.rounds(15)
    at_25 = shard.params()
    # aligned steps only: 0, 10, 20 (the newest also in memory); never 25
    assert shard.points() == (25, [0, 10, 20])
    store = CheckpointStore(tmp_path)
    assert sorted(m["global_step"] for _, m in store.manifests(JOB)) == [0, 10, 20]

    assert shard.roll_back(10, expect=24) == (25, False)  # someone else moved it: nothing happens
    assert torch.equal(shard.params()["w"], at_25["w"])
    assert shard.roll_back(10, expect=25) == (10, True)
    assert all(torch.equal(shard.params()[k], at_10[k]) for k in at_10)
    assert shard.jobs.get(JOB).step == 10
    # the abandoned timeline's checkpoint (step 20) is gone; a second caller changes nothing
    assert sorted(m["global_step"] for _, m in store.manifests(JOB)) == [0, 10]
    assert shard.roll_back(10, expect=25) == (10, False)

    # every worker's clock went back with it: step 9 is a duplicate, step 10 is next
    header = push_header(JOB, shard.workers[0], 9, 0, 9, shard.layout)
    assert shard.ps.push(header, shard.layout.pack(grads(9, 0)))[1] is True
    shard.step = 10
    shard.rounds(15)
    assert all(torch.equal(shard.params()[k], at_25[k]) for k in at_25), "the replay is bit-exact"


def test_without_a_checkpoint_directory_the_newest_aligned_step_is_kept_in_memory(server):
    shard = Shard(server)  # checkpoint_every_steps: the default 100
    shard.rounds(3)
    at_0 = shard.points()
    assert at_0 == (3, [0])
    assert shard.roll_back(0, expect=3) == (0, True)
    assert shard.points() == (0, [0])


def test_a_roll_back_to_a_step_the_shard_does_not_hold_is_refused_and_changes_nothing(server_factory, tmp_path):
    shard = Shard(server_factory(checkpoint_dir=str(tmp_path), checkpoint_every_steps=4))
    shard.rounds(6)
    before = shard.params()
    with pytest.raises(UnknownCheckpoint):
        shard.roll_back(3, expect=6)
    assert shard.jobs.get(JOB).step == 6
    assert all(torch.equal(shard.params()[k], before[k]) for k in before)


def test_only_synchronous_jobs_are_rolled_back(server):
    shard = Shard(server, staleness=None)
    with pytest.raises(FailedPrecondition):
        shard.roll_back(0, expect=0 + 1)


def test_a_pull_beyond_what_the_server_holds_is_answered_at_once_with_its_clock(server):
    shard = Shard(server)
    shard.rounds(2)
    # a worker that pushed 7 steps to a shard that (restored) only has 2 of them
    pulled = shard.ps.pull(JOB, shard.workers[0], 7, False, lambda n: torch.empty(n, dtype=torch.uint8))
    assert (pulled.step, pulled.clock) == (2, 2)


def test_without_checkpoints_only_the_newest_aligned_step_can_be_gone_back_to(server_factory):
    from helpers.inproc import make_rig

    from psgrid.spec import JobState

    coordinator = server_factory(shards=("127.0.0.1:9",), checkpoint_every_steps=2)  # a shard never dialled here
    rig = make_rig(coordinator.port, spec(num_workers=1, staleness=0, steps=4))
    for step in range(4):
        rig.push(0, step, grads(step, 0))
    rig.ps.report(rig.workers[0], rig.job_id, "FINISHED", step=4, total_steps=4)
    assert rig.jobs.get(rig.job_id).state is JobState.EVALUATING
    assert rig.ps.restore_points(rig.job_id, rig.workers[0]) == (4, [4])  # the newest, in memory

    with pytest.raises(UnknownCheckpoint):  # step 2 went with the memory snapshot of step 4
        rig.ps.roll_back(rig.job_id, rig.workers[0], 2, 4)
    assert rig.jobs.get(rig.job_id).state is JobState.EVALUATING


def test_a_coordinator_with_checkpoints_put_back_while_evaluating_trains_again(server_factory, tmp_path):
    from helpers.inproc import make_rig

    from psgrid.spec import JobState

    coordinator = server_factory(shards=("127.0.0.1:9",), checkpoint_every_steps=2, checkpoint_dir=str(tmp_path))
    rig = make_rig(coordinator.port, spec(num_workers=1, staleness=0, steps=4))
    for step in range(4):
        rig.push(0, step, grads(step, 0))
    rig.ps.report(rig.workers[0], rig.job_id, "FINISHED", step=4, total_steps=4)
    wait_until(lambda: 2 in rig.ps.restore_points(rig.job_id, rig.workers[0])[1], 10,
               message="the checkpoint of step 2 on disk")
    assert rig.ps.roll_back(rig.job_id, rig.workers[0], 2, 4) == (2, True)
    info = rig.jobs.get(rig.job_id)
    assert (info.state, info.step) == (JobState.RUNNING, 2)
    final = rig.ps.pull(rig.job_id, rig.workers[0], 4, True, lambda n: torch.empty(n, dtype=torch.uint8), wait_s=5)
    assert final.layout is None and (final.state, final.clock) == (JobState.RUNNING, 2)  # train again from 2
