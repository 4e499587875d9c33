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
from psgrid.errors import FailedPrecondition, PushAhead, UnknownCheckpoint
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

    def roll_back(self, step: int, timeline: int):
        at = {p[0]: p for p in self.points().points}
        point = at.get(step, (step, ""))
        return self.ps.roll_back(JOB, self.workers[1], point, timeline)

    def pull(self, worker: int, clock: int):
        return self.ps.pull(JOB, self.workers[worker], clock, False, lambda n: torch.empty(n, dtype=torch.uint8))


def test_a_shard_goes_back_to_an_aligned_step_and_replays_it_exactly(server_factory, tmp_path):
    shard = Shard(server_factory(checkpoint_dir=str(tmp_path), checkpoint_every_steps=10))
    shard.rounds(10)
    at_10 = shard.params()
    shard.rounds(15)
    at_25 = shard.params()
    # aligned steps only: 0, 10, 20 (the newest two also in memory); never 25
    where = shard.points()
    assert (where.step, where.timeline) == (25, 0)
    assert [step for step, _ in where.points] == [0, 10, 20]
    store = CheckpointStore(tmp_path)
    # step 20's snapshot is written to disk in the background
    wait_until(lambda: sorted(m["global_step"] for _, m in store.manifests(JOB)) == [0, 10, 20], 10,
               message="the snapshots of steps 0, 10 and 20 on disk")

    assert shard.roll_back(10, timeline=0) == (10, True)
    assert all(torch.equal(shard.params()[k], at_10[k]) for k in at_10)
    assert shard.jobs.get(JOB).step == 10 and shard.points().timeline == 1
    # the abandoned history's checkpoint (step 20) is gone; a caller that saw timeline 0 changes nothing
    assert sorted(m["global_step"] for _, m in store.manifests(JOB)) == [0, 10]
    assert shard.roll_back(0, timeline=0) == (10, False)

    # every worker's clock went back with it: step 9 is a duplicate, step 10 is next
    header = push_header(JOB, shard.workers[0], 9, 0, 9, shard.layout)
    assert shard.ps.push(header, shard.layout.pack(grads(9, 0)))[1] is True
    shard.step = 10
    shard.rounds(15)
    assert all(torch.equal(shard.params()[k], at_25[k]) for k in at_25), "the replay is bit-exact"
    assert shard.points().lineage == where.lineage, "the same workers contributed to the same rounds"


def test_without_a_checkpoint_directory_the_newest_two_aligned_steps_are_kept_in_memory(server_factory):
    shard = Shard(server_factory(checkpoint_every_steps=2))
    shard.rounds(5)
    assert [step for step, _ in shard.points().points] == [2, 4]
    assert shard.roll_back(2, timeline=0) == (2, True)
    assert [step for step, _ in shard.points().points] == [2]


def test_a_roll_back_to_a_snapshot_the_shard_does_not_hold_is_refused_and_changes_nothing(server_factory, tmp_path):
    shard = Shard(server_factory(checkpoint_dir=str(tmp_path), checkpoint_every_steps=4))
    shard.rounds(6)
    before = shard.params()
    with pytest.raises(UnknownCheckpoint):
        shard.roll_back(3, timeline=0)
    with pytest.raises(UnknownCheckpoint):  # the right step of another history
        shard.ps.roll_back(JOB, shard.workers[0], (4, "not-this-lineage"), 0)
    assert shard.jobs.get(JOB).step == 6 and shard.points().timeline == 0
    assert all(torch.equal(shard.params()[k], before[k]) for k in before)


def test_only_synchronous_jobs_are_rolled_back(server):
    shard = Shard(server, staleness=None)
    with pytest.raises(FailedPrecondition):
        shard.roll_back(0, timeline=0)


def test_a_pull_beyond_what_the_server_holds_is_answered_at_once_with_its_clock(server):
    shard = Shard(server)
    shard.rounds(2)
    # a worker that pushed 7 steps to a shard that (restored) only has 2 of them
    pulled = shard.pull(0, 7)
    assert (pulled.step, pulled.clock) == (2, 2)


