"""Who may talk to a psgrid cluster: a shared token on every call, optional (mutual) TLS.

* Token: every RPC of every psgrid service carries ``authorization: Bearer
  <token>`` metadata; one server interceptor checks it with a constant-time
  comparison and answers UNAUTHENTICATED otherwise, before any handler runs
  and before the request is parsed (it only reads metadata; every psgrid method
  receives raw bytes and decodes them itself, see ``psgrid.rpc.decode``).
  The standard health service stays open (see ``OPEN_METHODS``).
* TLS: ``cert``/``key`` make a server speak TLS; with ``ca`` as well it
  requires client certificates signed by that CA (mutual TLS). Clients verify
  the server against ``ca`` and present ``cert``/``key`` when given.

The token is never logged; ``repr`` hides it.
"""
from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import pathlib

import grpc

from psgrid.errors import PermissionDenied

#: Methods reachable without the token: health probes reveal only SERVING or
#: not, and supervisors, load balancers and Kubernetes must be able to ask.
OPEN_METHODS = ("/grpc.health.v1.Health/",)
AUTH_KEY = "authorization"


class InsecureChannel(PermissionDenied):
    """A token would cross a network in plaintext: refused, use TLS."""


@dataclasses.dataclass(frozen=True)
class Security:
    """Credentials of one process. Empty means no token and plaintext."""

    token: str | None = dataclasses.field(default=None, repr=False)
    ca: bytes | None = dataclasses.field(default=None, repr=False)
    cert: bytes | None = dataclasses.field(default=None, repr=False)
    key: bytes | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("the cluster token must be non-empty and contain no whitespace")
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both a certificate and its key, or neither")

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    @classmethod
    def from_files(cls, token_file: str | None = None, token: str | None = None,
                   ca: str | None = None, cert: str | None = None, key: str | None = None) -> "Security":
        """Read credentials from files; ``token`` (from the environment, say) is used when no file."""
        read = lambda p: pathlib.Path(p).read_bytes() if p else None  # noqa: E731
        if token_file:
            token = pathlib.Path(token_file).read_text().strip()
        return cls(token=token or None, ca=read(ca), cert=read(cert), key=read(key))

    # --- server side -------------------------------------------------------------

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Bind ``address`` with TLS when a certificate is configured."""
        try:
            if self.cert is None:
                return server.add_insecure_port(address)
            creds = grpc.ssl_server_credentials(
                [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None)
            return server.add_secure_port(address, creds)
        except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
            raise OSError(f"cannot bind {address}: is another process using it?") from exc

    # --- client side -------------------------------------------------------------

    def channel(self, address: str, options: list) -> grpc.Channel:
        """A channel to ``address`` that presents these credentials.

        Raises InsecureChannel for a token over plaintext to a non-loopback host.
        """
        if self.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)
            channel = grpc.secure_channel(address, creds, options=options)
        else:
            if self.token and not is_loopback(address):
                raise InsecureChannel(
                    f"refusing to send the cluster token in plaintext to {address}; "
                    "configure TLS (--tls-ca) or use a loopback address")
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _TokenClientInterceptor(self.token))
        return channel


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED at once, in place of ``handler``.

    Registered request-streaming whatever ``handler`` is, so that it runs as soon
    as the call's headers arrive: a unary handler would first wait for the whole
    request, and a tokenless caller that never sends it would hold a thread.
    No deserializer: a refused request is never parsed.
    """
    def abort(request_iterator, context):
        context.set_trailing_metadata((("psgrid-error", "Unauthenticated"),))
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming \
        else grpc.stream_unary_rpc_method_handler
    return make(abort, request_deserializer=None, response_serializer=handler.response_serializer)


class TokenInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with the right bearer token (health checks excepted)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_KEY:
                presented = value
        handler = continuation(handler_call_details)
        if handler is None or hmac.compare_digest(presented.encode(), self._expected):
            return handler
        return _deny(handler)


class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._metadata = ((AUTH_KEY, f"Bearer {token}"),)

    def _details(self, details):
        metadata = tuple(details.metadata or ()) + self._metadata
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple
    credentials: object
    wait_for_ready: bool | None
    compression: object
