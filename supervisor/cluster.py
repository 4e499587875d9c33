"""The cluster file: what ``psgrid up`` runs, and how it supervises it.

A TOML file with three tables, every key optional (defaults shown)::

    [supervisor]
    strategy = "one_for_one"   # one_for_all, rest_for_one
    max_restarts = 5           # more restarts than this within period_s: give up
    period_s = 60
    host = "127.0.0.1"         # the Supervisor gRPC service
    port = 0                   # 0 = any free port (--port-file reports it)
    check_interval_s = 0.5     # how often children are polled and checked

    [server]
    host = "127.0.0.1"
    port = 0                   # 0 = any free port; restarts reuse the bound one
    checkpoint_dir = ".psgrid/checkpoints"   # "" = no checkpoints
    args = []                  # extra `psgrid server` flags
    liveness_timeout_s = 5     # plus restart, shutdown_s, backoff_*_s, healthy_after_s

    [workers]
    count = 2
    device = "auto"
    args = []                  # extra `psgrid worker` flags
    liveness_timeout_s = 15

:class:`ClusterConfig` parses it (defaults < file < flags) into frozen
sections validated on construction; :meth:`ClusterConfig.supervisor_spec` and
:meth:`ClusterConfig.nodes` turn it into children in start order: ``server``,
then ``worker-0`` .. ``worker-{count-1}``. Relative paths are relative to the
directory ``psgrid up`` runs in. Every node runs on this machine; a per-node
``host`` (and a launcher that reaches it) would slot into :class:`NodeSpec`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, ClassVar

from psgrid.spec import tomllib
from psgrid.supervisor.nodes import NodeRole
from psgrid.supervisor.policy import ChildSpec, RestartType, Strategy, SupervisorSpec

SERVER_NAME = "server"
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def worker_name(index: int) -> str:
    """The stable name of worker ``index``: a restart keeps it, and with it the worker's rank."""
    return f"worker-{index}"


