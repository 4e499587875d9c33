"""Server memory: a push leaves nothing behind on its job, and finished jobs are released.

The update log is the record of pushes (a file, each line marked with the
shard that wrote it); a finished job stays whole in memory while it is one of
the newest ``keep_finished_jobs``, then only its summary does, and its weights
and history come from its last checkpoint when there is a checkpoint directory.
"""
from __future__ import annotations

import json
import time
from collections import deque

import pytest
import torch

from psgrid.errors import UnknownJob
from psgrid.spec import JobState

from helpers.inproc import make_rig, small_params, spec
from helpers.wait import wait_until

pytestmark = pytest.mark.timeout(60)

#: Short heartbeats: a finished job may be released this long after it ended,
#: and the workers of one job are no longer idle candidates for the next.
FAST = dict(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3)

UPDATE_FIELDS = {"event", "shard", "job_id", "worker_id", "worker_name", "seq", "base_version", "base_step",
                 "staleness", "version", "time_unix"}


def grads(v: float):
    return {"w": torch.full((4, 3), v), "b": torch.full((4,), v)}


def container_sizes(job) -> dict[str, int]:
    """The length of every list, deque, dict and set the job holds."""
    return {name: len(value) for name, value in vars(job).items()
            if isinstance(value, (list, deque, dict, set))}


def test_pushes_leave_no_per_push_record_on_the_job(server_factory, tmp_path):
    app = server_factory(update_log=str(tmp_path / "updates.jsonl"))
    rig = make_rig(app.port, spec(num_workers=2, staleness=None))
    for seq in range(10):
        rig.push(0, seq, grads(0.01))
        rig.push(1, seq, grads(0.01))
    job = app.core.job(rig.job_id)
    before = container_sizes(job)
    for seq in range(10, 210):
        rig.push(0, seq, grads(0.01))
        rig.push(1, seq, grads(0.01))
    assert rig.version() == 420
    assert container_sizes(job) == before, "a push must not grow any per-job collection"
    assert len((tmp_path / "updates.jsonl").read_text().splitlines()) == 420  # the log has them all


def test_update_log_lines_name_the_shard_that_wrote_them(server_factory, tmp_path):
    log = tmp_path / "updates.ps-b.jsonl"
    app = server_factory(update_log=str(log), shard_name="ps-b")
    rig = make_rig(app.port, spec(num_workers=2, staleness=None))
    for seq in range(3):
        rig.push(0, seq, grads(0.1), base_step=seq)
        rig.push(1, seq, grads(0.1), base_step=seq)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 6 and all(set(line) == UPDATE_FIELDS for line in lines)
    assert {line["shard"] for line in lines} == {"ps-b"}
    assert [(line["worker_name"], line["seq"], line["version"]) for line in lines] == [
        (rig.names[w], seq, 2 * seq + w + 1) for seq in range(3) for w in (0, 1)]


def run_and_cancel(port: int, seed: int):
    """One short job: initialised, one step, cancelled; its rig and weights."""
    rig = make_rig(port, spec(num_workers=1), params=small_params(seed))
    rig.push(0, 0, grads(0.1))
    rig.ps.report(rig.workers[0], rig.job_id, "TRAINING", step=1, total_steps=100, loss=0.5, samples=4,
                  seconds=0.1)
    weights = rig.params()
    assert rig.jobs.cancel(rig.job_id).state is JobState.CANCELLED
    time.sleep(FAST["heartbeat_timeout_s"] + 0.05)  # its worker falls silent: not a candidate for the next
    return rig, weights


def assert_weights(rig, job_id: str, expected: dict[str, torch.Tensor]) -> None:
    pulled = rig.jobs.fetch(job_id)
    got = pulled.layout.views(pulled.buffer)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_finished_jobs_beyond_the_count_are_released_and_the_newest_stay_fetchable(server_factory):
    app = server_factory(keep_finished_jobs=2, **FAST)
    runs = [run_and_cancel(app.port, seed) for seed in range(4)]
    ids = [rig.job_id for rig, _ in runs]
    state = app.core.state
    wait_until(lambda: not set(ids[:2]) & set(state.jobs), 10, message="the two oldest to be released")
    assert set(ids[2:]) <= set(state.jobs)
    jobs = runs[-1][0].jobs
    for rig, weights in runs[2:]:
        assert_weights(rig, rig.job_id, weights)
        assert [row.loss for row in jobs.history(rig.job_id)] == [0.5]
    for job_id in ids[:2]:
        assert jobs.get(job_id).state is JobState.CANCELLED  # answered from its summary
        assert jobs.cancel(job_id).state is JobState.CANCELLED
        assert [e.job.state for e in jobs.watch(job_id, timeout_s=5)] == [JobState.CANCELLED]
        with pytest.raises(UnknownJob, match="released from this server's memory"):
            jobs.fetch(job_id)
        with pytest.raises(UnknownJob, match="released"):
            jobs.history(job_id)
    listed = [info.job_id for info in jobs.list()]
    assert [i for i in listed if i in ids] == ids
    with pytest.raises(UnknownJob, match="no job"):
        jobs.get("job-0123456789")
    assert len(state.ended) == 2  # only the finished jobs still held are followed


def test_a_finished_job_is_released_after_its_time(server_factory):
    app = server_factory(keep_finished_jobs=100, finished_job_ttl_s=0.5, **FAST)
    rig, _ = run_and_cancel(app.port, 0)
    assert rig.job_id in app.core.state.jobs  # not yet: younger than its time
    wait_until(lambda: rig.job_id not in app.core.state.jobs, 10, message="the job to be released")
    assert rig.jobs.get(rig.job_id).state is JobState.CANCELLED


def test_a_released_job_is_read_back_from_its_final_checkpoint(server_factory, tmp_path):
    config = dict(checkpoint_dir=str(tmp_path / "ckpt"), keep_finished_jobs=0, **FAST)
    first = server_factory(**config)
    rig, weights = run_and_cancel(first.port, 3)
    wait_until(lambda: rig.job_id not in first.core.state.jobs, 10, message="the job to be released")
    assert_weights(rig, rig.job_id, weights)
    assert [row.loss for row in rig.jobs.history(rig.job_id)] == [0.5]
    first.stop(grace=0.5)

    second = server_factory(**config)  # restores the finished job, then releases it again
    wait_until(lambda: rig.job_id not in second.core.state.jobs, 10, message="the restored job to be released")
    rig.jobs = rig.jobs.__class__(f"127.0.0.1:{second.port}", timeout_s=10, retry_for_s=0)
    assert rig.jobs.get(rig.job_id).state is JobState.CANCELLED
    assert_weights(rig, rig.job_id, weights)
