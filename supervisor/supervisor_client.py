"""The operator's side of psgrid.v1.Supervisor: list and restart the nodes of ``psgrid up``."""
from __future__ import annotations

from psgrid import rpc
from psgrid.security import Security
from psgrid.supervisor.nodes import NodeInfo
from psgrid.supervisor.serde import node_from_proto
from psgrid.v1 import supervisor_pb2 as pb


class SupervisorClient(rpc.ServiceClient):
    """Calls a supervisor; every call has a deadline. Use as a context manager.

    Raises psgrid errors, never ``grpc.RpcError``: ``Unavailable`` when the
    supervisor cannot be reached within ``retry_for_s``.
    """

    service = "psgrid.v1.Supervisor"

    def __init__(self, address: str, timeout_s: float = 5.0, retry_for_s: float = 5.0,
                 security: Security | None = None):
        super().__init__(address, timeout_s, retry_for_s, security)
        self._list = self._unary("ListNodes", pb.ListNodesRequest, pb.ListNodesResponse)
        self._restart = self._unary("RestartNode", pb.RestartNodeRequest, pb.RestartNodeResponse)

    def nodes(self) -> tuple[NodeInfo, ...]:
        """Every supervised node, in start order."""
        reply = rpc.call(self._list, pb.ListNodesRequest(), timeout=self.timeout_s,
                         retry_for=self.retry_for_s)
        return tuple(node_from_proto(n) for n in reply.nodes)

    def restart(self, name: str) -> NodeInfo:
        """Ask for node ``name`` to restart; returns it as it was (the new pid comes with :meth:`nodes`).

        UnknownNode for an unknown name, SupervisorStopped when the supervisor is
        stopping. Not retried: a lost reply must not restart a node twice.
        """
        reply = rpc.call(self._restart, pb.RestartNodeRequest(name=name), timeout=self.timeout_s)
        return node_from_proto(reply.node)
