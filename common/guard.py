"""How a psgrid server stays available when other callers are slow, idle or many.

Every psgrid server (parameter server, supervisor, inference) is built by
:func:`make_server`, which puts the same rules in front of every method of
every service (docs/security.md, "Slow and idle clients"):

* **A bound per service.** At most ``calls_per_service`` calls of one service
  run at once (health checks have their own, smaller bound); the next is
  answered RESOURCE_EXHAUSTED (``Overloaded``) at once, never queued. The
  thread pool holds every service's bound, so a flood of one service's calls
  (clients watching jobs, say) never takes the threads another needs (the
  workers' pulls and pushes).
* **A request arrives whole, in time.** gRPC hands a method its request only
  once all of it has arrived, and a handler thread waits for it meanwhile. So
  every method is registered as request-streaming and reads its request here:
  a unary request, or the first frame of a stream, must arrive within
  ``arrive_s``; each later frame of a client stream (a push) within
  ``frame_idle_s``. Past that the call is cancelled and its thread and slot
  are free again. (Bidirectional streams may rest between frames: the slot
  bound and keepalive cover them.)
* **Connections.** The server pings a connection that has been silent for
  ``keepalive_s`` and drops it when no answer comes within
  ``keepalive_timeout_s`` (a peer that vanished); one with no call for
  ``connection_idle_s`` is closed (clients reconnect by themselves).
  ``max_connection_age_ms`` is not set: it would cut a worker's long step
  stream and a watcher's job stream.

The token check (:mod:`psgrid.security`) runs before all of this: a call
without the token is refused at once, before its request is read.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import grpc

from psgrid.errors import Overloaded
from psgrid.security import Security

logger = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
#: Alarms a watchdog holds before it drops the disarmed ones.
COMPACT_AT = 4096


@dataclasses.dataclass(frozen=True)
class Admission:
    """The limits one server puts on its callers (see the module doc)."""

    #: Calls of one service running at once; every waiting pull and watch holds one.
    calls_per_service: int = 64
    #: Calls of the health service running at once (probes are quick).
    health_calls: int = 16
    #: Seconds a unary request (or a stream's first frame) may take to arrive whole.
    arrive_s: float = 10.0
    #: Seconds between two frames of a client stream (a push).
    frame_idle_s: float = 60.0
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    #: A connection without a call this long is closed.
    connection_idle_s: float = 300.0

    def __post_init__(self) -> None:
        if self.calls_per_service < 1 or self.health_calls < 1:
            raise ValueError("calls_per_service and health_calls must be >= 1")
        for name in ("arrive_s", "frame_idle_s", "keepalive_s", "keepalive_timeout_s", "connection_idle_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")

    def options(self) -> list[tuple[str, int]]:
        """gRPC server options for the connection limits."""
        ms = lambda s: int(s * 1000)  # noqa: E731
        return [
            ("grpc.keepalive_time_ms", ms(self.keepalive_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            # psgrid's clients ping every 30 s while calls are open (psgrid.rpc.CHANNEL_OPTIONS).
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_connection_idle_ms", ms(self.connection_idle_s)),
        ]

    def threads(self, services: Sequence[str]) -> int:
        """Handler threads that cover every service's bound, health's and a margin."""
        return self.calls_per_service * len(services) + self.health_calls + 4


#: The health service name that is SERVING while the process runs and answers calls at all:
#: Kubernetes' liveness and startup probes ask it. "" and each service's own name say "ready".
LIVENESS = "psgrid.liveness"


class HealthPort:
    """grpc.health.v1 alone, in plaintext, on a port of its own, started at once.

    For Kubernetes' native gRPC probe, which sends no token and speaks no TLS:
    psgrid's own ports want both. It shares ``servicer`` with the main port, so
    both answer the same, and health reveals nothing but SERVING or not.
    """

    def __init__(self, servicer, host: str, port: int):
        from grpc_health.v1 import health_pb2_grpc

        self.server = make_server("health", (), Security(), Admission(health_calls=8))
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind the health port {address}")
        self.server.start()

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()


def make_server(name: str, services: Sequence[str], security: Security | None = None,
                admission: Admission | None = None, options: Sequence[tuple] = ()) -> grpc.Server:
    """A gRPC server for ``services`` behind the token check and ``admission``'s rules.

    ``name`` prefixes its handler threads; ``options`` adds gRPC options.
    """
    admission = admission or Admission()
    security = security or Security()
    bounds = {service: admission.calls_per_service for service in services}
    bounds[HEALTH_SERVICE] = admission.health_calls
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=admission.threads(services), thread_name_prefix=name),
        interceptors=[*security.interceptors(), AdmissionInterceptor(admission, bounds)],
        options=[("grpc.so_reuseport", 0), *admission.options(), *options],
    )


class Watchdog:
    """One thread that cancels calls whose request (or next frame, or answer) is late.

    ``arm`` takes anything with a ``cancel()``: a server's call context, a client's call.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Alarm]] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, context, seconds: float, what: str) -> "_Alarm":
        alarm = _Alarm(context, seconds, what)
        with self._cond:
            if len(self._heap) >= COMPACT_AT:  # mostly alarms disarmed long before their time
                self._heap = [entry for entry in self._heap if not entry[2].disarmed]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._ids), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rpc-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is alarm:
                self._cond.notify()
        return alarm

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, alarm = heapq.heappop(self._heap)
            context = alarm.context
            if not alarm.disarmed and context is not None:
                logger.info("cancelled a call: %s did not arrive within %gs", alarm.what, alarm.seconds)
                alarm.fired = True
                context.cancel()

    def first(self, requests: Iterator, context: grpc.ServicerContext, seconds: float):
        """The first request of ``requests`` once it arrived; cancels the call if it takes over ``seconds``."""
        alarm = self.arm(context, seconds, "a request")
        try:
            return next(requests, None)
        except grpc.RpcError:  # cancelled: by the caller, or by this watchdog
            return None
        finally:
            alarm.disarm()

    def frames(self, requests: Iterator, context: grpc.ServicerContext, first_s: float,
               idle_s: float | None) -> Iterator:
        """``requests``, each frame within ``idle_s`` of the last (the first within ``first_s``);
        ``idle_s`` None: no limit after the first."""
        limit = first_s
        while True:
            alarm = self.arm(context, limit, "the next frame of a stream") if limit is not None else None
            try:
                frame = next(requests, None)
            finally:
                if alarm is not None:
                    alarm.disarm()
            if frame is None:
                return
            yield frame
            limit = idle_s


