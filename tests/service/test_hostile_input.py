"""Hostile input (issue 12, items 2-7): refused INVALID_ARGUMENT at the edge, and nothing changes.

Each test sends what an outside review sent with raw requests, asserts the status
code and the psgrid class, and that the job is as it was (parameters bit for bit,
version, clocks) and the server still serving.
"""
from __future__ import annotations

import json
import math

import grpc
import pytest
import torch

from psgrid import messages, rpc
from psgrid.client.job_client import JobServiceClient
from psgrid.codec import Layout
from psgrid.errors import (
    InvalidArgument,
    InvalidId,
    InvalidSpec,
    MalformedPayload,
    NonFiniteGradient,
    PsgridError,
)
from psgrid.spec import OptimizerSpec
from psgrid.v1 import job_service_pb2 as js
from psgrid.v1 import parameter_server_pb2 as ps
from psgrid.worker.ps_client import ParameterServerClient, push_header

from helpers.inproc import make_rig, small_params, spec
from helpers.wait import wait_until

BAD_IDS = ["..", ".", "", "-rf", "../../x", "a/b", "job\n", "x" * 129, "j" * 16_000]


def grads(value: float = 0.1) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.full((4,), value)}


def refused(fn, *args, **kwargs) -> PsgridError:
    """The psgrid error a call raises (it must raise one)."""
    with pytest.raises(PsgridError) as info:
        fn(*args, **kwargs)
    return info.value


def raw(fn, request) -> PsgridError:
    """The psgrid error a raw unary call answers (it must fail)."""
    return refused(rpc.call, fn, request, timeout=10)


def send_frames(client, frames) -> PsgridError:
    """Send hand-made push frames through a ParameterServerClient (or a rig's); the error."""
    client = getattr(client, "ps", client)
    try:
        client._push(iter(frames), timeout=10)
    except grpc.RpcError as exc:
        return rpc.to_psgrid_error(exc)
    raise AssertionError("the push was accepted")


def invalid(error: PsgridError, cls: type = InvalidArgument) -> bool:
    return isinstance(error, cls) and error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT


class Snapshot:
    """What must not change: parameters (bit for bit), version and every worker's clock."""

    def __init__(self, rig, server):
        self.rig, self.job = rig, server.core.job(rig.job_id)
        self.params, self.version = rig.params(), rig.version()
        self.clocks = dict(self.job.steps.clocks)
        self.history = len(self.job.history)

    def assert_unchanged(self):
        after = self.rig.params()
        for name, before in self.params.items():
            assert torch.equal(after[name].view(torch.uint8), before.view(torch.uint8)), name
        assert self.rig.version() == self.version
        assert self.job.steps.clocks == self.clocks
        assert len(self.job.history) == self.history


def bsp_push(rig, worker: int, seq: int, value: float = 0.1, samples: int = 0) -> tuple[int, bool]:
    """Pull step ``seq`` as a synchronous worker does, then push its gradient."""
    rig.pull(worker, seq)
    header = push_header(rig.job_id, rig.workers[worker], seq, 0, seq, rig.layout)
    header.samples = samples
    return rig.ps.push(header, rig.layout.pack(grads(value)))


def push_round(rig, seq: int, value: float = 0.1) -> int:
    """Every worker pushes ``seq``; the version after the last one."""
    version = None
    for worker in range(len(rig.workers)):
        version, duplicate = bsp_push(rig, worker, seq, value)
        assert not duplicate
    return version


@pytest.fixture
def bsp(server):
    """A two-worker synchronous job, batch 32."""
    return make_rig(server.port, spec(num_workers=2, staleness=0, batch_size=32))


# --- item 2: numbers at the edge; a round is never left half-done ---------------------


@pytest.mark.parametrize("samples", [2**64 - 1, 2**62, 32 * 2 + 1])
def test_a_samples_count_beyond_what_a_worker_may_cover_is_refused(server, bsp, samples):
    before = Snapshot(bsp, server)
    header = push_header(bsp.job_id, bsp.workers[0], 0, 0, 0, bsp.layout)
    header.samples = samples
    assert invalid(refused(bsp.ps.push, header, bsp.layout.pack(grads())))
    before.assert_unchanged()
    # the round is not frozen: both workers push step 0 (one covering two ranks' batches) and it applies
    assert bsp_push(bsp, 0, 0, samples=64) == (before.version + 1, False)
    assert bsp_push(bsp, 1, 0) == (before.version + 1, False)
    assert bsp.version() == before.version + 1 and bsp.pull(0, 1).step == 1


