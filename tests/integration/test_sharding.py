"""Sharded parameter servers: real server and worker processes, 2 and 3 shards."""
from __future__ import annotations

import types

import pytest
import torch

from psgrid.client import Client
from psgrid.client.job_client import JobServiceClient
from psgrid.codec import Layout
from psgrid.examples import spec_path
from psgrid.partition import partition
from psgrid.spec import JobSpec, JobState, OptimizerSpec
from psgrid.build import build_model, trainable

from helpers.ports import consecutive_free_ports
from helpers.up import Up

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[2, 3], ids=lambda s: f"{s}-shards")
def sharded(request, tmp_path_factory):
    port = consecutive_free_ports(request.param)
    cluster = Up(tmp_path_factory.mktemp(f"shards{request.param}"), "--host", "local", cluster=(
        f'[workers]\nargs = ["--threads", "1"]\n'
        f'[hosts.local]\naddress = "127.0.0.1"\nservers = {request.param}\nserver_port = {port}\nworkers = 2\n'))
    try:
        cluster.wait_running(60)
        coordinator, *shards = cluster.server_addresses()
        with Client(coordinator) as client:
            yield request.param, types.SimpleNamespace(address=coordinator, shard_addresses=shards), client
    finally:
        cluster.close()


def exact_spec() -> JobSpec:
    return JobSpec(model="psgrid.examples.models:mlp", model_kwargs={"hidden": 48},
                   dataset="psgrid.examples.datasets:digits", steps=20, batch_size=16,
                   staleness=0, num_workers=2, seed=11, optimizer=OptimizerSpec("adam", lr=0.01))


def test_digits_trains_across_shards(sharded):
    shards, _, client = sharded
    info = client.submit(JobSpec.from_toml(spec_path("digits"))).wait(timeout=240, progress=False)
    assert info.state is JobState.SUCCEEDED and len(info.shards) == shards - 1
    assert info.metrics["test_accuracy"] >= 0.95, info.metrics


def test_synchronous_mode_is_exact_and_shares_are_balanced(sharded, client):
    shards, cluster, sharded_client = sharded
    spec = exact_spec()
    one = client.submit(spec)  # the single-server cluster of the integration tier
    many = sharded_client.submit(spec)
    one.wait(timeout=120, progress=False)
    many.wait(timeout=120, progress=False)
    reference, ours = one.state_dict(), many.state_dict()
    assert list(ours) == list(reference)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-5)

    model = build_model(spec)
    layout = Layout.of_tensors((n, p.detach()) for n, p in trainable(model))
    expected = partition(layout, shards).nbytes()
    held = []
    for address in [cluster.address, *cluster.shard_addresses]:
        pulled = JobServiceClient(address, retry_for_s=0).fetch(many.job_id)
        held.append(sum(m.nbytes for m in pulled.layout.tensors))
    assert held == expected
    total = sum(held)
    assert all(abs(h - total / shards) <= 0.25 * total / shards for h in held), held