@dataclasses.dataclass(eq=False)
class _Alarm:
    context: object  # anything with cancel()
    seconds: float
    what: str
    disarmed: bool = False
    fired: bool = False

    def disarm(self) -> None:
        """No longer needed: it keeps no reference to the call (a disarmed alarm can
        wait in the heap for its time, and a call holds its request)."""
        self.disarmed = True
        self.context = None


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Applies the per-service bound and the arrival deadlines to every method (module doc)."""

    def __init__(self, admission: Admission, bounds: dict[str, int]):
        self._admission = admission
        self._slots = {service: (threading.BoundedSemaphore(n), n) for service, n in bounds.items()}
        self._watchdog = Watchdog()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # gRPC answers UNIMPLEMENTED
        service = handler_call_details.method.strip("/").split("/")[0]
        slots = self._slots.get(service)
        if slots is None:  # a service registered without a bound: the most of any
            slots = self._slots.setdefault(service, (threading.BoundedSemaphore(self._admission.calls_per_service),
                                                     self._admission.calls_per_service))
        return _guarded(handler, service, slots, self._admission, self._watchdog)


def _guarded(handler: grpc.RpcMethodHandler, service: str, slots: tuple[threading.BoundedSemaphore, int],
             admission: Admission, watchdog: Watchdog) -> grpc.RpcMethodHandler:
    """``handler`` registered request-streaming, reading its request under the watchdog,
    inside a slot of its service."""
    semaphore, bound = slots

    def admit(context: grpc.ServicerContext) -> None:
        if not semaphore.acquire(blocking=False):
            context.set_trailing_metadata((("psgrid-error", Overloaded.__name__),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{service} is serving its limit of {bound} concurrent calls; try again later")
        if not context.add_callback(semaphore.release):  # the call already ended
            semaphore.release()

    def request(requests: Iterator, context: grpc.ServicerContext):
        item = watchdog.first(requests, context, admission.arrive_s)
        if item is None:
            context.abort(grpc.StatusCode.CANCELLED if not context.is_active() else grpc.StatusCode.INVALID_ARGUMENT,
                          "the request did not arrive")
        return item

    if handler.request_streaming:
        behaviour = handler.stream_stream if handler.response_streaming else handler.stream_unary
        idle = None if handler.response_streaming else admission.frame_idle_s

        def stream_in(requests, context):
            admit(context)
            return behaviour(watchdog.frames(requests, context, admission.arrive_s, idle), context)

        if handler.response_streaming:
            def stream_both(requests, context):
                yield from stream_in(requests, context)
            return _handler(handler, stream_both)
        return _handler(handler, stream_in)

    if handler.response_streaming:
        def unary_in_stream_out(requests, context):
            admit(context)
            yield from handler.unary_stream(request(requests, context), context)
        return _handler(handler, unary_in_stream_out)

    def unary_in_unary_out(requests, context):
        admit(context)
        return handler.unary_unary(request(requests, context), context)
    return _handler(handler, unary_in_unary_out)


def _handler(original: grpc.RpcMethodHandler, behaviour: Callable) -> grpc.RpcMethodHandler:
    make = grpc.stream_stream_rpc_method_handler if original.response_streaming \
        else grpc.stream_unary_rpc_method_handler
    return make(behaviour, request_deserializer=original.request_deserializer,
                response_serializer=original.response_serializer)