@pytest.mark.parametrize("ranks", [(0, 1, 0), (2,), (2**32 - 1,)])
def test_ranks_beyond_the_jobs_are_refused(server, bsp, ranks):
    before = Snapshot(bsp, server)
    header = push_header(bsp.job_id, bsp.workers[0], 0, 0, 0, bsp.layout, ranks=ranks)
    assert invalid(refused(bsp.ps.push, header, bsp.layout.pack(grads())))
    before.assert_unchanged()
    assert push_round(bsp, 0) == before.version + 1


@pytest.mark.parametrize("field", ["seq", "base_version", "base_step"])
def test_step_numbers_beyond_2_62_are_refused(server, bsp, field):
    before = Snapshot(bsp, server)
    header = push_header(bsp.job_id, bsp.workers[0], 0, 0, 0, bsp.layout)
    setattr(header, field, 2**64 - 1)
    assert invalid(refused(bsp.ps.push, header, bsp.layout.pack(grads())))
    request = ps.PullRequest(job_id=bsp.job_id, worker_id=bsp.workers[0], clock=2**63)
    with pytest.raises(grpc.RpcError) as info:
        list(bsp.ps._pull(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    before.assert_unchanged()
    assert push_round(bsp, 0) == before.version + 1


@pytest.mark.parametrize("bad", [
    dict(loss=math.inf), dict(seconds=math.nan), dict(seconds=-1.0), dict(seconds=math.inf),
    dict(metrics={"accuracy": math.inf}), dict(metrics={"accuracy": math.nan}),
    dict(step=2**63), dict(samples=2**64 - 1), dict(total_steps=2**62),
])
def test_a_report_with_numbers_out_of_range_is_refused(server, bsp, bad):
    before = Snapshot(bsp, server)
    args = dict(step=1, total_steps=10, loss=0.5, samples=32, seconds=1.0) | bad
    assert invalid(refused(bsp.ps.report, bsp.workers[0], bsp.job_id, "TRAINING", **args))
    before.assert_unchanged()
    bsp.ps.report(bsp.workers[0], bsp.job_id, "TRAINING", step=1, total_steps=10, loss=math.nan,
                  samples=32, seconds=1.0, metrics={"accuracy": 0.5})  # NaN loss: none measured
    assert len(server.core.job(bsp.job_id).history) == before.history + 1


# --- item 3: buffers are sized by the job's layout, never by the header ----------------


def test_a_header_declaring_more_bytes_than_the_job_allocates_nothing(server, bsp):
    before = Snapshot(bsp, server)
    header = push_header(bsp.job_id, bsp.workers[0], 0, 0, 0, bsp.layout)
    header.tensors.total_bytes = 1 << 30
    error = send_frames(bsp, [ps.PushRequest(header=header).SerializeToString()])
    assert invalid(error, MalformedPayload)
    staging = server.core.job(bsp.job_id).staging
    assert all(buf.numel() == bsp.layout.total_bytes for buf in staging.values())
    before.assert_unchanged()
    assert push_round(bsp, 0) == before.version + 1
    assert all(buf.numel() == bsp.layout.total_bytes for buf in staging.values())


def test_a_valid_push_with_trailing_padding_is_refused(server, bsp):
    before = Snapshot(bsp, server)
    header = push_header(bsp.job_id, bsp.workers[0], 0, 0, 0, bsp.layout)
    padding = 64 << 10
    header.tensors.total_bytes = bsp.layout.total_bytes + padding
    body = bytes(bsp.layout.pack(grads()).numpy()) + b"\0" * padding
    frames = [ps.PushRequest(header=header).SerializeToString(), ps.PushRequest(chunk=body).SerializeToString()]
    assert invalid(send_frames(bsp, frames), MalformedPayload)
    assert all(buf.numel() == bsp.layout.total_bytes for buf in server.core.job(bsp.job_id).staging.values())
    before.assert_unchanged()
    assert push_round(bsp, 0) == before.version + 1


def _assigned_job(server, job_spec):
    """A job with one registered, assigned worker and no parameters yet."""
    address = f"127.0.0.1:{server.port}"
    client = ParameterServerClient(address, timeout_s=10, retry_for_s=0)
    worker, _ = client.register("init-0", "localhost", 1, "cpu")
    job_id = JobServiceClient(address, timeout_s=10, retry_for_s=0).submit(job_spec).job_id
    wait_until(lambda: client.heartbeat(worker, "")[0], timeout=10, message="an assignment")
    return client, job_id, worker


def test_a_first_push_is_sized_by_its_tensors_not_by_its_declared_total(server):
    client, job_id, worker = _assigned_job(server, spec())
    params = small_params()
    layout = Layout.of_tensors(params.items())
    job = server.core.job(job_id)
    body = bytes(layout.pack(params).numpy())
    for extra, sent in ((1 << 30, body[:-8]), (64 << 10, body + b"\0" * (64 << 10))):  # short; padded
        header = push_header(job_id, worker, 0, 0, 0, layout, init=True)
        header.tensors.total_bytes = layout.total_bytes + extra
        frames = [ps.PushRequest(header=header).SerializeToString(), ps.PushRequest(chunk=sent).SerializeToString()]
        assert invalid(send_frames(client, frames), MalformedPayload)
        assert job.store is None
    assert client.push(push_header(job_id, worker, 0, 0, 0, layout, init=True), layout.pack(params)) == (0, False)
    assert job.store.layout == layout and job.store.flat.numel() == layout.total_bytes


# --- item 4: one id rule wherever an id comes in ------------------------------------


@pytest.mark.parametrize("job_id", BAD_IDS)
def test_open_partition_refuses_ids_that_break_the_id_rule(server_factory, tmp_path, job_id):
    server = server_factory(checkpoint_dir=str(tmp_path))
    rig = make_rig(server.port)
    jobs_before = set(server.core.state.jobs)
    error = refused(rig.ps.open_partition, job_id, spec(num_workers=1, staleness=0), ["part-a"], 1, 2)
    assert invalid(error, InvalidId) and len(str(error)) < 400
    assert set(server.core.state.jobs) == jobs_before
    server.core.checkpoint()  # checkpoint ticks go on
    rig.ps.open_partition("job-ok.1_x", spec(num_workers=1, staleness=0), ["part-a"], 1, 2)
    assert "job-ok.1_x" in server.core.state.jobs


@pytest.mark.parametrize("bad", ["../../x", "j" * 16_000])
def test_every_lookup_refuses_a_malformed_id_with_a_short_message(server, bad):
    rig = make_rig(server.port)
    before = Snapshot(rig, server)
    calls = [
        lambda: rig.jobs.get(bad), lambda: rig.jobs.cancel(bad), lambda: rig.jobs.history(bad),
        lambda: rig.jobs.fetch(bad), lambda: rig.ps.heartbeat(rig.workers[0], bad),
        lambda: rig.ps.heartbeat(bad, ""), lambda: rig.ps.restore_points(bad, rig.workers[0]),
        lambda: rig.ps.push(push_header(bad, rig.workers[0], 0, 0, 0, rig.layout), rig.layout.pack(grads())),
        lambda: rig.ps.push(push_header(rig.job_id, bad, 0, 0, 0, rig.layout), rig.layout.pack(grads())),
        lambda: rig.ps.report(bad, rig.job_id, "TRAINING", step=1),
    ]
    for call in calls:
        error = refused(call)
        assert invalid(error, InvalidId), error
        assert len(str(error)) < 400
    before.assert_unchanged()
    assert rig.push(0, 0, grads()) == (before.version + 1, False)


# --- item 5: names, maps and messages have limits -------------------------------------


def test_names_and_metric_maps_over_their_limits_are_refused(server):
    rig = make_rig(server.port)
    before = Snapshot(rig, server)
    registered = set(server.core.state.workers)
    for name in ["n" * 129, "n" * 3_000_000, "", "tab\there"]:
        error = refused(rig.ps.register, name, "localhost", 1, "cpu")
        assert invalid(error) and len(str(error)) < 400
    assert invalid(refused(rig.ps.register, "ok", "h" * 257, 1, "cpu"))
    assert invalid(refused(rig.ps.register, "ok", "localhost", -1, "cpu"))
    assert set(server.core.state.workers) == registered
    too_many = {f"m{i}": 1.0 for i in range(65)}
    for metrics in [too_many, {"k" * 65: 1.0}, {"": 1.0}, {"x" * 200_000: 1.0}]:
        error = refused(rig.ps.report, rig.workers[0], rig.job_id, "TRAINING", step=1, metrics=metrics)
        assert invalid(error) and len(str(error)) < 400
    before.assert_unchanged()
    rig.ps.report(rig.workers[0], rig.job_id, "TRAINING", step=1, metrics={f"m{i}": 1.0 for i in range(64)})
    assert rig.ps.register("n" * 128, "localhost", 1, "cpu")[0] in server.core.state.workers


def test_a_job_name_over_its_limit_is_refused_at_submit(server):
    rig = make_rig(server.port)
    jobs_before = set(server.core.state.jobs)
    request = js.SubmitJobRequest(spec=messages.spec_to_proto(spec()))
    request.spec.name = "n" * 257
    error = raw(rig.jobs._submit, request)
    assert invalid(error, InvalidSpec) and len(str(error)) < 400
    assert set(server.core.state.jobs) == jobs_before


def test_a_failure_report_is_kept_to_its_limit(server):
    rig = make_rig(server.port)
    # the SDK cuts errors itself: send the raw request
    request = ps.ReportMetricsRequest(worker_id=rig.workers[0], job_id=rig.job_id,
                                      phase=ps.WORKER_PHASE_FAILED, error="e" * 100_000)
    rpc.call(rig.ps._report, request, timeout=10)
    info = rig.jobs.get(rig.job_id)
    assert info.state.value == "FAILED" and len(info.error) < 4100


# --- item 7: specs and overflowing updates ------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("lr", math.inf), ("eps", math.inf), ("momentum", math.nan), ("weight_decay", math.nan),
    ("dampening", math.nan), ("lr", math.nan), ("beta1", math.nan),
])
def test_submit_refuses_non_finite_optimizer_settings(server, field, value):
    rig = make_rig(server.port)
    jobs_before = set(server.core.state.jobs)
    request = js.SubmitJobRequest(spec=messages.spec_to_proto(spec()))
    setattr(request.spec.optimizer, field, value)
    assert invalid(raw(rig.jobs._submit, request), InvalidSpec)
    assert set(server.core.state.jobs) == jobs_before


