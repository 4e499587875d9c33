"""Bad input gets the right status, the matching psgrid exception, and changes nothing."""
from __future__ import annotations

import grpc
import pytest
import torch

from psgrid import codec, rpc
from psgrid.errors import (
    DtypeMismatch,
    InvalidArgument,
    MalformedPayload,
    NonFiniteGradient,
    PayloadTooLarge,
    ShapeMismatch,
    UnknownJob,
    UnknownWorker,
)
from psgrid.v1 import parameter_server_pb2 as ps
from psgrid.worker.ps_client import push_header

from helpers.inproc import make_rig, small_params


@pytest.fixture
def rig(server):
    return make_rig(server.port)


def send_raw(rig, frames) -> Exception:
    """Send hand-made push frames; return the psgrid error raised."""
    try:
        rig.ps._push(iter(frames), timeout=10)
    except grpc.RpcError as exc:
        return rpc.to_psgrid_error(exc)
    raise AssertionError("the push was accepted")


def grads(**overrides):
    g = {"w": torch.full((4, 3), 0.1), "b": torch.full((4,), 0.1)}
    g.update(overrides)
    return g


def assert_unchanged_and_serving(rig, before, version):
    after = rig.params()
    for name in before:
        assert torch.equal(after[name].view(torch.uint8), before[name].view(torch.uint8)), name
    assert rig.version() == version
    # still serving: a correct push goes through and is applied
    seq = rig.ps.pull(rig.job_id, rig.workers[0], 0, False, lambda n: torch.empty(n, dtype=torch.uint8))
    assert seq.version == version
    v, dup = rig.push(0, expected_seq(rig), grads())
    assert (v, dup) == (version + 1, False)


def expected_seq(rig) -> int:
    return rig.version()  # one worker, async: one version per accepted push


def test_wrong_shape(rig):
    before, version = rig.params(), rig.version()
    layout = codec.Layout.of([("b", torch.float32, (4,)), ("w", torch.float32, (3, 4))])
    header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, layout)
    with pytest.raises(ShapeMismatch) as info:
        rig.ps.push(header, torch.zeros(layout.total_bytes, dtype=torch.uint8))
    assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert_unchanged_and_serving(rig, before, version)


def test_wrong_dtype(rig):
    before, version = rig.params(), rig.version()
    layout = codec.Layout.of([("w", torch.float64, (4, 3)), ("b", torch.float32, (4,))])
    header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, layout)
    with pytest.raises(DtypeMismatch):
        rig.ps.push(header, torch.zeros(layout.total_bytes, dtype=torch.uint8))
    assert_unchanged_and_serving(rig, before, version)


def test_declared_bytes_do_not_match_the_shape(rig):
    before, version = rig.params(), rig.version()
    header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout)
    header.tensors.tensors[0].nbytes -= 4
    error = send_raw(rig, [ps.PushRequest(header=header).SerializeToString()])
    assert isinstance(error, MalformedPayload) and error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert_unchanged_and_serving(rig, before, version)


@pytest.mark.parametrize("delta", [-4, +4])
def test_payload_shorter_or_longer_than_declared(rig, delta):
    before, version = rig.params(), rig.version()
    header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout)
    payload = rig.layout.pack(grads())
    body = bytes(payload.numpy())[: len(payload) + delta] if delta < 0 else bytes(payload.numpy()) + b"\1" * delta
    frames = [ps.PushRequest(header=header).SerializeToString(), ps.PushRequest(chunk=body).SerializeToString()]
    assert isinstance(send_raw(rig, frames), MalformedPayload)
    assert_unchanged_and_serving(rig, before, version)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient(rig, bad):
    before, version = rig.params(), rig.version()
    w = torch.full((4, 3), 0.1)
    w[2, 1] = bad
    with pytest.raises(NonFiniteGradient) as info:
        rig.push(0, 0, grads(w=w))
    assert isinstance(info.value, InvalidArgument)
    assert_unchanged_and_serving(rig, before, version)


def test_unknown_job_and_worker(rig):
    before, version = rig.params(), rig.version()
    payload = rig.layout.pack(grads())
    with pytest.raises(UnknownJob) as info:
        rig.ps.push(push_header("job-nope", rig.workers[0], 0, 0, 0, rig.layout), payload)
    assert info.value.grpc_code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(UnknownWorker):
        rig.ps.push(push_header(rig.job_id, "w-nope", 0, 0, 0, rig.layout), payload)
    with pytest.raises(UnknownJob):
        rig.jobs.get("job-nope")
    with pytest.raises(UnknownJob):
        rig.jobs.fetch("job-nope")
    with pytest.raises(UnknownJob):
        rig.ps.pull("job-nope", rig.workers[0], 0, False, lambda n: torch.empty(n, dtype=torch.uint8))
    assert_unchanged_and_serving(rig, before, version)


