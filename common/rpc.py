"""gRPC plumbing shared by every service and client: the one error table,
channels, raw-bytes serializers and retries.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError

from psgrid.backoff import Backoff
from psgrid.limits import MAX_ERROR_CHARS
from psgrid.diagnose import SERVER_FLAG, diagnose
from psgrid.security import Security
from psgrid.errors import (
    ERROR_BY_CODE,
    ERRORS_BY_NAME,
    DeadlineExceeded,
    MalformedRequest,
    PayloadCutShort,
    PsgridError,
    Stopping,
    Unauthenticated,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")

#: Trailing-metadata key naming the precise psgrid error class.
ERROR_KEY = "psgrid-error"
#: Status codes a call may be retried on: the request never took effect, or the
#: protocol makes the retry harmless (pushes are deduplicated by seq).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

#: Seconds an interactive client gives its first connection before looking for why it fails.
FIRST_CONNECT_S = 3.0
#: What to do about a refused token, appended to every Unauthenticated a client raises.
TOKEN_FIX = "give the cluster's token (--token-file or PSGRID_TOKEN; Security(token=...) in the SDK)"

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC's own reconnect back-off grows to 120 s: a worker that waited long for its
    # server would then notice it back only minutes later. Our retry loops back off.
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


def identity(data: bytes) -> bytes:
    """Serializer for frames that psgrid encodes and decodes itself."""
    return data


def decode(request_cls: type[M], data: bytes) -> M:
    """The ``request_cls`` message ``data`` encodes: the one decoding path of every service.

    Every method registers a pass-through deserializer and decodes here, inside its
    handler, so the token check runs before anything is parsed and bytes that do not
    parse are the caller's error. Raises MalformedRequest (INVALID_ARGUMENT).
    """
    try:
        return request_cls.FromString(data)
    except DecodeError as exc:
        raise MalformedRequest(f"undecodable {request_cls.DESCRIPTOR.name} ({len(data)} bytes): {exc}") from None


def decoding(fn: Callable, request_cls) -> Callable:
    """A behaviour for a unary-request method that decodes its raw request, then calls ``fn``.

    An undecodable request is answered INVALID_ARGUMENT with one log line.
    """
    def behaviour(data: bytes, context: grpc.ServicerContext):
        try:
            request = decode(request_cls, data)
        except MalformedRequest as exc:
            logger.info("%s refused: %s", getattr(fn, "__qualname__", fn), exc)
            _abort(context, exc)
        return fn(request, context)
    return behaviour


def unary_handler(fn, request_cls, response_cls) -> grpc.RpcMethodHandler:
    """A unary-unary handler: raw bytes in, decoded by :func:`decode`; the generated response class out."""
    return grpc.unary_unary_rpc_method_handler(
        decoding(fn, request_cls), request_deserializer=identity,
        response_serializer=response_cls.SerializeToString)


def unary_stream_handler(fn, request_cls, response_serializer: Callable = identity) -> grpc.RpcMethodHandler:
    """A unary-stream handler: raw bytes in, decoded by :func:`decode`; ``response_serializer`` out."""
    return grpc.unary_stream_rpc_method_handler(
        decoding(fn, request_cls), request_deserializer=identity, response_serializer=response_serializer)


def stream_handler(fn, response_streaming: bool, response_serializer: Callable = identity) -> grpc.RpcMethodHandler:
    """A handler whose requests stream in as raw frames: ``fn`` decodes each (:func:`decode`)."""
    make = grpc.stream_stream_rpc_method_handler if response_streaming else grpc.stream_unary_rpc_method_handler
    return make(fn, request_deserializer=identity, response_serializer=response_serializer)


def status_of(error: PsgridError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def status_details(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` cut to at most ``limit`` bytes as gRPC sends it, saying how long it was.

    Status details travel percent-encoded in a trailer (three bytes for each UTF-8
    byte outside printable ASCII, and for ``%``), and a client drops a call whose
    trailers pass 8 KiB, its status with them: an error quoting a huge value must
    still arrive as itself.
    """
    suffix = f"... ({len(message)} characters)"
    size = cut = 0
    for index, char in enumerate(message):
        size += sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in char.encode("utf-8", "surrogatepass"))
        if size <= limit - len(suffix):
            cut = index + 1
        elif size > limit:
            return message[:cut] + suffix
    return message


def _abort(context: grpc.ServicerContext, error: PsgridError) -> None:
    context.set_trailing_metadata(((ERROR_KEY, type(error).__name__),))
    context.abort(status_of(error), status_details(str(error)))


#: How long a stream that ended short waits to learn whether its caller cancelled.
CANCEL_SETTLE_S = 0.5


def caller_went_away(context: grpc.ServicerContext, settle_s: float = CANCEL_SETTLE_S) -> bool:
    """Whether the call's caller cancelled it (or its process died).

    A cancelled request stream reaches the handler in two events that gRPC's
    synchronous server delivers in either order: the stream's end (which looks
    like a normal half-close) and the cancellation. A stream that ended short
    therefore waits up to ``settle_s`` for the second before it is called
    malformed; a call still active then had a client that really sent too little.
    """
    if not context.is_active():
        return True
    ended = threading.Event()
    if not context.add_callback(ended.set):  # the call has already terminated
        return True
    ended.wait(settle_s)
    return not context.is_active()


