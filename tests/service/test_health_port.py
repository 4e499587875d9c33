"""The plaintext health port (``--health-port``) that Kubernetes' native gRPC probes ask:
"" is ready, ``psgrid.liveness`` is alive; it serves nothing else and needs no token,
and a server restoring its checkpoints is alive but not ready."""
from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psgrid.guard import LIVENESS, HealthPort
from psgrid.inference.app import InferenceApp
from psgrid.inference.config import ServeConfig
from psgrid.security import Security
from psgrid.server.app import ParameterServerApp
from psgrid.server.config import ServerConfig
from psgrid.server.core import ParameterServerCore

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def status(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_the_health_port_answers_without_a_token_and_serves_nothing_else(server_factory):
    app = server_factory(health_port=0)
    guarded = ParameterServerApp(ServerConfig(port=0, health_port=0), Security(token="s3cret")).start()
    try:
        for a in (app, guarded):
            assert status(a.health_port.port, "") == SERVING and status(a.health_port.port, LIVENESS) == SERVING
        with grpc.insecure_channel(f"127.0.0.1:{guarded.health_port.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/psgrid.v1.JobService/ListJobs")(b"", timeout=5)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        guarded.stop(grace=0.5)


def test_a_server_restoring_its_checkpoints_is_alive_but_not_ready(tmp_path, monkeypatch):
    restoring, finish = threading.Event(), threading.Event()
    bound: list[int] = []  # the health port, known before the app object is (it is built after restore)
    real_restore, real_bind = ParameterServerCore.restore, HealthPort.__init__

    def slow_restore(core):
        restoring.set()
        finish.wait(30)
        return real_restore(core)

    def bind(port, *args, **kwargs):
        real_bind(port, *args, **kwargs)
        bound.append(port.port)

    monkeypatch.setattr(ParameterServerCore, "restore", slow_restore)
    monkeypatch.setattr(HealthPort, "__init__", bind)
    made: list[ParameterServerApp] = []
    config = ServerConfig(port=0, health_port=0, checkpoint_dir=str(tmp_path))
    builder = threading.Thread(target=lambda: made.append(ParameterServerApp(config)))
    builder.start()
    try:
        assert restoring.wait(30)
        assert status(bound[0], LIVENESS) == SERVING and status(bound[0], "") == NOT_SERVING
    finally:
        finish.set()
        builder.join(30)
    app = made[0].start()
    try:
        assert status(app.health_port.port, "") == SERVING
    finally:
        app.stop(grace=0.5)
    with pytest.raises(grpc.RpcError):
        status(app.health_port.port, "")  # closed with the server


def test_serve_is_alive_at_once_and_ready_with_its_first_version(tmp_path):
    app = InferenceApp(ServeConfig(checkpoint_dir=str(tmp_path), poll_interval_s=0.05, device="cpu",
                                   health_port=0)).start()
    try:
        port = app.health_port.port
        assert status(port, LIVENESS) == SERVING and status(port, "") == NOT_SERVING
    finally:
        app.stop(grace=0.5)
