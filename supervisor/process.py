"""Supervise real ``python -m psgrid server|worker`` processes on this machine.

:class:`ProcessSupervisor` fills in the four steps of
:class:`psgrid.supervisor.base.Supervisor` with operating-system processes,
for the nodes one ``psgrid up`` runs (every node in the single-host form, one
host's in the multi-host form):

* start: each child in its own session (so a signal reaches its whole process
  group and a terminal's Ctrl-C does not), output appended to
  ``<run_dir>/<name>.log`` so restarts keep the history. A server is started
  with ``--port-file`` and :meth:`start_child` waits for that file: its first
  start binds the configured port (0 = any, single-host form only), every
  restart binds the port it got then, so workers and clients keep dialling one
  address. It is told ``--advertise``, the address others dial, whenever that
  is known before the start. Workers are told the coordinator's address, a
  stable ``--name`` (the server gives a restarted worker its rank and step back
  by name) and a ``--liveness-file``. Every child gets the security files
  ``psgrid up`` was given (:class:`ChildSecurity`).
* stop: SIGTERM (and SIGCONT, so a stopped process can act on it) to the
  process group, SIGKILL after the grace, and always reap: no zombies.
* liveness: a server must answer the standard gRPC health check (service
  "") with SERVING within ``health_timeout_s``, asked over TLS when TLS is
  configured (health needs no token); a worker must have touched its liveness
  file within ``liveness_file_max_age_s`` (its launch counts as the first
  touch). The base class kills a child that stays unlive longer than its
  ``liveness_timeout_s``.
"""
from __future__ import annotations

import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psgrid import rpc
from psgrid.errors import SupervisorStopped, UnknownNode
from psgrid.limits import quote
from psgrid.security import Security
from psgrid.supervisor.base import ChildStatus, Supervisor
from psgrid.supervisor.cluster import SERVER_NAME, ChildSecurity, ClusterConfig, NodeSpec, format_address
from psgrid.supervisor.nodes import NodeInfo, NodeRole
from psgrid.supervisor.policy import ChildSpec, ExitReason

logger = logging.getLogger(__name__)

#: Reconnect quickly to a restarted server instead of gRPC's default back-off
#: (up to two minutes), which would fail the health checks of a healthy server.
_HEALTH_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class ChildStartError(RuntimeError):
    """A child exited, or did not get ready in time, while it was being started."""