def translate_errors(method: Callable) -> Callable:
    """Turn psgrid errors raised by a servicer method into gRPC statuses.

    Works for unary and streaming (generator) methods. Unexpected exceptions
    are logged once here and become INTERNAL.
    """
    name = method.__qualname__

    def handle(exc: BaseException, context: grpc.ServicerContext) -> None:
        if (isinstance(exc, grpc.RpcError) and not context.is_active()
                or isinstance(exc, PayloadCutShort) and caller_went_away(context)):
            # The caller went away mid-stream (cancelled, or its process died): a normal event.
            logger.info("%s: the caller cancelled the call before it completed", name)
            return
        if isinstance(exc, PsgridError):
            logger.debug("%s: %s: %s", name, type(exc).__name__, exc)
            _abort(context, exc)
        logger.exception("%s failed", name)
        context.abort(grpc.StatusCode.INTERNAL, status_details(f"{type(exc).__name__}: {exc}"))

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                handle(exc, context)
        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            handle(exc, context)
    return wrapper


def to_psgrid_error(error: grpc.RpcError) -> PsgridError:
    """The psgrid exception for a failed call: the precise class when named."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = None
    for key, value in (error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else ():
        if key == ERROR_KEY:
            cls = ERRORS_BY_NAME.get(value)
    if cls is None or cls.code != code.name:
        cls = ERROR_BY_CODE.get(code.name, PsgridError)
    if issubclass(cls, Unauthenticated):
        details = f"{details or 'unauthenticated'}: {TOKEN_FIX}"
    exc = cls(details or code.name)
    exc.grpc_code = code
    return exc


def first_connection(channel: grpc.Channel, within_s: float) -> grpc.ChannelConnectivity | None:
    """Try to connect ``channel``: READY, TRANSIENT_FAILURE (the first attempt failed),
    or None when neither came within ``within_s``."""
    settled = threading.Event()
    seen: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            seen.append(state)
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        settled.wait(within_s)
    finally:
        channel.unsubscribe(watch)
    return seen[0] if seen else None


def make_channel(address: str, options: list | None = None, security: Security | None = None) -> grpc.Channel:
    """A channel with psgrid's options, presenting ``security``'s credentials."""
    return (security or Security()).channel(address, [*CHANNEL_OPTIONS, *(options or [])])


class ServiceClient:
    """Base of psgrid's typed clients: one channel to one service, deadlines, retries.

    Subclasses name their ``service`` ("psgrid.v1.Foo") and build their method
    callables with :meth:`_unary` (or the channel directly, for streams).
    """

    service = ""

    def __init__(self, address: str, timeout_s: float, retry_for_s: float,
                 security: Security | None = None, options: list | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        self.security = security or Security()
        self.channel = make_channel(address, options, security=security)
        self._checked = False

    def check_connection(self, within_s: float = FIRST_CONNECT_S, flag: str = SERVER_FLAG) -> None:
        """Connect now, and when that fails raise what is wrong, with the fix, at once.

        For interactive callers, before their first call: gRPC alone would retry a
        server that is not running, or one that speaks TLS to a plaintext client,
        for minutes and then report "Socket closed". Raises a
        :class:`~psgrid.errors.ConnectionMistake` when :func:`psgrid.diagnose.diagnose`
        names one; otherwise (a slow server, say) the calls' own deadlines and
        retries decide. Checks once per client, until a check passes. ``flag`` names
        where the address came from, for the message.
        """
        if self._checked:
            return
        if first_connection(self.channel, within_s) is not grpc.ChannelConnectivity.READY:
            mistake = diagnose(self.address, self.security, flag=flag)
            if mistake is not None:
                raise mistake
        self._checked = True

    def connection_problem(self) -> str:
        """What keeps this client from its server, or "" when a probe sees nothing wrong."""
        mistake = diagnose(self.address, self.security)
        return "" if mistake is None else str(mistake)

    def _method(self, name: str) -> str:
        return f"/{self.service}/{name}"

    def _unary(self, name: str, request_cls, response_cls):
        return self.channel.unary_unary(self._method(name), request_serializer=request_cls.SerializeToString,
                                        response_deserializer=response_cls.FromString)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def call(fn: Callable[..., T], *args, timeout: float, retry_for: float = 0.0,
         backoff: Backoff | None = None, retry_codes=RETRYABLE, stop: threading.Event | None = None,
         **kwargs) -> T:
    """Call a stub method with a deadline; retry retryable codes for ``retry_for`` s.

    Raises the matching psgrid exception when the call fails for good. Once
    ``stop`` is set it raises Stopping instead: before a try, during a back-off
    sleep (which ``stop`` wakes), and for a call that failed meanwhile (whoever
    set ``stop`` may have closed the channel to cancel the calls in flight).
    """
    give_up = time.monotonic() + retry_for
    name = getattr(fn, "__name__", fn)
    while True:
        _check_stop(stop, name)
        try:
            return fn(*args, timeout=timeout, **kwargs)
        except grpc.RpcError as exc:
            _check_stop(stop, name)
            code = exc.code() if hasattr(exc, "code") else None
            backoff = backoff or Backoff(initial=0.05, maximum=2.0)  # made on the first failure: a
            delay = backoff.next_delay()  # call that succeeds (every step's) draws no seed
            if code in retry_codes and time.monotonic() + delay < give_up:
                logger.debug("retrying %s after %s in %.2fs", name, code, delay)
                if stop is None:
                    time.sleep(delay)
                else:
                    stop.wait(delay)
                continue
            raise to_psgrid_error(exc) from None
        except ValueError:  # "Cannot invoke RPC on closed channel": closed by a stop
            _check_stop(stop, name)
            raise


def _check_stop(stop: threading.Event | None, name: object) -> None:
    if stop is not None and stop.is_set():
        raise Stopping(f"stopping: {name if isinstance(name, str) else 'a call'} given up")


def wait_for_ready(channel: grpc.Channel, timeout: float) -> None:
    """Block until the channel connects; DeadlineExceeded when it does not."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise DeadlineExceeded(f"no server answered within {timeout:.0f}s") from None
