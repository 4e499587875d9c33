"""A parameter server restarted from its checkpoints carries on exactly where it was."""
from __future__ import annotations

import torch

from psgrid.server.app import ParameterServerApp
from psgrid.server.config import ServerConfig
from psgrid.spec import JobState, OptimizerSpec
from psgrid.worker.ps_client import ParameterServerClient

from helpers.inproc import Rig, make_rig, spec
from helpers.wait import wait_until


def grads(step: int):
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}


def reattach(rig: Rig, port: int) -> Rig:
    """The same workers (by name) registering with a restarted server."""
    ps = ParameterServerClient(f"127.0.0.1:{port}", timeout_s=10, retry_for_s=0)
    from psgrid.client.job_client import JobServiceClient

    jobs = JobServiceClient(f"127.0.0.1:{port}", timeout_s=10, retry_for_s=0)
    workers, starts = [], []
    for name in rig.names:
        worker, _ = ps.register(name, "localhost", 2, "cpu")
        assignment = wait_until(lambda: ps.heartbeat(worker, "")[0], timeout=10)
        assert assignment.job_id == rig.job_id
        workers.append(worker)
        starts.append(assignment.start_step)
    return Rig(ps, jobs, rig.job_id, workers, rig.layout, rig.names), starts


def test_restart_resumes_bit_exactly_with_optimizer_state(server_factory, tmp_path):
    job_spec = spec(num_workers=1, staleness=None, optimizer=OptimizerSpec("adam", lr=0.05))
    reference = make_rig(server_factory().port, job_spec)
    for step in range(6):
        reference.push(0, step, grads(step))

    first = server_factory(checkpoint_dir=str(tmp_path))
    rig = make_rig(first.port, job_spec)
    for step in range(3):
        rig.push(0, step, grads(step))
    first.stop(grace=1)  # writes the final checkpoint

    second = server_factory(checkpoint_dir=str(tmp_path))
    assert rig.job_id in [j.job_id for j in rig.jobs.__class__(f"127.0.0.1:{second.port}").list()]
    rig, starts = reattach(rig, second.port)
    assert starts == [3] and rig.version() == 3
    for step in range(3, 6):
        rig.push(0, step, grads(step))
    ours, theirs = rig.params(), reference.params()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_bsp_round_in_flight_is_recomputed_not_lost_or_doubled(server_factory, tmp_path):
    first = server_factory(checkpoint_dir=str(tmp_path))
    rig = make_rig(first.port, spec(num_workers=2, staleness=0))
    rig.push(0, 0, grads(0))
    rig.push(1, 0, grads(1))
    rig.push(0, 1, grads(2))  # accepted into round 1, which is not applied yet
    first.stop(grace=1)
    second = server_factory(checkpoint_dir=str(tmp_path))
    rig, starts = reattach(rig, second.port)
    assert starts == [1, 1] and rig.version() == 1
    assert rig.push(0, 1, grads(2)) == (2, False)  # redone, not a duplicate
    assert rig.push(1, 1, grads(3)) == (2, False)
    assert rig.version() == 2


def test_finished_jobs_stay_fetchable_after_restart(server_factory, tmp_path):
    first = server_factory(checkpoint_dir=str(tmp_path))
    rig = make_rig(first.port, spec(steps=1))
    rig.push(0, 0, grads(0))
    rig.ps.report(rig.workers[0], rig.job_id, "FINISHED", step=1, total_steps=1)
    rig.ps.report(rig.workers[0], rig.job_id, "EVALUATED", metrics={"m": 1.5})
    before = rig.params()
    first.stop(grace=1)
    second = ParameterServerApp(ServerConfig(port=0, checkpoint_dir=str(tmp_path))).start()
    try:
        from psgrid.client.job_client import JobServiceClient

        jobs = JobServiceClient(f"127.0.0.1:{second.port}", retry_for_s=0)
        info = jobs.get(rig.job_id)
        assert info.state is JobState.SUCCEEDED and info.metrics == {"m": 1.5}
        pulled = jobs.fetch(rig.job_id)
        assert torch.equal(pulled.layout.views(pulled.buffer)["w"], before["w"])
    finally:
        second.stop(grace=0.5)
