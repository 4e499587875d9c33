"""The operator's side of psgrid.v1.Supervisor: list and restart the nodes of ``psgrid up``."""
from __future__ import annotations

from psgrid import rpc
from psgrid.security import Security
from psgrid.supervisor.nodes import NodeInfo
from psgrid.supervisor.serde import node_from_proto
from psgrid.v1 import supervisor_pb2 as pb
from psgrid.v1 import supervisor_pb2_grpc


class SupervisorClient:
    """Calls a supervisor; every call has a deadline. Use as a context manager.

    Raises psgrid errors, never ``grpc.RpcError``: ``Unavailable`` when the
    supervisor cannot be reached within ``retry_for_s``.
    """

    def __init__(self, address: str, timeout_s: float = 5.0, retry_for_s: float = 5.0,
                 security: Security | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        self.channel = rpc.make_channel(address, security=security)
        self._stub = supervisor_pb2_grpc.SupervisorStub(self.channel)

    def nodes(self) -> tuple[NodeInfo, ...]:
        """Every supervised node, in start order."""
        reply = rpc.call(self._stub.ListNodes, pb.ListNodesRequest(), timeout=self.timeout_s,
                         retry_for=self.retry_for_s)
        return tuple(node_from_proto(n) for n in reply.nodes)

    def restart(self, name: str) -> NodeInfo:
        """Ask for node ``name`` to restart; returns it as it was (the new pid comes with :meth:`nodes`).

        UnknownNode for an unknown name, SupervisorStopped when the supervisor is
        stopping. Not retried: a lost reply must not restart a node twice.
        """
        reply = rpc.call(self._stub.RestartNode, pb.RestartNodeRequest(name=name), timeout=self.timeout_s)
        return node_from_proto(reply.node)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SupervisorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
