"""The tables of the cluster file: one frozen dataclass per table, validated on construction.

``[supervisor]`` (:class:`SupervisorSection`), ``[server]``
(:class:`ServerSection`), ``[workers]`` (:class:`WorkersSection`), each
``[hosts.NAME]`` (:class:`HostSection`), and the supervision settings the
node tables share (:class:`ChildSettings`). Each raises a ValueError naming
the bad key and value; the server and workers tables also build their nodes'
command lines. What the tables mean together (the single- and multi-host forms, which nodes run
where) is :class:`psgrid.supervisor.cluster.ClusterConfig`'s business; that
module re-exports these names.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, ClassVar

from psgrid.supervisor.policy import ChildSpec, RestartType, Strategy

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
#: A host name becomes part of node and log-file names.
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def worker_name(index: int, host: str = "") -> str:
    """The stable name of worker ``index`` (of ``host`` in the multi-host form).

    A restart keeps it, and with it the worker's rank; the host prefix keeps
    names unique across the cluster.
    """
    return f"{host}-worker-{index}" if host else f"worker-{index}"


def _port(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be an int in 0..65535, got {value!r}")


def _count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


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


def shard_path(path: str, name: str) -> str:
    """``path`` with ``name`` before its suffix: ``run/updates.jsonl`` -> ``run/updates.shard-1.jsonl``."""
    head, tail = os.path.split(path)
    stem, _, suffix = tail.rpartition(".")
    return os.path.join(head, f"{stem}.{name}.{suffix}" if stem else f"{tail}.{name}")


def _own_update_log(args: tuple[str, ...], name: str) -> list[str]:
    """``args`` with the ``--update-log`` path (either form) made shard ``name``'s own."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--update-log" and i + 1 < len(out):
            out[i + 1] = shard_path(out[i + 1], name)
        elif arg.startswith("--update-log="):
            out[i] = "--update-log=" + shard_path(arg.split("=", 1)[1], name)
    return out


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
    """The ``[server]`` table: parameter servers, checked by gRPC health."""

    #: Flags the supervisor passes itself; ``args`` may not repeat them.
    SECTION: ClassVar[str] = "server"
    RESERVED: ClassVar[tuple[str, ...]] = (
        "--host", "--port", "--port-file", "--checkpoint-dir", "--advertise", "--shard-name")

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

    def argv(self, port: int, port_file: str | os.PathLike, *, host: str | None = None,
             advertise: str | None = None, shards: tuple[str, ...] = (),
             checkpoint_dir: str | None = None, name: str | None = None,
             extra: tuple[str, ...] = ()) -> list[str]:
        """``psgrid server`` arguments binding ``port`` (0: any) and reporting it in ``port_file``.

        ``host`` and ``checkpoint_dir`` default to this table's; ``advertise``
        and ``shards`` are passed when given; ``extra`` (security flags) goes
        before ``args``, so a flag repeated in ``args`` wins. ``name`` (a shard
        other than the coordinator) becomes ``--shard-name`` and goes into the
        ``--update-log`` path of ``args``, so that each shard writes its own log.
        """
        argv = ["server", "--host", self.host if host is None else host, "--port", str(port),
                "--port-file", str(port_file)]
        if advertise:
            argv += ["--advertise", advertise]
        if shards:
            argv += ["--shards", ",".join(shards)]
        checkpoint_dir = self.checkpoint_dir if checkpoint_dir is None else checkpoint_dir
        if checkpoint_dir:
            argv += ["--checkpoint-dir", checkpoint_dir]
        if name:
            argv += ["--shard-name", name]
        return argv + list(extra) + (_own_update_log(self.args, name) if name else list(self.args))


@dataclasses.dataclass(frozen=True)
class WorkersSection(ChildSettings):
    """The ``[workers]`` table: identical workers, checked by a liveness file.

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
        _count("workers.count", self.count)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"workers.device must be a non-empty string, got {self.device!r}")
        object.__setattr__(self, "args", _args("workers", self.args, self.RESERVED))
        super().__post_init__()

    def argv(self, index: int, server_address: str, liveness_file: str | os.PathLike, *,
             name: str | None = None, local_workers: int | None = None, device: str | None = None,
             extra: tuple[str, ...] = ()) -> list[str]:
        """``psgrid worker`` arguments for worker ``index`` of a server at ``server_address``.

        ``name``, ``local_workers`` and ``device`` default to the single-host
        form's; ``extra`` (security flags) goes before ``args``.
        """
        return ["worker", "--server", server_address, "--name", name or worker_name(index),
                "--local-workers", str(local_workers or max(1, self.count)),
                "--device", device or self.device, "--liveness-file", str(liveness_file),
                *extra, *self.args]


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
        _count("supervisor.max_restarts", self.max_restarts)
        _positive("supervisor.period_s", self.period_s)
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"supervisor.host must be a non-empty string, got {self.host!r}")
        _port("supervisor.port", self.port)
        _positive("supervisor.check_interval_s", self.check_interval_s)


@dataclasses.dataclass(frozen=True)
class HostSection:
    """A ``[hosts.NAME]`` table: one machine of a multi-host cluster and the nodes it runs.

    ``address`` is what other machines dial (never a wildcard); ``bind`` what
    its servers bind (default: ``address``). Shard i binds ``server_port + i``,
    a fixed port: other machines must know it before the server starts.
    """

    name: str
    address: str = ""
    bind: str = ""
    servers: int = 0
    server_port: int = 0
    workers: int = 0
    device: str = ""  # "" = the [workers] table's

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _HOST_NAME.match(self.name):
            raise ValueError(f"host name {self.name!r} must start with a letter or digit and hold "
                             "only letters, digits, '.', '_' and '-'")
        where = f"hosts.{self.name}"
        if not isinstance(self.address, str) or self.address in WILDCARD_HOSTS:
            raise ValueError(f"{where}.address must be the address other machines dial "
                             f"(not empty, not a wildcard), got {self.address!r}")
        if not isinstance(self.bind, str):
            raise ValueError(f"{where}.bind must be a string, got {self.bind!r}")
        object.__setattr__(self, "bind", self.bind or self.address)
        _count(f"{where}.servers", self.servers)
        _count(f"{where}.workers", self.workers)
        _port(f"{where}.server_port", self.server_port)
        if not isinstance(self.device, str):
            raise ValueError(f"{where}.device must be a string, got {self.device!r}")
        if self.servers and not self.server_port:
            raise ValueError(f"{where}.server_port must be a fixed port, not 0: other machines "
                             "dial the servers before they start")
        if self.servers and self.server_port + self.servers - 1 > 65535:
            raise ValueError(f"{where}: {self.servers} servers from server_port {self.server_port} "
                             "run past port 65535")
        if not self.servers and self.server_port:
            raise ValueError(f"{where}.server_port is {self.server_port} but the host runs no servers")
        if not self.servers and not self.workers:
            raise ValueError(f"{where} runs nothing: give it servers or workers")

    def server_address(self, shard: int) -> str:
        """HOST:PORT other machines dial for shard ``shard`` of this host."""
        return format_address(self.address, self.server_port + shard)
