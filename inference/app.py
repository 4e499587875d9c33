"""Run an inference server: pipeline, model registry, source follower, gRPC, health.

Health (``grpc.health.v1``, for "" and ``psgrid.v1.Inference``) is
NOT_SERVING until the first model version is loaded, SERVING after, and
NOT_SERVING again from the start of shutdown.

Authentication and TLS come from :mod:`psgrid.security`, as for every psgrid
server: with a cluster token (``security=Security(token=...)``) every Inference
RPC needs ``authorization: Bearer <token>`` and is refused UNAUTHENTICATED
before its request is parsed (health stays open); with a certificate the
server speaks TLS, and with a CA as well it requires client certificates
(mutual TLS). ``psgrid serve`` builds the :class:`~psgrid.security.Security`
from ``--token-file`` (else ``PSGRID_TOKEN``) and ``--tls-ca``/``--tls-cert``/``--tls-key``.
"""
from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from psgrid.inference import arrays
from psgrid.guard import LIVENESS, Admission, HealthPort, make_server
from psgrid.security import Security
from psgrid.inference.config import ServeConfig, resolve
from psgrid.inference.models import ModelRegistry
from psgrid.inference.pipeline import Pipeline, chain
from psgrid.inference.service import SERVICE, InferenceService, handlers
from psgrid.inference.sources import CheckpointSource, Follower, JobSource, ModelSource
from psgrid.portfile import write_port_file
from psgrid.device import default_threads, pick_device, set_threads

logger = logging.getLogger(__name__)

#: Room above max_request_bytes for the rest of a request message.
_MESSAGE_SLACK = 64 << 10


def make_source(config: ServeConfig, security: Security | None = None) -> ModelSource:
    """The source a config names: a job on a parameter server, or a checkpoint directory."""
    if config.follow_job is not None:
        return JobSource(config.server, config.follow_job, security=security)
    return CheckpointSource(config.checkpoint_dir, config.job_id)


class InferenceApp:
    """A started inference server around one pipeline; ``port`` is the bound port.

    ``source`` defaults to the one ``config`` names; ``preprocess`` and
    ``features`` callables override the config's import paths.
    """

    def __init__(self, config: ServeConfig, source: ModelSource | None = None, *,
                 preprocess: Callable[[Any], Any] | None = None,
                 features: Callable[[Any], Any] | None = None,
                 security: Security | None = None):
        self.config = config
        security = security or Security()
        # User stage functions always receive tensors (requests travel as numpy arrays).
        preprocess = arrays.on_tensors(preprocess or resolve(config.preprocess))
        features = arrays.on_tensors(features or resolve(config.features))
        self.registry = ModelRegistry(pick_device(config.device), config.input_spec(),
                                      transform=chain(preprocess, features),
                                      allowed_modules=config.allowed_modules)
        self.pipeline = Pipeline(
            self.registry.run_batch, preprocess=preprocess, features=features,
            max_batch_size=config.max_batch_size, batch_timeout_s=config.batch_timeout_s,
            queue_capacity=config.queue_capacity, preprocess_concurrency=config.preprocess_concurrency,
            features_concurrency=config.features_concurrency, batch_concurrency=config.batch_concurrency)
        self.source = source or make_source(config, security)
        self.follower = Follower(self.source, self.registry, config.poll_interval_s, on_swap=self._serving)
        self.health = health.HealthServicer()
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self.server = self._grpc_server(security)
        address = f"{config.host}:{config.port}"
        self.port = security.add_port(self.server, address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self.health_port = None
        if config.health_port is not None:
            self.health_port = HealthPort(self.health, config.host, config.health_port)
            logger.info("[serve] health (grpc.health.v1 alone, plaintext) on port %d", self.health_port.port)

    def _grpc_server(self, security: Security) -> grpc.Server:
        threads = self.config.max_rpc_threads
        # Beyond ``threads`` calls at once the server answers RESOURCE_EXHAUSTED instead of queueing.
        server = make_server(
            "serve-rpc", [SERVICE], security, Admission(calls_per_service=threads),
            options=[("grpc.max_receive_message_length", self.config.max_request_bytes + _MESSAGE_SLACK)])
        service = InferenceService(self.pipeline, self.registry, self.config.max_request_bytes)
        server.add_generic_rpc_handlers(handlers(service))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _serving(self) -> None:
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> "InferenceApp":
        """Serve at once; health turns SERVING when the first version is in."""
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.pipeline.start()
        self.server.start()
        self.follower.start()
        if self.config.port_file:
            write_port_file(self.config.port_file, self.port)
        logger.info("[serve] serving on %s, following %s", self.address, self.source.description)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, let in-flight calls finish within ``grace``, then stop."""
        self.health.enter_graceful_shutdown()
        self.follower.stop()
        self.server.stop(self.config.grace_s if grace is None else grace).wait()
        self.pipeline.close()
        if self.health_port is not None:
            self.health_port.stop()
        logger.info("[serve] stopped")


def freeze_heap() -> None:
    """Move every object alive now (torch, gRPC, protobuf: ~180k) out of the collector's sight.

    Requests in flight outlive a few young collections, so they reach the oldest
    generation, and every ~45k of them a full collection walks the whole heap with
    the GIL held: ~140 ms on this machine, during which no thread of the server
    runs (the open-loop p99 of a round with one such pause was 220-290 ms against
    79-92 ms without). Frozen, a full collection walks only what came since: 1-5 ms.
    Process-wide, so the serving command calls it, not :class:`InferenceApp`.
    """
    gc.collect()
    gc.freeze()


def serve(config: ServeConfig, stop: threading.Event | None = None, security: Security | None = None,
          on_start: Callable[["InferenceApp"], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); ``on_start(app)`` runs once serving."""
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    set_threads(config.threads or default_threads())
    app = InferenceApp(config, security=security).start()
    freeze_heap()
    if on_start is not None:
        on_start(app)
    try:
        stop.wait()
    finally:
        app.stop()
