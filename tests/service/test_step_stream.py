"""The step stream (ParameterServer.Step, psgrid.stepframes): requests answered in order,
errors in-band, frames out of order end the stream, a pull sent ahead with a push."""
from __future__ import annotations

import grpc
import pytest
import torch

from psgrid import codec, stepframes
from psgrid.errors import MalformedPayload, MalformedRequest, PushAhead, ShapeMismatch
from psgrid.rpc import identity
from psgrid.v1 import parameter_server_pb2 as ps
from psgrid.worker.ps_client import push_header

from helpers.inproc import make_rig, spec

STEP = "/psgrid.v1.ParameterServer/Step"


@pytest.fixture
def rig(server):
    return make_rig(server.port, spec(num_workers=1, staleness=None))


def grads(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.full((4,), value)}


def buffer(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def exchange(address: str, frames: list[bytes]) -> list:
    """Send ``frames`` on one raw step stream; read every answer (or the error that ended it)."""
    with grpc.insecure_channel(address) as channel:
        replies = iter(channel.stream_stream(STEP, identity, identity)(iter(frames), timeout=20))
        answers = []
        try:
            while True:
                answers.append(stepframes.read_reply(replies, buffer))
        except MalformedPayload:  # the stream ended after its last answer
            return answers
        except grpc.RpcError as exc:
            return [*answers, exc]


def test_a_failed_request_is_answered_in_band_and_the_stream_goes_on(rig, server):
    bad = codec.Layout.of([("b", torch.float32, (4,)), ("w", torch.float32, (3, 4))])
    frames = [
        *codec.encode_push(push_header(rig.job_id, rig.workers[0], 0, 0, 0, bad), torch.zeros(bad.total_bytes,
                                                                                               dtype=torch.uint8)),
        *codec.encode_push(push_header(rig.job_id, rig.workers[0], 5, 0, 5, rig.layout), rig.layout.pack(grads())),
        *codec.encode_push(push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout), rig.layout.pack(grads())),
        stepframes.pull_request(rig.job_id, rig.workers[0], 1, False, 5.0),
    ]
    shape, ahead, pushed, pulled = exchange(f"127.0.0.1:{server.port}", frames)
    assert isinstance(shape, ShapeMismatch) and shape.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(ahead, PushAhead)
    assert (pushed.version, pushed.duplicate) == (1, False)
    assert (pulled.version, pulled.clock) == (1, 1)
    assert torch.equal(rig.layout.views(pulled.buffer)["b"], rig.params()["b"])


@pytest.mark.parametrize("frames, error", [
    (lambda rig: [ps.StepRequest(chunk=b"x" * 8).SerializeToString()], MalformedRequest),
    (lambda rig: [b"\xff\xff\xff"], MalformedRequest),
    # a payload inline and in chunk frames too: the stream is out of step
    (lambda rig: [*codec.encode_push(push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout),
                                     rig.layout.pack(grads())), next(codec.chunk_frames(torch.zeros(8, dtype=torch.uint8))),
                  stepframes.pull_request(rig.job_id, rig.workers[0], 0, False, 1.0)], None),
])
def test_a_frame_out_of_order_ends_the_stream_with_invalid_argument(rig, server, frames, error):
    before = rig.params()
    answers = exchange(f"127.0.0.1:{server.port}", frames(rig))
    end = answers[-1]
    assert isinstance(end, grpc.RpcError) and end.code() == grpc.StatusCode.INVALID_ARGUMENT, answers
    if error is None:  # the push itself was whole and was applied; the stray chunk then ended the stream
        assert (answers[0].version, answers[0].duplicate) == (1, False)
    else:
        assert rig.version() == 0 and all(torch.equal(rig.params()[k], before[k]) for k in before)


def test_a_pull_sent_ahead_with_a_push_answers_the_next_pull(rig):
    pulled = rig.pull(0, 0)
    header = push_header(rig.job_id, rig.workers[0], 0, pulled.version, 0, rig.layout)
    assert rig.ps.push(header, rig.layout.pack(grads()), then_pull_s=5.0) == (1, False)
    stream = rig.ps.stream(rig.workers[0])
    assert stream.prefetched == (rig.job_id, False)
    after = rig.pull(0, 1)
    assert stream.prefetched is None and (after.version, after.clock) == (1, 1)
    assert torch.equal(rig.layout.views(after.buffer)["w"], rig.params()["w"])


def test_the_client_reopens_a_stream_the_server_ended(rig):
    stream = rig.ps.stream(rig.workers[0])
    rig.pull(0, 0)
    stream._call.cancel()  # as a server restart or a network cut ends it
    assert rig.push(0, 0, grads()) == (1, False)  # on a new stream
    assert rig.pull(0, 1).clock == 1


@pytest.mark.parametrize("case", ["nan", "inf", "oversize", "unknown job", "unknown worker", "wrong dtype"])
def test_bad_input_on_the_step_stream_gets_its_status_in_band_and_changes_nothing(rig, server, case):
    from psgrid.errors import DtypeMismatch, NonFiniteGradient, PayloadTooLarge, UnknownJob, UnknownWorker

    before = rig.params()
    job, worker, layout, g = rig.job_id, rig.workers[0], rig.layout, grads()
    if case == "nan":
        g["w"][1, 1] = float("nan")
    elif case == "inf":
        g["b"][0] = float("inf")
    elif case == "unknown job":
        job = "job-nope"
    elif case == "unknown worker":
        worker = "w-nope"
    if case == "oversize":
        header = push_header(job, worker, 0, 0, 0, layout)
        header.tensors.total_bytes = 1 << 50
        frames = [codec.header_frame(header.SerializeToString(), None)]
        expected = PayloadTooLarge
    elif case == "wrong dtype":
        layout = codec.Layout.of([("w", torch.float64, (4, 3)), ("b", torch.float32, (4,))])
        frames = list(codec.encode_push(push_header(job, worker, 0, 0, 0, layout),
                                        layout.pack({"w": torch.ones(4, 3, dtype=torch.float64), "b": torch.ones(4)})))
        expected = DtypeMismatch
    else:
        frames = list(codec.encode_push(push_header(job, worker, 0, 0, 0, layout), layout.pack(g)))
        expected = {"nan": NonFiniteGradient, "inf": NonFiniteGradient, "unknown job": UnknownJob,
                    "unknown worker": UnknownWorker}[case]
    pull = stepframes.pull_request(rig.job_id, rig.workers[0], 0, False, 5.0)
    answers = exchange(f"127.0.0.1:{server.port}", [*frames, pull])
    if case == "oversize":  # its length cannot be trusted: the stream ends with the status
        assert isinstance(answers[-1], grpc.RpcError) and answers[-1].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        error, pulled = answers
        assert isinstance(error, expected) and error.grpc_code == grpc.StatusCode[expected.code], answers
        assert pulled.version == 0  # the stream went on
    assert rig.version() == 0 and all(torch.equal(rig.params()[k], before[k]) for k in before)