def test_oversize_declaration_is_refused_before_allocating(server_factory):
    server = server_factory(max_payload_bytes=1 << 20)
    rig = make_rig(server.port)
    before, version = rig.params(), rig.version()
    header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout)
    huge = header.tensors.tensors[0]
    huge.shape[:] = [1 << 38]  # a terabyte of float32
    huge.nbytes = 4 << 38
    header.tensors.total_bytes = (4 << 38) + 64
    error = send_raw(rig, [ps.PushRequest(header=header).SerializeToString()])
    assert isinstance(error, PayloadTooLarge) and error.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_unchanged_and_serving(rig, before, version)


def test_duplicate_push_is_applied_once(rig):
    start = rig.params()
    v1, dup1 = rig.push(0, 0, grads())
    v2, dup2 = rig.push(0, 0, grads())
    assert (dup1, dup2) == (False, True) and v1 == v2 == 1
    after = rig.params()
    torch.testing.assert_close(after["w"], start["w"] - 0.5 * 0.1, rtol=0, atol=1e-7)


def test_push_that_skips_a_step_is_refused(rig):
    from psgrid.errors import PushAhead

    before, version = rig.params(), rig.version()
    with pytest.raises(PushAhead) as refused:  # ABORTED: the worker must pull again
        rig.push(0, 5, grads())
    assert refused.value.code == "ABORTED"
    assert_unchanged_and_serving(rig, before, version)


def test_a_push_must_start_with_its_header(rig):
    before, version = rig.params(), rig.version()
    assert isinstance(send_raw(rig, [ps.PushRequest(chunk=b"\0" * 64).SerializeToString()]), MalformedPayload)
    assert isinstance(send_raw(rig, [b"\xff\xff\xff"]), MalformedPayload)
    assert_unchanged_and_serving(rig, before, version)


def test_initial_parameters_with_nan_are_refused(server):
    params = small_params()
    params["w"][0, 0] = float("nan")
    with pytest.raises(NonFiniteGradient):
        make_rig(server.port, params=params)


def test_the_realignment_rpcs_refuse_what_they_cannot_do_and_change_nothing(rig):
    from psgrid.errors import FailedPrecondition

    before, version = rig.params(), rig.version()
    with pytest.raises(UnknownJob) as info:
        rig.ps.restore_points("job-nope", rig.workers[0])
    assert info.value.grpc_code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(UnknownWorker):
        rig.ps.restore_points(rig.job_id, "w-nope")
    with pytest.raises(UnknownWorker):
        rig.ps.roll_back(rig.job_id, "w-nope", (0, ""), 0)
    # the rig's job is asynchronous and unsharded: nothing to put back in step
    with pytest.raises(FailedPrecondition) as info:
        rig.ps.roll_back(rig.job_id, rig.workers[0], (0, ""), 0)
    assert info.value.grpc_code == grpc.StatusCode.FAILED_PRECONDITION
    assert rig.ps.restore_points(rig.job_id, rig.workers[0]).points == ()
    assert_unchanged_and_serving(rig, before, version)


@pytest.mark.parametrize("wait", [-1.0, float("nan"), float("inf")])
def test_a_pull_with_a_bad_wait_is_refused(rig, wait):
    before, version = rig.params(), rig.version()
    request = ps.PullRequest(job_id=rig.job_id, worker_id=rig.workers[0], clock=0, max_wait_s=wait)
    with pytest.raises(grpc.RpcError) as info:
        list(rig.ps._pull(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(rpc.to_psgrid_error(info.value), InvalidArgument)
    assert_unchanged_and_serving(rig, before, version)


def test_a_push_cancelled_mid_stream_is_one_line_not_a_failure(server, caplog):
    import logging
    import threading

    from helpers.wait import wait_until

    rig = make_rig(server.port)
    job = server.core.job(rig.job_id)
    before = rig.params()
    header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout)
    # its header frame only: in small chunks, the payload does not ride inline
    first = next(codec.encode_push(header, rig.layout.pack({k: torch.ones_like(v) for k, v in before.items()}),
                                   chunk_bytes=16))
    hold = threading.Event()

    def frames():
        yield first
        hold.wait(10)  # the rest of the payload never comes

    with caplog.at_level(logging.INFO, logger="psgrid.rpc"), \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_unary("/psgrid.v1.ParameterServer/Push").future(frames(), timeout=30)
        wait_until(lambda: job.is_receiving(rig.workers[0]), 10, message="the server to receive the push")
        call.cancel()
        hold.set()
        wait_until(lambda: any("cancelled" in r.getMessage() for r in caplog.records if r.name == "psgrid.rpc"),
                   30, message="the handler to log the cancelled call")
    lines = [r for r in caplog.records if r.name == "psgrid.rpc"]
    assert any("cancelled" in r.getMessage() and r.levelno == logging.INFO for r in lines), lines
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in lines)
    after = rig.params()
    assert all(torch.equal(after[k], before[k]) for k in before) and rig.version() == 0
