"""Run a parameter-server process: the gRPC server, health, signals, shutdown."""
from __future__ import annotations

import logging
import signal
import threading

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from psgrid import channel, shm
from psgrid.guard import LIVENESS, HealthPort, make_server
from psgrid.portfile import write_port_file
from psgrid.security import Security
from psgrid.server.checkpoint import CheckpointStore
from psgrid.server.config import ServerConfig
from psgrid.server.core import ParameterServerCore
from psgrid.server.service import handlers

logger = logging.getLogger(__name__)

SERVICES = ("psgrid.v1.ParameterServer", "psgrid.v1.JobService")


class ParameterServerApp:
    """A started gRPC server around one core; ``port`` is the bound port."""

    def __init__(self, config: ServerConfig, security: Security | None = None):
        self.config = config
        security = security or Security()
        # Health first: with a health port, probes see "alive, not ready" while checkpoints restore.
        self.health = health.HealthServicer()
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health_port = None
        if config.health_port is not None:
            self.health_port = HealthPort(self.health, config.host, config.health_port)
            logger.info("[ps] health (grpc.health.v1 alone, plaintext) on port %d", self.health_port.port)
        try:
            self._build(config, security)
        except BaseException:
            if self.health_port is not None:
                self.health_port.stop(0)
            if getattr(self, "listener", None) is not None:
                self.listener.close()
            raise

    def _build(self, config: ServerConfig, security: Security) -> None:
        self.checkpoints = None
        if config.checkpoint_dir:
            self.checkpoints = CheckpointStore(config.checkpoint_dir, keep=config.keep_checkpoints)
        self.core = ParameterServerCore(config, checkpoints=self.checkpoints)
        if config.shared_memory:
            shm.sweep()  # segments a killed server left behind
        if self.checkpoints:
            self.core.restore()
            self.core.retire()
        self.server = make_server("ps-rpc", SERVICES, security, config.admission())
        self.listener: channel.Listener | None = None
        offer = config.step_channel and not security.tls  # under TLS its frames would travel in the clear
        # A token without TLS only ever travels to loopback (psgrid.security), so its workers are
        # all on this host: the channel listens there alone.
        self._channel_host = "127.0.0.1" if security.token is not None else config.host
        self.server.add_generic_rpc_handlers(handlers(self.core, self._make_listener if offer else None))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = security.add_port(self.server, f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._every, args=(config.heartbeat_interval_s, self._tick),
                                          name="ps-reaper", daemon=True)]
        if self.checkpoints:
            self._threads.append(threading.Thread(
                target=self._every, args=(config.checkpoint_interval_s, self._checkpoint),
                name="ps-checkpoint", daemon=True))

    def _make_listener(self, service) -> channel.Listener | None:
        try:
            self.listener = channel.Listener(self._channel_host, channel.Tickets(), service.serve_channel,
                                             idle_s=self.config.connection_idle_s)
        except OSError as exc:  # the channel is an optimisation: the server serves without it
            logger.warning("[ps] no direct step channel: cannot listen on %s: %s", self._channel_host, exc)
        return self.listener

    def _tick(self) -> None:
        """Drop silent workers from their barriers, release finished jobs past retention."""
        self.core.reap()
        self.core.retire()

    def _checkpoint(self) -> None:
        self.core.checkpoint()

    def _every(self, interval: float, task) -> None:
        while not self._stopping.wait(interval):
            try:
                task()
            except Exception:  # noqa: BLE001 - a periodic task must outlive a bad tick
                logger.exception("[ps] %s failed", getattr(task, "__name__", task))

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def advertised(self) -> str:
        """HOST:PORT other machines should dial (``--advertise``); the bound address by default."""
        return self.config.advertise or self.address

    def start(self) -> "ParameterServerApp":
        self.server.start()
        if self.listener is not None:
            self.listener.start()
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for thread in self._threads:
            thread.start()
        if self.config.port_file:
            write_port_file(self.config.port_file, self.port)
        logger.info("[ps] serving on %s", self.address)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Go NOT_SERVING, let in-flight calls finish within ``grace``, then stop."""
        self.health.enter_graceful_shutdown()
        self._stopping.set()
        self.server.stop(grace).wait()
        if self.listener is not None:
            self.listener.close()
        for thread in self._threads:
            thread.join()
        if self.checkpoints:
            saved = self.core.checkpoint()
            logger.info("[ps] final checkpoint: %d job(s) saved", saved)
        self.core.close()
        if self.health_port is not None:
            self.health_port.stop()
        logger.info("[ps] stopped")


def serve(config: ServerConfig, security: Security | None = None,
          stop: threading.Event | None = None, grace: float = 5.0, on_start=None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); ``on_start(app)`` runs once serving."""
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    app = ParameterServerApp(config, security).start()
    if on_start is not None:
        on_start(app)
    try:
        stop.wait()
    finally:
        app.stop(grace)
