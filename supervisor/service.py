"""The gRPC adapter of a supervisor: psgrid.v1.Supervisor and standard health, on their own port."""
from __future__ import annotations


import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from psgrid.guard import Admission, make_server
from psgrid.security import Security
from psgrid.rpc import translate_errors, unary_handler
from psgrid.supervisor.process import ProcessSupervisor
from psgrid.supervisor.serde import node_to_proto
from psgrid.v1 import supervisor_pb2 as pb

SERVICE_NAME = "psgrid.v1.Supervisor"


class SupervisorService:
    """psgrid.v1.Supervisor over a :class:`ProcessSupervisor`."""

    def __init__(self, supervisor: ProcessSupervisor):
        self.supervisor = supervisor

    @translate_errors
    def ListNodes(self, request: pb.ListNodesRequest, context) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=[node_to_proto(n) for n in self.supervisor.nodes()])

    @translate_errors
    def RestartNode(self, request: pb.RestartNodeRequest, context) -> pb.RestartNodeResponse:
        return pb.RestartNodeResponse(node=node_to_proto(self.supervisor.restart_node(request.name)))


def handlers(service: SupervisorService) -> grpc.GenericRpcHandler:
    """The generic handler of psgrid.v1.Supervisor, for ``server.add_generic_rpc_handlers``."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ListNodes": unary_handler(service.ListNodes, pb.ListNodesRequest, pb.ListNodesResponse),
        "RestartNode": unary_handler(service.RestartNode, pb.RestartNodeRequest, pb.RestartNodeResponse),
    })


class SupervisorServer:
    """A gRPC server with the Supervisor and health services; ``port`` is the bound port."""

    def __init__(self, supervisor: ProcessSupervisor, host: str = "127.0.0.1", port: int = 0,
                 security: Security | None = None):
        security = security or Security()
        self.health = health.HealthServicer()
        self.server = make_server("sup-rpc", [SERVICE_NAME], security, Admission(calls_per_service=8))
        self.server.add_generic_rpc_handlers([handlers(SupervisorService(supervisor))])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = security.add_port(self.server, f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind {host}:{port}")

    def start(self) -> SupervisorServer:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        """Go NOT_SERVING, let in-flight calls finish within ``grace_s``, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
