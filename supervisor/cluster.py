"""The cluster file: what ``psgrid up`` runs, and how it supervises it.

A TOML file; every table and key is optional. The single-host form (the
default) runs everything on the machine ``psgrid up`` runs on::

    [supervisor]   strategy, max_restarts, period_s, host, port, check_interval_s
    [server]       host, port (0 = any; restarts reuse it), checkpoint_dir, args, + ChildSettings
    [workers]      count, device, args, + ChildSettings

The multi-host form adds one ``[hosts.NAME]`` table per machine (``address``,
``bind``, ``servers``, ``server_port``, ``workers``, ``device``), and each
machine runs ``psgrid up FILE --host NAME`` for its own nodes. ``[server]``
and ``[workers]`` then hold every server's and worker's defaults. One or more
hosts run servers, on fixed ports; the shards are numbered across those hosts
in file order, and shard 0 (node ``server``, on the first of them) is the
coordinator that workers and clients dial, told the other shards' addresses
with ``--shards``. docs/operations.md has the whole reference and its rules.

:class:`ClusterConfig` parses either form (defaults < file < flags) into
frozen sections validated on construction; :meth:`ClusterConfig.nodes` and
:meth:`ClusterConfig.supervisor_spec` give one host's children in start order:
``shard-1`` .. ``shard-{S-1}``, then ``server`` (it starts after the shards it
names), then the workers (``worker-i`` in the single-host form,
``<host>-worker-i`` in the multi-host form). Relative paths are relative to
the directory ``psgrid up`` runs in.

This module is the whole file: the tables together, the nodes they name and
the security files every node gets. The per-table dataclasses
(``SupervisorSection``, ``ServerSection``, ``WorkersSection``,
``HostSection``, ``ChildSettings``), their value checks, ``format_address``
and ``worker_name`` live in :mod:`psgrid.supervisor.sections`; they are
re-exported here, so importers keep using ``psgrid.supervisor.cluster``.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from psgrid.spec import tomllib
from psgrid.supervisor.nodes import NodeRole
from psgrid.supervisor.policy import ChildSpec, SupervisorSpec
from psgrid.supervisor.sections import (WILDCARD_HOSTS, ChildSettings, HostSection, ServerSection,
                                        SupervisorSection, WorkersSection, format_address, worker_name)

__all__ = [
    "ClusterConfig", "NodeSpec", "ChildSecurity", "SERVER_NAME", "LOCAL_HOST", "DEFAULT_SHARD_PORT",
    "shard_name",
    # re-exported from psgrid.supervisor.sections
    "SupervisorSection", "ServerSection", "WorkersSection", "HostSection", "ChildSettings",
    "WILDCARD_HOSTS", "format_address", "worker_name",
]

SERVER_NAME = "server"


#: The host name ``psgrid up --servers N`` gives this machine.
LOCAL_HOST = "local"
DEFAULT_SHARD_PORT = 7070


def _as_local_shards(data: dict[str, Any], servers: int) -> dict[str, Any]:
    """A single-host file as one ``[hosts.local]`` running ``servers`` shards."""
    if "hosts" in data:
        raise ValueError("--servers applies to the single-host form; set servers = N in [hosts.NAME]")
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    server, workers = data.setdefault("server", {}), data.setdefault("workers", {})
    host = server.pop("host", "127.0.0.1")
    port = server.pop("port", 0) or DEFAULT_SHARD_PORT  # shards are named by fixed addresses
    data["hosts"] = {LOCAL_HOST: {"address": "127.0.0.1" if host in WILDCARD_HOSTS else host,
                                  "bind": host, "servers": servers, "server_port": port,
                                  "workers": workers.pop("count", 2)}}
    return data


def shard_name(shard: int) -> str:
    """The node name of parameter-server shard ``shard``: ``server`` for the coordinator (0)."""
    return SERVER_NAME if shard == 0 else f"shard-{shard}"


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One node of the cluster: its name, role, supervision spec and how it is started.

    ``index`` is a worker's index on its host, or a server's shard (0: the
    coordinator). A server binds ``bind``:``port`` (0: any free port, single-host
    form only) and is dialled at ``advertise_host``; a worker uses ``device``
    and shares its machine with ``local_workers`` workers.
    """

    name: str
    role: NodeRole
    child: ChildSpec
    index: int = 0
    host: str = ""  # the [hosts.NAME] that runs it; "" in the single-host form
    bind: str = ""
    port: int = 0
    advertise_host: str = ""
    device: str = ""
    local_workers: int = 1


def _section(cls: type, table: str, values: Any, **fixed: Any):
    """``cls`` from TOML table ``table`` (plus ``fixed`` fields it may not set)."""
    if not isinstance(values, dict):
        raise ValueError(f"[{table}] must be a table, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown keys in [{table}]: {unknown}")
    return cls(**values, **fixed)


