"""Node snapshots to and from protobuf: the supervisor's one converter."""
from __future__ import annotations

from psgrid.errors import MalformedPayload
from psgrid.supervisor.base import ChildState
from psgrid.supervisor.nodes import NodeInfo, NodeRole
from psgrid.v1 import supervisor_pb2 as pb

_ROLE = {role: pb.NodeRole.Value(f"NODE_ROLE_{role.name}") for role in NodeRole}
_STATE = {state: pb.NodeState.Value(f"NODE_STATE_{state.name}") for state in ChildState}
_ROLE_BACK = {v: k for k, v in _ROLE.items()}
_STATE_BACK = {v: k for k, v in _STATE.items()}


def node_to_proto(info: NodeInfo) -> pb.Node:
    return pb.Node(name=info.name, role=_ROLE[info.role], address=info.address, pid=info.pid or 0,
                   state=_STATE[info.state], restarts=info.restarts, uptime_s=info.uptime_s,
                   last_exit=info.last_exit)


def node_from_proto(msg: pb.Node) -> NodeInfo:
    """MalformedPayload for a role or state this version does not know."""
    if msg.role not in _ROLE_BACK or msg.state not in _STATE_BACK:
        raise MalformedPayload(f"node {msg.name!r} has an unknown role {msg.role} or state {msg.state}")
    return NodeInfo(name=msg.name, role=_ROLE_BACK[msg.role], state=_STATE_BACK[msg.state],
                    address=msg.address, pid=msg.pid or None, restarts=msg.restarts,
                    uptime_s=msg.uptime_s, last_exit=msg.last_exit)
