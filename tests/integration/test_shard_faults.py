"""Let a shard crash: kill -9 a parameter-server shard, then the coordinator, mid-job.

A synchronous job's parameters live on two shards under one `psgrid up`. Each
shard restarts from its own step-aligned checkpoint; the workers find the
shards at different steps, put every shard back to the step they all hold and
compute again from there. BSP replays exactly, so the job ends with the very
weights of a fault-free run (to 1e-5), not merely a similar accuracy.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from psgrid.client import Client
from psgrid.examples import spec_path
from psgrid.spec import JobSpec, JobState

from helpers.ports import consecutive_free_ports
from helpers.up import Up
from helpers.wait import wait_step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLUSTER = """
[supervisor]
max_restarts = 20
period_s = 120
check_interval_s = 0.1
[server]
checkpoint_dir = "checkpoints"
liveness_timeout_s = 10
backoff_initial_s = 0.1
backoff_max_s = 0.5
args = ["--checkpoint-every-steps", "10"]
[workers]
liveness_timeout_s = 5
backoff_initial_s = 0.1
backoff_max_s = 0.5
args = ["--threads", "1"]
[hosts.local]
address = "127.0.0.1"
servers = 2
server_port = {port}
workers = 2
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    port = consecutive_free_ports(2)
    cluster = Up(tmp_path_factory.mktemp("shard-faults"), "--host", "local", cluster=CLUSTER.format(port=port))
    try:
        cluster.wait_running(60)
        cluster.coordinator = f"127.0.0.1:{port}"
        yield cluster
    finally:
        cluster.close()


def digits() -> JobSpec:
    return JobSpec.from_toml(spec_path("digits")).replace(epochs=8, seed=5)


def test_a_killed_shard_and_a_killed_coordinator_leave_the_weights_of_a_fault_free_run(up):
    with Client(up.coordinator) as client:
        reference = client.submit(digits())
        expected = reference.wait(timeout=180, progress=False)
        job = client.submit(digits())
        for fraction, victim in ((0.3, "shard-1"), (0.6, "server")):
            wait_step(job, fraction)
            old = up.nodes()[victim]
            os.kill(old.pid, signal.SIGKILL)
            up.wait_new_pid(victim, old.pid, timeout=10)
        info = job.wait(timeout=180, progress=False)
        assert expected.state is JobState.SUCCEEDED and info.state is JobState.SUCCEEDED, info
        ours, theirs = job.state_dict(), reference.state_dict()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5)
    assert info.metrics["test_accuracy"] == expected.metrics["test_accuracy"]
    logs = "".join(p.read_text() for p in (up.root / "run").glob("*.log"))
    assert logs.count("all put back to step") >= 2, "after each restart the workers realigned the shards"
