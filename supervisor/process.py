"""Supervise real ``python -m psgrid server|worker`` processes on this machine.

:class:`ProcessSupervisor` fills in the four steps of
:class:`psgrid.supervisor.base.Supervisor` with operating-system processes:

* start: each child in its own session (so a signal reaches its whole process
  group and a terminal's Ctrl-C does not), output appended to
  ``<run_dir>/<name>.log`` so restarts keep the history. The server is started
  with ``--port-file`` and :meth:`start_child` waits for that file: its first
  start binds the configured port (0 = any), every restart binds the port it
  got then, so workers and clients keep dialling one address. Workers are
  told that address, a stable ``--name`` (the server gives a restarted worker
  its rank and step back by name) and a ``--liveness-file``.
* stop: SIGTERM (and SIGCONT, so a stopped process can act on it) to the
  process group, SIGKILL after the grace, and always reap: no zombies.
* liveness: the server must answer the standard gRPC health check (service
  "") with SERVING within ``health_timeout_s``; a worker must have touched its
  liveness file within ``liveness_file_max_age_s`` (its launch counts as the
  first touch). The base class kills a child that stays unlive longer than its
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
from psgrid.supervisor.base import ChildStatus, Supervisor
from psgrid.supervisor.cluster import SERVER_NAME, ClusterConfig
from psgrid.errors import SupervisorStopped, UnknownNode
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
    """Runs a :class:`ClusterConfig`'s nodes as local processes and keeps them running.

    Thread safety as in the base class: one thread drives :meth:`start_all`,
    :meth:`tick` and :meth:`shutdown`; :meth:`nodes`, :meth:`node` and
    :meth:`restart_node` are safe from any thread (the gRPC service calls them).
    """

    def __init__(self, config: ClusterConfig, run_dir: str | os.PathLike, log_level: str = "INFO",
                 clock: Callable[[], float] = time.monotonic, liveness_file_max_age_s: float = 2.0,
                 health_timeout_s: float = 1.0, rng: random.Random | None = None) -> None:
        super().__init__(config.supervisor_spec(), rng)
        self.config = config
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_level = log_level
        self.clock = clock
        self.liveness_file_max_age_s = liveness_file_max_age_s
        self.health_timeout_s = health_timeout_s
        self._nodes = {node.name: node for node in config.nodes()}
        self._procs: dict[str, subprocess.Popen] = {}
        self._launched_at: dict[str, float] = {}  # wall-clock time, to compare with file mtimes
        # The port every server start binds: the configured one, else the first one bound.
        self._server_port: int | None = config.server.port or None
        self._health_channel: grpc.Channel | None = None
        self._health_stub: health_pb2_grpc.HealthStub | None = None
        self._closing = False

    # ---- where things are -------------------------------------------------------------

    @property
    def server_address(self) -> str | None:
        """HOST:PORT workers and clients dial; None while the port is 0 and not yet reported."""
        return None if self._server_port is None else self.config.server.address(self._server_port)

    def log_path(self, name: str) -> pathlib.Path:
        """The log of node ``name``; every start of it appends here."""
        return self.run_dir / f"{name}.log"

    def liveness_path(self, name: str) -> pathlib.Path:
        """The file worker ``name`` touches every heartbeat."""
        return self.run_dir / f"{name}.alive"

    # ---- the four steps of the base class --------------------------------------------

    def start_child(self, spec: ChildSpec) -> int:
        """Launch node ``spec.name``; for the server, wait until it reports its port.

        Raises ChildStartError when the server exits or stays silent for
        ``start_timeout_s`` first (it is stopped then), or when a worker is to
        start before the server ever reported an address.
        """
        node = self._nodes[spec.name]
        if node.role is NodeRole.SERVER:
            return self._start_server()
        address = self.server_address
        if address is None:
            raise ChildStartError(f"{spec.name}: the server has not reported its port yet")
        liveness = self.liveness_path(spec.name)
        liveness.unlink(missing_ok=True)  # an old file must not vouch for the new process
        argv = self.config.workers.argv(node.index, address, liveness)
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
            return self._server_serving()
        # The launch counts as a touch: the base class may date a start early (it
        # passes one `now` to every start, and the server's start blocks), and a
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
            self._close_health()

    # ---- operator view ------------------------------------------------------------------

    def nodes(self) -> tuple[NodeInfo, ...]:
        """A snapshot of every node, in start order."""
        now = self.clock()
        return tuple(self._info(status, now) for status in self.statuses())

    def node(self, name: str) -> NodeInfo:
        """A snapshot of node ``name``; UnknownNode when there is none."""
        if name not in self._nodes:
            raise UnknownNode(f"no node named {name!r}; nodes: {', '.join(self._nodes)}")
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
            address=(self.server_address or "") if node.role is NodeRole.SERVER else "",
            pid=status.pid if status.state.alive else None, restarts=status.restarts,
            uptime_s=max(0.0, now - status.last_start) if running else 0.0,
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

    def _start_server(self) -> int:
        server = self.config.server
        port_file = self.run_dir / f"{SERVER_NAME}.port"
        port_file.unlink(missing_ok=True)
        proc = self._spawn(SERVER_NAME, server.argv(self._server_port or 0, port_file))
        try:
            port = self._await_port(proc, port_file, server.start_timeout_s)
        except BaseException:
            self._procs.pop(SERVER_NAME, None)
            terminate(proc, 0.0)
            raise
        if self._server_port is None:
            self._server_port = port
            logger.info("[supervisor] server bound %s; restarts will bind it again", self.server_address)
        self._open_health()
        return proc.pid

    def _await_port(self, proc: subprocess.Popen, port_file: pathlib.Path, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            try:
                returncode = proc.wait(0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise ChildStartError(f"server did not report its port within {timeout_s:g}s; "
                                          f"see {self.log_path(SERVER_NAME)}") from None
                continue
            raise ChildStartError(f"server exited ({ExitReason.from_returncode(returncode)}) before "
                                  f"reporting its port; see {self.log_path(SERVER_NAME)}")
        return int(port_file.read_text())

    # ---- server health -------------------------------------------------------------------

    def _open_health(self) -> None:
        # A fresh channel per server process: the old one may sit in reconnect back-off.
        self._close_health()
        self._health_channel = rpc.make_channel(self.server_address, _HEALTH_CHANNEL_OPTIONS)
        self._health_stub = health_pb2_grpc.HealthStub(self._health_channel)

    def _close_health(self) -> None:
        if self._health_channel is not None:
            self._health_channel.close()
        self._health_channel = self._health_stub = None

    def _server_serving(self) -> bool:
        if self._health_stub is None:
            return False
        try:
            reply = self._health_stub.Check(health_pb2.HealthCheckRequest(service=""),
                                            timeout=self.health_timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