def terminate(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop ``proc``'s process group: SIGTERM, SIGKILL after ``grace_s``; reap ``proc``.

    Fine on a process that has already exited. Whatever else is left in the
    group afterwards (helpers the child spawned) is killed as well.
    """
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_group(proc.pid, signal.SIGCONT)  # a SIGSTOPped child cannot act on SIGTERM
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("[supervisor] pid %d outlived its %gs grace: SIGKILL", proc.pid, grace_s)
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone (PermissionError: macOS, for a group of zombies)


class ProcessSupervisor(Supervisor):
    """Runs one host's nodes of a :class:`ClusterConfig` as local processes and keeps them running.

    ``host`` selects the nodes as ``psgrid up --host`` does (None: the
    single-host form); ValueError when it does not fit the file. Thread
    safety as in the base class: one thread drives :meth:`start_all`,
    :meth:`tick` and :meth:`shutdown`; :meth:`nodes`, :meth:`node` and
    :meth:`restart_node` are safe from any thread (the gRPC service calls them).
    """

    def __init__(self, config: ClusterConfig, run_dir: str | os.PathLike, log_level: str = "INFO",
                 clock: Callable[[], float] = time.monotonic, liveness_file_max_age_s: float = 2.0,
                 health_timeout_s: float = 1.0, rng: random.Random | None = None,
                 host: str | None = None, security: ChildSecurity | None = None) -> None:
        super().__init__(config.supervisor_spec(host), rng)
        self.config = config
        self.host = host
        self.security = security or ChildSecurity()
        # The probe presents the TLS files but no token: health is open, and a
        # token must not travel where it is not needed.
        self._probe_security = Security.from_files(
            ca=self.security.tls_ca, cert=self.security.tls_cert, key=self.security.tls_key)
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_level = log_level
        self.clock = clock
        self.liveness_file_max_age_s = liveness_file_max_age_s
        self.health_timeout_s = health_timeout_s
        self._nodes = {node.name: node for node in config.nodes(host)}
        self._procs: dict[str, subprocess.Popen] = {}
        self._launched_at: dict[str, float] = {}  # wall-clock time, to compare with file mtimes
        # The port every start of a server binds: the configured one, else the first one bound.
        self._ports: dict[str, int | None] = {
            n.name: n.port or None for n in self._nodes.values() if n.role is NodeRole.SERVER}
        self._health: dict[str, tuple[grpc.Channel, health_pb2_grpc.HealthStub]] = {}
        self._closing = False

    # ---- where things are -------------------------------------------------------------

    @property
    def server_address(self) -> str | None:
        """HOST:PORT workers and clients dial (the coordinator's advertised address);
        None while its port is 0 and not yet reported."""
        return self.config.coordinator_address() or self.address_of(SERVER_NAME)

    def address_of(self, name: str) -> str | None:
        """The advertised HOST:PORT of local server ``name``; None while unknown (or not a server)."""
        port = self._ports.get(name)
        return None if port is None else format_address(self._nodes[name].advertise_host, port)

    def server_nodes(self) -> tuple[NodeSpec, ...]:
        """The servers this supervisor runs, in start order."""
        return tuple(n for n in self._nodes.values() if n.role is NodeRole.SERVER)

    def log_path(self, name: str) -> pathlib.Path:
        """The log of node ``name``; every start of it appends here."""
        return self.run_dir / f"{name}.log"

    def liveness_path(self, name: str) -> pathlib.Path:
        """The file worker ``name`` touches every heartbeat."""
        return self.run_dir / f"{name}.alive"

    # ---- the four steps of the base class --------------------------------------------

    def start_child(self, spec: ChildSpec) -> int:
        """Launch node ``spec.name``; for a server, wait until it reports its port.

        Raises ChildStartError when a server exits or stays silent for
        ``start_timeout_s`` first (it is stopped then), or when a worker is to
        start before the server ever reported an address.
        """
        node = self._nodes[spec.name]
        if node.role is NodeRole.SERVER:
            return self._start_server(node)
        address = self.server_address
        if address is None:
            raise ChildStartError(f"{spec.name}: the server has not reported its port yet")
        liveness = self.liveness_path(spec.name)
        liveness.unlink(missing_ok=True)  # an old file must not vouch for the new process
        argv = self.config.worker_argv(node, address, liveness, extra=self.security.argv())
        pid = self._spawn(spec.name, argv).pid
        self._launched_at[spec.name] = time.time()
        return pid

    def stop_child(self, name: str, grace_s: float) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            terminate(proc, grace_s)

    def poll_child(self, name: str) -> ExitReason | None:
        proc = self._procs.get(name)
        if proc is None:  # never launched, or already reported
            return ExitReason.start_failed()
        returncode = proc.poll()
        if returncode is None:
            return None
        del self._procs[name]
        _signal_group(proc.pid, signal.SIGKILL)  # helpers it left behind
        return ExitReason.from_returncode(returncode)

    def is_live(self, name: str, now: float) -> bool:
        if self._nodes[name].role is NodeRole.SERVER:
            return self._serving(name)
        # The launch counts as a touch: the base class may date a start early (it
        # passes one `now` to every start, and a server's start blocks), and a
        # new process needs a moment to create its file.
        last = self._launched_at.get(name, 0.0)
        try:
            last = max(last, self.liveness_path(name).stat().st_mtime)
        except FileNotFoundError:
            pass
        return time.time() - last <= self.liveness_file_max_age_s

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop every node in reverse start order (see the base class); kill any stray process."""
        self._closing = True
        try:
            super().shutdown(grace_s)
        finally:
            for name in list(self._procs):  # none should be left; nothing may outlive us
                logger.warning("[supervisor] %s was still running at shutdown: killing it", name)
                terminate(self._procs.pop(name), 0.0)
            for name in list(self._health):
                self._close_health(name)

    # ---- operator view ------------------------------------------------------------------

    def nodes(self) -> tuple[NodeInfo, ...]:
        """A snapshot of every node, in start order."""
        now = self.clock()
        return tuple(self._info(status, now) for status in self.statuses())

    def node(self, name: str) -> NodeInfo:
        """A snapshot of node ``name``; UnknownNode when there is none."""
        if name not in self._nodes:
            raise UnknownNode(f"no node named {quote(name)}; nodes: {', '.join(self._nodes)}")
        return self._info(self.status(name), self.clock())

    def restart_node(self, name: str) -> NodeInfo:
        """Ask for node ``name`` to be restarted at once; returns it as it was.

        UnknownNode for an unknown name; SupervisorStopped once the supervisor
        shuts down or gave up. See :meth:`Supervisor.request_restart`.
        """
        info = self.node(name)
        if self._closing or self.gave_up:
            raise SupervisorStopped("the supervisor is stopping; it restarts nothing any more")
        self.request_restart(name)
        return info

    def _info(self, status: ChildStatus, now: float) -> NodeInfo:
        node = self._nodes[status.name]
        running = status.state.alive and status.last_start is not None
        return NodeInfo(
            name=status.name, role=node.role, state=status.state,
            address=self.address_of(node.name) or "", pid=status.pid if status.state.alive else None,
            restarts=status.restarts, uptime_s=max(0.0, now - status.last_start) if running else 0.0,
            last_exit="" if status.last_exit is None else str(status.last_exit),
        )

    # ---- processes -----------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "psgrid", "--log-level", self.log_level, *argv]
        with open(self.log_path(name), "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== {stamp} psgrid up: starting {name}: {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self._procs[name] = proc
        return proc

    def _start_server(self, node: NodeSpec) -> int:
        port_file = self.run_dir / f"{node.name}.port"
        port_file.unlink(missing_ok=True)
        argv = self.config.server_argv(node, self._ports[node.name] or 0, port_file,
                                       advertise=self.address_of(node.name), extra=self.security.argv())
        proc = self._spawn(node.name, argv)
        try:
            port = self._await_port(node.name, proc, port_file, self.config.server.start_timeout_s)
        except BaseException:
            self._procs.pop(node.name, None)
            terminate(proc, 0.0)
            raise
        if self._ports[node.name] is None:
            self._ports[node.name] = port
            logger.info("[supervisor] %s bound %s; restarts will bind it again",
                        node.name, self.address_of(node.name))
        self._open_health(node.name)
        return proc.pid

    def _await_port(self, name: str, proc: subprocess.Popen, port_file: pathlib.Path,
                    timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            try:
                returncode = proc.wait(0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise ChildStartError(f"{name} did not report its port within {timeout_s:g}s; "
                                          f"see {self.log_path(name)}") from None
                continue
            raise ChildStartError(f"{name} exited ({ExitReason.from_returncode(returncode)}) before "
                                  f"reporting its port; see {self.log_path(name)}")
        return int(port_file.read_text())

    # ---- server health -------------------------------------------------------------------

    def _open_health(self, name: str) -> None:
        # A fresh channel per server process: the old one may sit in reconnect back-off.
        self._close_health(name)
        channel = rpc.make_channel(self.address_of(name), _HEALTH_CHANNEL_OPTIONS, self._probe_security)
        self._health[name] = (channel, health_pb2_grpc.HealthStub(channel))

    def _close_health(self, name: str) -> None:
        channel, _ = self._health.pop(name, (None, None))
        if channel is not None:
            channel.close()

    def _serving(self, name: str) -> bool:
        if name not in self._health:
            return False
        try:
            reply = self._health[name][1].Check(health_pb2.HealthCheckRequest(service=""),
                                                timeout=self.health_timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