def _hosts(data: dict[str, Any]) -> tuple[HostSection, ...]:
    """The ``[hosts.NAME]`` tables; ValueError for keys the multi-host form takes from them."""
    if "hosts" not in data:
        return ()
    tables = data["hosts"]
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"[hosts] must hold one [hosts.NAME] table per machine, got {tables!r}")
    for table, key, instead in (("server", "host", "bind"), ("server", "port", "server_port"),
                                ("workers", "count", "workers")):
        if isinstance(data.get(table), dict) and key in data[table]:
            raise ValueError(f"{table}.{key} is not used in the multi-host form: "
                             f"set {instead} in each [hosts.NAME] table instead")
    return tuple(_section(HostSection, f"hosts.{name}", values, name=name)
                 for name, values in tables.items())


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """A whole cluster file: ``[supervisor]``, ``[server]``, ``[workers]`` and any ``[hosts.NAME]``."""

    supervisor: SupervisorSection = dataclasses.field(default_factory=SupervisorSection)
    server: ServerSection = dataclasses.field(default_factory=ServerSection)
    workers: WorkersSection = dataclasses.field(default_factory=WorkersSection)
    #: The machines of the multi-host form, in file order; empty in the single-host form.
    hosts: tuple[HostSection, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", tuple(self.hosts))
        if not self.hosts:
            return
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique, got {names}")
        if not any(h.servers for h in self.hosts):
            raise ValueError("no host runs servers: set servers = N on at least one [hosts.NAME] table")
        for arg in self.server.args:
            if arg.split("=", 1)[0] == "--shards":
                raise ValueError(f"server.args must not set {arg!r} in the multi-host form: "
                                 "the supervisor names the other shards to the coordinator")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        """From parsed TOML; ValueError naming an unknown table or key, or a bad value."""
        sections = {"supervisor": SupervisorSection, "server": ServerSection, "workers": WorkersSection}
        unknown = sorted(set(data) - set(sections) - {"hosts"})
        if unknown:
            raise ValueError(f"unknown tables in the cluster file: {unknown}")
        hosts = _hosts(data)
        return cls(**{name: _section(section, name, data.get(name, {}))
                      for name, section in sections.items()}, hosts=hosts)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, workers: int | None = None,
             servers: int | None = None) -> ClusterConfig:
        """Defaults, then the cluster file at ``path`` (if any), then the flags given (non-None).

        ``workers`` (``psgrid up --workers``) applies to the single-host form only.
        ``servers`` > 1 (``--servers``) turns it into one local host, ``LOCAL_HOST``,
        running that many parameter-server shards on consecutive ports from the
        ``[server]`` port (default ``DEFAULT_SHARD_PORT``).
        """
        data: dict[str, Any] = {}
        if path is not None:
            with open(pathlib.Path(path), "rb") as f:
                data = tomllib.load(f)
        if workers is not None:
            if "hosts" in data:
                raise ValueError("--workers applies to the single-host form; "
                                 "set workers = N in the [hosts.NAME] tables instead")
            data.setdefault("workers", {})
            if isinstance(data["workers"], dict):
                data["workers"] = {**data["workers"], "count": workers}
        if servers is not None and servers > 1:
            data = _as_local_shards(data, servers)
        return cls.from_dict(data)

    # ---- where things are ------------------------------------------------------------

    @property
    def multi_host(self) -> bool:
        """Whether the file has ``[hosts.NAME]`` tables."""
        return bool(self.hosts)

    @property
    def server_host(self) -> HostSection | None:
        """The host of the coordinator (the first that runs servers); None in the single-host form."""
        return next((h for h in self.hosts if h.servers), None)

    def shards(self) -> list[tuple[HostSection, int]]:
        """Every parameter-server shard as (host, index on that host), in shard order:
        the serving hosts in file order, each host's shards by port. Shard 0 is the
        coordinator."""
        return [(h, i) for h in self.hosts for i in range(h.servers)]

    def coordinator_address(self) -> str | None:
        """HOST:PORT workers and clients dial when the file fixes it; None while port 0 is unbound."""
        if self.server_host is not None:
            return self.server_host.server_address(0)
        return self.server.address(self.server.port) if self.server.port else None

    def shard_addresses(self) -> tuple[str, ...]:
        """The advertised addresses of shards 1..S-1, for the coordinator's ``--shards``."""
        return tuple(h.server_address(i) for h, i in self.shards()[1:])

    def check_host(self, host: str | None) -> None:
        """ValueError unless ``host`` selects nodes to run: a host name in the multi-host
        form (listing the names otherwise), None in the single-host form."""
        names = ", ".join(h.name for h in self.hosts)
        if not self.hosts and host is not None:
            raise ValueError(f"--host {host}: the cluster file has no [hosts.NAME] tables; "
                             "without --host it runs every node on this machine")
        if self.hosts and host is None:
            raise ValueError(f"the cluster file describes several machines: give --host NAME, "
                             f"one of: {names}")
        if self.hosts and host not in {h.name for h in self.hosts}:
            raise ValueError(f"no host named {host!r} in the cluster file; hosts: {names}")

    # ---- the nodes ---------------------------------------------------------------------

    def nodes(self, host: str | None = None) -> tuple[NodeSpec, ...]:
        """The nodes ``psgrid up --host host`` runs, in start order (see :meth:`check_host`).

        The host's shards by number, the coordinator ``server`` last among them
        (so it starts after the shards it names), then the workers by index.
        """
        self.check_host(host)
        if not self.hosts:
            server = NodeSpec(SERVER_NAME, NodeRole.SERVER, self.server.child_spec(SERVER_NAME),
                              bind=self.server.host, port=self.server.port,
                              advertise_host=self.server.dial_host)
            return (server, *(self._worker(i, "", self.workers.count, self.workers.device)
                              for i in range(self.workers.count)))
        h = next(h for h in self.hosts if h.name == host)
        mine = [(s, i) for s, (owner, i) in enumerate(self.shards()) if owner is h]
        mine.sort(key=lambda shard: shard[0] == 0)  # the coordinator after the shards it names
        servers = tuple(NodeSpec(shard_name(s), NodeRole.SERVER, self.server.child_spec(shard_name(s)),
                                 s, h.name, bind=h.bind, port=h.server_port + i, advertise_host=h.address)
                        for s, i in mine)
        workers = tuple(self._worker(i, h.name, h.workers, h.device or self.workers.device)
                        for i in range(h.workers))
        return (*servers, *workers)

    def _worker(self, index: int, host: str, local: int, device: str) -> NodeSpec:
        name = worker_name(index, host)
        return NodeSpec(name, NodeRole.WORKER, self.workers.child_spec(name), index, host,
                        device=device, local_workers=max(1, local))

    def all_nodes(self) -> tuple[NodeSpec, ...]:
        """Every node of the cluster, host by host in file order."""
        if not self.hosts:
            return self.nodes()
        return tuple(node for h in self.hosts for node in self.nodes(h.name))

    def supervisor_spec(self, host: str | None = None) -> SupervisorSpec:
        """The spec of ``psgrid up --host host``: strategy, intensity, its children in start order."""
        s = self.supervisor
        return SupervisorSpec(tuple(node.child for node in self.nodes(host)), s.strategy,
                              s.max_restarts, s.period_s)

    # ---- command lines -----------------------------------------------------------------

    def server_argv(self, node: NodeSpec, port: int, port_file: str | os.PathLike,
                    advertise: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        """``psgrid server`` arguments of server ``node`` binding ``port`` (0: any).

        The coordinator gets ``--shards``; in the multi-host form each shard
        checkpoints to its own ``<checkpoint_dir>/<node name>``; every shard but
        the coordinator is told its name (``--shard-name shard-1``) and writes its
        own update log (``updates.jsonl`` -> ``updates.shard-1.jsonl``).
        """
        checkpoint_dir = self.server.checkpoint_dir
        if self.hosts and checkpoint_dir:
            checkpoint_dir = os.path.join(checkpoint_dir, node.name)
        return self.server.argv(port, port_file, host=node.bind, advertise=advertise,
                                shards=self.shard_addresses() if node.index == 0 else (),
                                checkpoint_dir=checkpoint_dir, name=node.name if node.index else None,
                                extra=extra)

    def worker_argv(self, node: NodeSpec, server_address: str, liveness_file: str | os.PathLike,
                    extra: tuple[str, ...] = ()) -> list[str]:
        """``psgrid worker`` arguments of worker ``node`` dialling ``server_address``."""
        return self.workers.argv(node.index, server_address, liveness_file, name=node.name,
                                 local_workers=node.local_workers, device=node.device, extra=extra)


@dataclasses.dataclass(frozen=True)
class ChildSecurity:
    """The security files ``psgrid up`` was given; every node it starts gets them too.

    Paths are made absolute, so a node finds them whatever its working
    directory. A token from the environment (``PSGRID_TOKEN``) reaches the
    nodes by inheritance and is never put on a command line.
    """

    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value:
                object.__setattr__(self, field.name, os.path.abspath(value))

    def argv(self) -> tuple[str, ...]:
        """``--token-file F --tls-ca F ...`` for the files given."""
        out: list[str] = []
        for field in dataclasses.fields(self):
            if getattr(self, field.name):
                out += [f"--{field.name.replace('_', '-')}", getattr(self, field.name)]
        return tuple(out)
