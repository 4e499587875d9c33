"""A bad checkpoint never stops a server from starting, nor is trusted later (issue 12, item 6).

Whatever is wrong with a checkpoint (nesting too deep to parse, a manifest
whose checksums verify but whose meta is empty or malformed), the server logs
it and restores the job from the one before; a restored job whose spec is
outside ``--allow-modules`` is not restored at all. ``psgrid serve
--checkpoint-dir`` reads checkpoints the same way, and so does every other
path that reads one: a sharded job's roll-back to a snapshot on disk, and a
released job's weights and history.
"""
from __future__ import annotations

import json
import logging
import pathlib

import pytest
import torch

from psgrid import checkpoints
from psgrid.errors import UnknownCheckpoint, UnknownJob
from psgrid.inference.models import Candidate
from psgrid.inference.sources import CheckpointSource, Unusable
from psgrid.spec import JobState

from helpers.inproc import make_rig, spec
from helpers.wait import wait_until


def grads(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.full((4,), value)}


def two_checkpoints(server_factory, directory: pathlib.Path) -> tuple[str, dict[int, int]]:
    """A job checkpointed at two versions; its id and {seq: version} of its checkpoints."""
    server = server_factory(checkpoint_dir=str(directory), checkpoint_interval_s=3600)
    rig = make_rig(server.port)
    for seq in range(2):
        rig.push(0, seq, grads(0.1))
        assert server.core.checkpoint() == 1
    server.stop(grace=1)
    found = checkpoints.CheckpointReader(directory).manifests(rig.job_id)
    return rig.job_id, {seq: meta["version"] for seq, meta in found}


def rewrite(path: pathlib.Path, change) -> None:
    """Apply ``change`` to a manifest's body and give it a valid checksum again."""
    manifest = json.loads(path.read_text())
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    change(body)
    path.write_text(json.dumps({**body, "checksum": checkpoints._manifest_checksum(body)}))


def _empty_meta(body):
    body["meta"] = {}


def _names_not_strings(body):
    body["meta"]["worker_names"] = [1]


def _bad_spec(body):
    body["meta"]["spec"] = json.dumps({"model": "psgrid.examples..models:mlp"})


def _history_not_rows(body):
    body["meta"]["history"] = [["x"]]


def _no_step(body):
    del body["meta"]["global_step"]


def _count_too_big(body):
    body["meta"]["version"] = 2**64