def test_shards_that_dropped_different_workers_differ_in_lineage_and_meet_again_at_a_snapshot(server_factory):
    from psgrid.codec import Pulled  # noqa: F401 - the type diverged() reads
    from psgrid.worker.shards import diverged

    kept, dropped = Shard(server_factory()), Shard(server_factory())
    kept.rounds(1)
    # the other shard declares worker b gone during round 1: the round starts again and
    # a computes it covering b's rank too (a push for its own rank alone is refused)
    job = dropped.app.core.job(JOB)
    dropped.rounds(1)
    with job.cond:
        job.worker_lost(dropped.workers[1])
    with pytest.raises(PushAhead):
        dropped.ps.push(push_header(JOB, dropped.workers[0], 1, 0, 1, dropped.layout),
                        dropped.layout.pack(grads(1, 0)))
    dropped.ps.push(push_header(JOB, dropped.workers[0], 1, 0, 1, dropped.layout, ranks=(0, 1)),
                    dropped.layout.pack(grads(1, 0)))
    # b's late push for round 1 does not count towards round 2: it rejoins, and it is a duplicate
    late = push_header(JOB, dropped.workers[1], 1, 0, 1, dropped.layout)
    assert dropped.ps.push(late, dropped.layout.pack(grads(1, 1)))[1] is True
    kept.rounds(1)
    a, b = kept.pull(0, 2), dropped.pull(0, 2)
    assert a.step == b.step == 2 and a.lineage != b.lineage
    assert diverged([a, b], synchronous=True)
    # both hold step 0 of the same lineage: put both back there and they agree again
    common = set(kept.points().points) & set(dropped.points().points)
    assert max(common)[0] == 0
    for shard in (kept, dropped):
        assert shard.ps.roll_back(JOB, shard.workers[0], max(common), shard.points().timeline) == (0, True)
    assert not diverged([kept.pull(0, 0), dropped.pull(0, 0)], synchronous=True)


def test_without_checkpoints_only_the_aligned_steps_in_memory_can_be_gone_back_to(server_factory):
    from helpers.inproc import make_rig

    from psgrid.spec import JobState

    coordinator = server_factory(shards=("127.0.0.1:9",), checkpoint_every_steps=1)  # a shard never dialled here
    rig = make_rig(coordinator.port, spec(num_workers=1, staleness=0, steps=4))
    for step in range(4):
        rig.push(0, step, grads(step, 0))
    rig.ps.report(rig.workers[0], rig.job_id, "FINISHED", step=4, total_steps=4)
    assert rig.jobs.get(rig.job_id).state is JobState.EVALUATING
    where = rig.ps.restore_points(rig.job_id, rig.workers[0])
    assert [step for step, _ in where.points] == [3, 4]
    with pytest.raises(UnknownCheckpoint):
        rig.ps.roll_back(rig.job_id, rig.workers[0], (2, ""), where.timeline)
    assert rig.jobs.get(rig.job_id).state is JobState.EVALUATING


def test_a_coordinator_with_checkpoints_put_back_while_evaluating_trains_again(server_factory, tmp_path):
    from helpers.inproc import make_rig

    from psgrid.spec import JobState

    coordinator = server_factory(shards=("127.0.0.1:9",), checkpoint_every_steps=2, checkpoint_dir=str(tmp_path))
    rig = make_rig(coordinator.port, spec(num_workers=1, staleness=0, steps=4))
    for step in range(4):
        rig.push(0, step, grads(step, 0))
    rig.ps.report(rig.workers[0], rig.job_id, "FINISHED", step=4, total_steps=4)
    point = wait_until(lambda: next((p for p in rig.ps.restore_points(rig.job_id, rig.workers[0]).points
                                     if p[0] == 2), None), 10, message="the checkpoint of step 2 on disk")
    assert rig.ps.roll_back(rig.job_id, rig.workers[0], point, 0) == (2, True)
    info = rig.jobs.get(rig.job_id)
    assert (info.state, info.step) == (JobState.RUNNING, 2)
    final = rig.ps.pull(rig.job_id, rig.workers[0], 4, True, lambda n: torch.empty(n, dtype=torch.uint8), wait_s=5)
    assert final.layout is None and (final.state, final.clock) == (JobState.RUNNING, 2)  # train again from 2


def test_a_push_that_reached_one_shard_only_shows_as_drift_and_both_go_back(server_factory):
    from psgrid.worker.shards import diverged

    a, b = Shard(server_factory()), Shard(server_factory())
    a.rounds(1)
    b.rounds(1)
    # worker 0 pushes step 1 to shard b only (then, say, it crashed); worker 1 pushes step 1 to both
    b.ps.push(push_header(JOB, b.workers[0], 1, 0, 1, b.layout), b.layout.pack(grads(1, 0)))
    for shard in (a, b):
        shard.ps.push(push_header(JOB, shard.workers[1], 1, 0, 1, shard.layout), shard.layout.pack(grads(1, 1)))
    first, second = a.pull(0, 1), b.pull(0, 1)
    assert (first.step, first.clock) == (1, 1) and (second.step, second.clock) == (2, 2)
    assert diverged([first, second], synchronous=True)
    for shard in (a, b):
        at = shard.points()
        assert shard.ps.roll_back(JOB, shard.workers[0], max(at.points), at.timeline) == (0, True)
    assert not diverged([a.pull(0, 0), b.pull(0, 0)], synchronous=True)
