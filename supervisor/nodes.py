"""The vocabulary of a supervised cluster: node roles and node snapshots.

A *node* is one psgrid process that ``psgrid up`` supervises (the parameter
server or one worker). :class:`NodeInfo` is what an operator sees of it; the
restart machinery behind it is :mod:`psgrid.supervisor.base`.
"""
from __future__ import annotations

import dataclasses
import enum

from psgrid.supervisor.base import ChildState


class NodeRole(str, enum.Enum):
    """What a node runs: ``psgrid server`` or ``psgrid worker``."""

    SERVER = "server"
    WORKER = "worker"


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """A snapshot of one node, for display.

    ``address`` is the HOST:PORT clients dial for a server ("" for a worker);
    ``pid`` is None while no process runs; ``restarts`` counts starts after the
    first; ``uptime_s`` is 0 when no process runs; ``last_exit`` says why the
    previous process ended ("" when none has).
    """

    name: str
    role: NodeRole
    state: ChildState
    address: str = ""
    pid: int | None = None
    restarts: int = 0
    uptime_s: float = 0.0
    last_exit: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", NodeRole(self.role))
        object.__setattr__(self, "state", ChildState(self.state))

    def to_json(self) -> dict:
        """A JSON-ready dict with enums as their values."""
        out = dataclasses.asdict(self)
        out["role"], out["state"] = self.role.value, self.state.value
        return out