DAMAGE = {
    "nested 200,000 deep": lambda path: path.write_text("[" * 200_000 + "]" * 200_000),
    "meta {}": lambda path: rewrite(path, _empty_meta),
    "worker names not strings": lambda path: rewrite(path, _names_not_strings),
    "spec out of range": lambda path: rewrite(path, _bad_spec),
    "history rows malformed": lambda path: rewrite(path, _history_not_rows),
    "no global step": lambda path: rewrite(path, _no_step),
    "count out of range": lambda path: rewrite(path, _count_too_big),
}
#: Damage that leaves a manifest verifying, and its meta bad.
BAD_META = ["meta {}", "worker names not strings", "history rows malformed", "no global step", "count out of range"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_server_starts_from_the_checkpoint_before_a_bad_one(server_factory, tmp_path, caplog, damage):
    job_id, versions = two_checkpoints(server_factory, tmp_path)
    newest, older = sorted(versions, reverse=True)[:2]
    DAMAGE[damage](tmp_path / job_id / f"ckpt-{newest:08d}.json")
    with caplog.at_level(logging.WARNING):
        server = server_factory(checkpoint_dir=str(tmp_path))  # starts: no exception
    job = server.core.job(job_id)
    assert job.state is JobState.RUNNING and job.store.version == versions[older] == 1
    assert f"checkpoint {newest} skipped" in caplog.text
    # and still serving
    from psgrid.client.job_client import JobServiceClient

    assert JobServiceClient(f"127.0.0.1:{server.port}", timeout_s=10, retry_for_s=0).get(job_id).version == 1


def test_a_job_with_no_usable_checkpoint_is_left_out_and_the_server_starts(server_factory, tmp_path):
    job_id, versions = two_checkpoints(server_factory, tmp_path)
    for seq in versions:
        DAMAGE["meta {}"](tmp_path / job_id / f"ckpt-{seq:08d}.json")
    server = server_factory(checkpoint_dir=str(tmp_path))
    assert job_id not in server.core.state.jobs
    assert make_rig(server.port).version() == 0  # serving


def test_a_restored_spec_outside_the_allow_list_is_not_restored(server_factory, tmp_path, caplog):
    job_id, _ = two_checkpoints(server_factory, tmp_path)
    with caplog.at_level(logging.WARNING):
        server = server_factory(checkpoint_dir=str(tmp_path), allowed_modules=("elsewhere",))
    assert job_id not in server.core.state.jobs
    assert f"job {job_id} not restored" in caplog.text and "allow-list" in caplog.text


def test_serving_from_a_checkpoint_directory_skips_a_bad_checkpoint(server_factory, tmp_path):
    job_id, versions = two_checkpoints(server_factory, tmp_path)
    newest = max(versions)
    DAMAGE["nested 200,000 deep"](tmp_path / job_id / f"ckpt-{newest:08d}.json")
    found = CheckpointSource(tmp_path, job_id).poll()
    assert [type(item) for item in found] == [Candidate, Unusable]
    assert found[0].version == 1


def manifest_of(directory: pathlib.Path, job_id: str, step: int) -> pathlib.Path:
    """The manifest of the job's checkpoint of ``step``."""
    seq = next(seq for seq, meta in checkpoints.CheckpointReader(directory).manifests(job_id)
               if meta["global_step"] == step)
    return directory / job_id / f"ckpt-{seq:08d}.json"


@pytest.mark.parametrize("damage", BAD_META[1:])  # an empty meta is not even listed as aligned
def test_a_roll_back_to_a_snapshot_on_disk_with_a_bad_meta_is_refused_and_changes_nothing(
        server_factory, tmp_path, damage):
    coordinator = server_factory(shards=("127.0.0.1:9",), checkpoint_dir=str(tmp_path), checkpoint_every_steps=2,
                                 checkpoint_interval_s=3600)  # a shard never dialled here
    rig = make_rig(coordinator.port, spec(num_workers=1, staleness=0))

    def on_disk(step: int) -> bool:
        found = checkpoints.CheckpointReader(tmp_path).manifests(rig.job_id)
        return any(meta["global_step"] == step for _, meta in found)

    for step in range(7):
        rig.push(0, step, grads(0.1))
        if step == 2:  # else the saver may skip it for a newer one
            wait_until(lambda: on_disk(2), 10, message="the snapshot of step 2 on disk")
    # held on disk only: memory holds the newest two, 4 and 6
    point = next(p for p in rig.ps.restore_points(rig.job_id, rig.workers[0]).points if p[0] == 2)
    before = rig.params()
    DAMAGE[damage](manifest_of(tmp_path, rig.job_id, 2))

    with pytest.raises(UnknownCheckpoint):
        rig.ps.roll_back(rig.job_id, rig.workers[0], point, 0)
    where = rig.ps.restore_points(rig.job_id, rig.workers[0])
    steps = {step for step, _ in where.points}
    assert (where.step, where.timeline) == (7, 0) and 2 not in steps and {4, 6} <= steps  # no longer offered
    after = rig.params()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("damage", BAD_META)
def test_a_released_job_is_read_from_its_newest_checkpoint_with_a_good_meta(server_factory, tmp_path, damage):
    server = server_factory(checkpoint_dir=str(tmp_path), checkpoint_interval_s=3600, keep_finished_jobs=0,
                            heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0)
    rig = make_rig(server.port)
    rig.push(0, 0, grads(0.1))
    rig.ps.report(rig.workers[0], rig.job_id, "TRAINING", step=1, total_steps=100, loss=0.5, samples=4, seconds=0.1)
    assert server.core.checkpoint() == 1
    older = rig.params()
    rig.push(0, 1, grads(0.1))
    rig.ps.report(rig.workers[0], rig.job_id, "TRAINING", step=2, total_steps=100, loss=0.25, samples=4, seconds=0.1)
    rig.jobs.cancel(rig.job_id)  # checkpointed at once: version 2, two points of history
    wait_until(lambda: rig.job_id not in server.core.state.jobs, 10, message="the job to be released")
    (oldest, first), (newest, _) = checkpoints.CheckpointReader(tmp_path).manifests(rig.job_id)
    assert first["version"] == 1
    DAMAGE[damage](tmp_path / rig.job_id / f"ckpt-{newest:08d}.json")

    pulled = rig.jobs.fetch(rig.job_id)  # the one before, as a restart would restore
    assert pulled.version == 1 and all(torch.equal(pulled.layout.views(pulled.buffer)[k], older[k]) for k in older)
    assert [row.loss for row in rig.jobs.history(rig.job_id)] == [0.5]

    DAMAGE[damage](tmp_path / rig.job_id / f"ckpt-{oldest:08d}.json")
    with pytest.raises(UnknownJob, match="no usable checkpoint"):
        rig.jobs.fetch(rig.job_id)
    with pytest.raises(UnknownJob, match="no usable checkpoint"):
        rig.jobs.history(rig.job_id)