def _port(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be an int in 0..65535, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _args(section: str, value: Any, reserved: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` as a tuple of strings, none of them a flag the supervisor sets itself."""
    if isinstance(value, str) or not all(isinstance(a, str) for a in value):
        raise ValueError(f"{section}.args must be a list of strings, got {value!r}")
    for arg in value:
        if arg.split("=", 1)[0] in reserved:
            raise ValueError(f"{section}.args must not set {arg!r}: the supervisor sets it")
    return tuple(value)


def format_address(host: str, port: int) -> str:
    """HOST:PORT, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclasses.dataclass(frozen=True)
class ChildSettings:
    """How one kind of node is supervised; see :class:`psgrid.supervisor.policy.ChildSpec`."""

    restart: RestartType = RestartType.PERMANENT
    liveness_timeout_s: float = 5.0
    shutdown_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    healthy_after_s: float = 60.0

    #: The table's name, for error messages.
    SECTION: ClassVar[str] = "child"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "restart", RestartType(self.restart))
        except ValueError:
            raise ValueError(f"{self.SECTION}.restart must be one of "
                             f"{[t.value for t in RestartType]}, got {self.restart!r}") from None
        self.child_spec(self.SECTION)  # ChildSpec names any bad setting

    def child_spec(self, name: str) -> ChildSpec:
        """The supervision spec of node ``name``; ValueError naming a bad setting."""
        return ChildSpec(name, self.restart, backoff_initial_s=self.backoff_initial_s,
                         backoff_max_s=self.backoff_max_s, healthy_after_s=self.healthy_after_s,
                         liveness_timeout_s=self.liveness_timeout_s, shutdown_s=self.shutdown_s)


@dataclasses.dataclass(frozen=True)
class ServerSection(ChildSettings):
    """The ``[server]`` table: one parameter server, checked by gRPC health."""

    #: Flags the supervisor passes itself; ``args`` may not repeat them.
    SECTION: ClassVar[str] = "server"
    RESERVED: ClassVar[tuple[str, ...]] = ("--host", "--port", "--port-file", "--checkpoint-dir")

    host: str = "127.0.0.1"
    port: int = 0
    checkpoint_dir: str = ".psgrid/checkpoints"
    args: tuple[str, ...] = ()
    #: Longest a server start may take to report its port before it counts as failed.
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str):
            raise ValueError(f"server.host must be a string, got {self.host!r}")
        _port("server.port", self.port)
        if not isinstance(self.checkpoint_dir, str):
            raise ValueError(f"server.checkpoint_dir must be a string, got {self.checkpoint_dir!r}")
        object.__setattr__(self, "args", _args("server", self.args, self.RESERVED))
        _positive("server.start_timeout_s", self.start_timeout_s)
        super().__post_init__()

    @property
    def dial_host(self) -> str:
        """The host local clients dial: loopback when the server binds every interface."""
        return "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host

    def address(self, port: int) -> str:
        """HOST:PORT that workers and clients dial for a server bound to ``port``."""
        return format_address(self.dial_host, port)

    def argv(self, port: int, port_file: str | os.PathLike) -> list[str]:
        """``psgrid server`` arguments binding ``port`` (0: any) and reporting it in ``port_file``."""
        argv = ["server", "--host", self.host, "--port", str(port), "--port-file", str(port_file)]
        if self.checkpoint_dir:
            argv += ["--checkpoint-dir", self.checkpoint_dir]
        return argv + list(self.args)


@dataclasses.dataclass(frozen=True)
class WorkersSection(ChildSettings):
    """The ``[workers]`` table: ``count`` identical workers, checked by a liveness file.

    A worker touches its liveness file every heartbeat interval (1 s by
    default); the default ``liveness_timeout_s`` outlasts a heartbeat RPC's own
    10 s deadline, so a slow server does not get its workers killed.
    """

    SECTION: ClassVar[str] = "workers"
    RESERVED: ClassVar[tuple[str, ...]] = (
        "--server", "--name", "--local-workers", "--liveness-file", "--device")

    liveness_timeout_s: float = 15.0
    count: int = 2
    device: str = "auto"
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"workers.count must be an int >= 0, got {self.count!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"workers.device must be a non-empty string, got {self.device!r}")
        object.__setattr__(self, "args", _args("workers", self.args, self.RESERVED))
        super().__post_init__()

    def argv(self, index: int, server_address: str, liveness_file: str | os.PathLike) -> list[str]:
        """``psgrid worker`` arguments for worker ``index`` of a server at ``server_address``."""
        return ["worker", "--server", server_address, "--name", worker_name(index),
                "--local-workers", str(max(1, self.count)), "--device", self.device,
                "--liveness-file", str(liveness_file), *self.args]


@dataclasses.dataclass(frozen=True)
class SupervisorSection:
    """The ``[supervisor]`` table: strategy, restart intensity and the service's address."""

    strategy: Strategy = Strategy.ONE_FOR_ONE
    max_restarts: int = 5
    period_s: float = 60.0
    host: str = "127.0.0.1"
    port: int = 0
    check_interval_s: float = 0.5

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "strategy", Strategy(self.strategy))
        except ValueError:
            raise ValueError(f"supervisor.strategy must be one of {[s.value for s in Strategy]}, "
                             f"got {self.strategy!r}") from None
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) \
                or self.max_restarts < 0:
            raise ValueError(f"supervisor.max_restarts must be an int >= 0, got {self.max_restarts!r}")
        _positive("supervisor.period_s", self.period_s)
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"supervisor.host must be a non-empty string, got {self.host!r}")
        _port("supervisor.port", self.port)
        _positive("supervisor.check_interval_s", self.check_interval_s)


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One node of the cluster: its name, role, supervision spec and worker index."""

    name: str
    role: NodeRole
    child: ChildSpec
    index: int = 0  # the worker's index; 0 for the server


def _section(cls: type, name: str, values: Any):
    if not isinstance(values, dict):
        raise ValueError(f"[{name}] must be a table, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown keys in [{name}]: {unknown}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """A whole cluster file: ``[supervisor]``, ``[server]`` and ``[workers]``."""

    supervisor: SupervisorSection = dataclasses.field(default_factory=SupervisorSection)
    server: ServerSection = dataclasses.field(default_factory=ServerSection)
    workers: WorkersSection = dataclasses.field(default_factory=WorkersSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        """From parsed TOML; ValueError naming an unknown table or key, or a bad value."""
        sections = {"supervisor": SupervisorSection, "server": ServerSection, "workers": WorkersSection}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ValueError(f"unknown tables in the cluster file: {unknown}")
        return cls(**{name: _section(section, name, data.get(name, {}))
                      for name, section in sections.items()})

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, workers: int | None = None) -> ClusterConfig:
        """Defaults, then the cluster file at ``path`` (if any), then the flags given (non-None)."""
        data: dict[str, Any] = {}
        if path is not None:
            with open(pathlib.Path(path), "rb") as f:
                data = tomllib.load(f)
        if workers is not None:
            data.setdefault("workers", {})
            if isinstance(data["workers"], dict):
                data["workers"] = {**data["workers"], "count": workers}
        return cls.from_dict(data)

    def nodes(self) -> tuple[NodeSpec, ...]:
        """Every node in start order: the server, then the workers by index."""
        server = NodeSpec(SERVER_NAME, NodeRole.SERVER, self.server.child_spec(SERVER_NAME))
        workers = tuple(NodeSpec(worker_name(i), NodeRole.WORKER, self.workers.child_spec(worker_name(i)), i)
                        for i in range(self.workers.count))
        return (server, *workers)

    def supervisor_spec(self) -> SupervisorSpec:
        """The supervisor's spec: strategy, intensity and the children in start order."""
        s = self.supervisor
        return SupervisorSpec(tuple(node.child for node in self.nodes()), s.strategy,
                              s.max_restarts, s.period_s)
