"""Undecodable requests (issue 12, items 1 and 8): every method parses its own request.

A request without the token is refused UNAUTHENTICATED before anything is parsed; an
undecodable one is INVALID_ARGUMENT with one log line (no traceback), on every method
of every service, unary and streaming; a PredictStream whose first frame does not
parse leaves the inference server able to stop.
"""
from __future__ import annotations

import logging
import time

import grpc
import pytest
import torch

from psgrid.errors import UnknownNode
from psgrid.inference.app import InferenceApp
from psgrid.inference.config import ServeConfig
from psgrid.security import Security
from psgrid.server.app import ParameterServerApp
from psgrid.server.config import ServerConfig
from psgrid.supervisor.service import SupervisorServer
from psgrid.v1 import inference_pb2, job_service_pb2, parameter_server_pb2, supervisor_pb2

from helpers.inproc import make_rig

TOKEN = "s3cret-token"
#: A field tag whose varint never ends: no protobuf message parses it.
GARBAGE = b"\xff\xff"


def methods(module, service: str) -> list[tuple[str, bool, bool]]:
    """(path, client_streaming, server_streaming) of every method a service declares."""
    desc = module.DESCRIPTOR.services_by_name[service]
    return [(f"/{desc.full_name}/{m.name}", m.client_streaming, m.server_streaming) for m in desc.methods]


def raw_call(channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool,
             frames: list[bytes], metadata=()) -> grpc.StatusCode:
    """The status of one call made of raw bytes (no serializers), OK included."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    fn = kind[(client_streaming, server_streaming)](path)
    request = iter(frames) if client_streaming else frames[0]
    try:
        result = fn(request, timeout=10, metadata=metadata)
        if server_streaming:
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def no_traceback(caplog) -> None:
    assert not [r for r in caplog.records if r.exc_info or "deserializing" in r.getMessage()], \
        [r.getMessage() for r in caplog.records]


@pytest.fixture
def ps_app():
    apps = []

    def start(security: Security | None = None):
        app = ParameterServerApp(ServerConfig(host="127.0.0.1", port=0), security).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(grace=0.5)


@pytest.mark.parametrize("token, expected", [(TOKEN, grpc.StatusCode.UNAUTHENTICATED),
                                             (None, grpc.StatusCode.INVALID_ARGUMENT)])
def test_a_tokenless_undecodable_register_is_refused_without_a_traceback(ps_app, caplog, token, expected):
    caplog.set_level(logging.DEBUG)
    app = ps_app(Security(token=token))
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        register = channel.unary_unary("/psgrid.v1.ParameterServer/RegisterWorker")
        with pytest.raises(grpc.RpcError) as info:
            register(GARBAGE + bytes(100), timeout=10)
    assert info.value.code() == expected
    no_traceback(caplog)


def test_every_parameter_server_method_answers_invalid_argument_to_garbage(ps_app, caplog):
    caplog.set_level(logging.DEBUG)
    app = ps_app()
    rig = make_rig(app.port)
    before = rig.params()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        for module, service in ((parameter_server_pb2, "ParameterServer"), (job_service_pb2, "JobService")):
            for path, cs, ss in methods(module, service):
                assert raw_call(channel, path, cs, ss, [GARBAGE]) == grpc.StatusCode.INVALID_ARGUMENT, path
    after = rig.params()
    assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before)
    assert rig.jobs.get(rig.job_id).job_id == rig.job_id
    no_traceback(caplog)


class NoNodes:
    """A supervisor with no nodes: what the adapter calls, nothing started."""

    def nodes(self):
        return []

    def restart_node(self, name):
        raise UnknownNode(name)


@pytest.mark.parametrize("token", [TOKEN, None])
def test_every_supervisor_method_refuses_garbage(caplog, token):
    caplog.set_level(logging.DEBUG)
    server = SupervisorServer(NoNodes(), security=Security(token=token)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for path, cs, ss in methods(supervisor_pb2, "Supervisor"):
                code = raw_call(channel, path, cs, ss, [GARBAGE])
                assert code == (grpc.StatusCode.UNAUTHENTICATED if token else grpc.StatusCode.INVALID_ARGUMENT)
    finally:
        server.stop(0.5)
    no_traceback(caplog)


@pytest.fixture
def inference(tmp_path):
    apps = []

    def start(security: Security | None = None):
        cfg = ServeConfig(checkpoint_dir=str(tmp_path), poll_interval_s=0.05, device="cpu", grace_s=0.5)
        app = InferenceApp(cfg, security=security).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(grace=0.5)


@pytest.mark.parametrize("token", [TOKEN, None])
def test_every_inference_method_refuses_garbage(inference, caplog, token):
    caplog.set_level(logging.DEBUG)
    app = inference(Security(token=token))
    with grpc.insecure_channel(app.address) as channel:
        for path, cs, ss in methods(inference_pb2, "Inference"):
            code = raw_call(channel, path, cs, ss, [GARBAGE])
            assert code == (grpc.StatusCode.UNAUTHENTICATED if token else grpc.StatusCode.INVALID_ARGUMENT), path
    no_traceback(caplog)


def test_an_undecodable_first_stream_frame_is_invalid_and_the_server_still_stops(inference, caplog):
    caplog.set_level(logging.DEBUG)
    app = inference()
    with grpc.insecure_channel(app.address) as channel:
        for _ in range(5):
            code = raw_call(channel, "/psgrid.v1.Inference/PredictStream", True, True, [GARBAGE])
            assert code == grpc.StatusCode.INVALID_ARGUMENT
    started = time.monotonic()
    app.stop(grace=0.5)
    assert time.monotonic() - started < 5
    no_traceback(caplog)


def test_the_inference_app_documents_its_token_and_tls():
    import psgrid.inference.app as app

    assert "neither yet" not in app.__doc__
    assert "psgrid.security" in app.__doc__ and "TLS" in app.__doc__
