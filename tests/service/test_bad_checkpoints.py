"""A bad checkpoint never stops a server from starting (issue 12, item 6).

Whatever is wrong with a checkpoint (nesting too deep to parse, a manifest
whose checksums verify but whose meta is empty or malformed), the server logs
it and restores the job from the one before; a restored job whose spec is
outside ``--allow-modules`` is not restored at all. ``psgrid serve
--checkpoint-dir`` reads checkpoints the same way.
"""
from __future__ import annotations

import json
import logging
import pathlib

import pytest
import torch

from psgrid import checkpoints
from psgrid.inference.models import Candidate
from psgrid.inference.sources import CheckpointSource, Unusable
from psgrid.spec import JobState

from helpers.inproc import make_rig


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


DAMAGE = {
    "nested 200,000 deep": lambda path: path.write_text("[" * 200_000 + "]" * 200_000),
    "meta {}": lambda path: rewrite(path, _empty_meta),
    "worker names not strings": lambda path: rewrite(path, _names_not_strings),
    "spec out of range": lambda path: rewrite(path, _bad_spec),
    "history rows malformed": lambda path: rewrite(path, _history_not_rows),
}


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