@pytest.mark.parametrize("change", [
    dict(model="psgrid.examples..models:mlp"), dict(model="psgrid.examples.models:mlp\n"),
    dict(model_kwargs_json="[" * 100_000), dict(model_kwargs_json='{"n": ' + "1" * 5000 + "}"),
    dict(model_kwargs_json="[" * 5000 + "]" * 5000), dict(dataset_kwargs_json=json.dumps({"k": "v" * 70_000})),
])
def test_submit_refuses_bad_paths_and_kwargs_without_an_internal_error(server, change):
    rig = make_rig(server.port)
    jobs_before = set(server.core.state.jobs)
    request = js.SubmitJobRequest(spec=messages.spec_to_proto(spec()))
    for field, value in change.items():
        setattr(request.spec, field, value)
    error = raw(rig.jobs._submit, request)
    assert invalid(error, InvalidSpec) and len(str(error)) < 500
    assert set(server.core.state.jobs) == jobs_before


def test_two_synchronous_pushes_that_overflow_the_sum_are_refused(server, bsp):
    before = Snapshot(bsp, server)
    assert bsp_push(bsp, 0, 0, 3e38) == (before.version + 1, False)  # accepted into the round
    clocks = dict(server.core.job(bsp.job_id).steps.clocks)
    error = refused(bsp_push, bsp, 1, 0, 3e38)  # the sum of the round would be inf
    assert invalid(error, NonFiniteGradient)
    job = server.core.job(bsp.job_id)
    assert job.steps.clocks == clocks and bsp.version() == before.version
    after = bsp.params()
    for name in before.params:
        assert torch.equal(after[name], before.params[name]), name
    # the round is still open: a sane gradient completes it, and the parameters stay finite
    assert bsp_push(bsp, 1, 0, -3e38) == (before.version + 1, False)
    assert all(torch.isfinite(t).all() for t in bsp.params().values())


@pytest.mark.parametrize("optimizer", [
    OptimizerSpec("sgd", lr=1e30), OptimizerSpec("sgd", lr=1e30, momentum=0.9),
    OptimizerSpec("adam", lr=1e30),
])
def test_an_update_that_would_overflow_the_parameters_is_refused(server, optimizer):
    rig = make_rig(server.port, spec(optimizer=optimizer))
    assert rig.push(0, 0, grads(1e-3)) == (1, False)  # a first step, so that state exists
    before = Snapshot(rig, server)
    store = server.core.job(rig.job_id).store
    state = {n: t.clone() for n, t in store.optimizer.state_tensors().items()}
    steps = store.optimizer.steps
    assert invalid(refused(rig.push, 0, 1, grads(1e30)), NonFiniteGradient)
    before.assert_unchanged()
    assert store.optimizer.steps == steps
    for name, t in store.optimizer.state_tensors().items():
        assert torch.equal(t, state[name]), name
    assert all(torch.isfinite(t).all() for t in rig.params().values())
