"""Why a client cannot reach its server, told in one line with the fix.

gRPC reports every failed connection alike (UNAVAILABLE, "Socket closed",
"Connection refused") and keeps reconnecting for minutes. When a connection
fails, :func:`diagnose` asks the address itself with plain sockets: is anything
listening, does it speak TLS, does its certificate name the host we dialled,
does it want a client certificate? It answers with the
:class:`~psgrid.errors.ConnectionMistake` to raise, or None when it sees nothing
wrong (a slow server, say: retrying may then help).

:class:`Reminder` says when a process that keeps waiting for a server (a worker,
``psgrid up``) should say again what it waits for. No gRPC here.
"""
from __future__ import annotations

import os
import socket
import ssl
import tempfile

from psgrid.errors import CertificateProblem, ConnectionMistake, ServerNotRunning, TlsMismatch

#: Seconds each probe (connect, handshake, first answer) may take.
PROBE_S = 2.0
#: Seconds between a waiting process's reminders of what it waits for.
REMIND_EVERY_S = 30.0
#: What an HTTP/2 (gRPC) client sends first: the preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
#: Where the SDK and the command line take the server's address.
SERVER_FLAG = "--server / PSGRID_SERVER"
TLS_FLAGS = "--tls-ca/--tls-cert/--tls-key"


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError when there is no port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def diagnose(address: str, security=None, timeout: float = PROBE_S,
             flag: str = SERVER_FLAG) -> ConnectionMistake | None:
    """The mistake that keeps a client with ``security`` (a :class:`psgrid.security.Security`)
    from ``address``, or None when the probes find none.

    ``flag`` names where the address came from, for the message. Never raises for
    a network failure: that is what it reports.
    """
    try:
        host, port = split_address(address)
    except ValueError as exc:
        return ServerNotRunning(str(exc), f"give HOST:PORT ({flag})")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        return ServerNotRunning(f"cannot resolve the host name {host!r} of {address}", f"check {flag}")
    except ConnectionRefusedError:
        return ServerNotRunning(f"no psgrid server answers at {address}", f"is it running? ({flag})")
    except TimeoutError:
        return ServerNotRunning(f"nothing answers at {address} within {timeout:g}s",
                                f"is the host up and the port open to you? ({flag})")
    except OSError as exc:
        return ServerNotRunning(f"cannot connect to {address}: {exc.strerror or exc}", f"check {flag}")
    with sock:
        tls = security is not None and security.tls
        if not tls:
            if _speaks_tls(sock, host):
                return TlsMismatch(f"the server at {address} speaks TLS",
                                   "pass --tls-ca with the CA certificate that signed it (Security(ca=...) in the SDK)")
            return None
        return _tls_mistake(sock, host, port, address, security, timeout)


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    """Whether the peer answers a TLS ClientHello as TLS (whatever it thinks of us)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host):
            return True
    except ssl.SSLError as exc:
        return _is_alert(exc)
    except OSError:
        return False


def _tls_mistake(sock: socket.socket, host: str, port: int, address: str, security,
                 timeout: float) -> ConnectionMistake | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    if security.ca:
        context.load_verify_locations(cadata=security.ca.decode("ascii", "replace"))
    else:
        context.load_default_certs()
    if security.cert is not None:
        try:
            _load_client_certificate(context, security.cert, security.key)
        except (OSError, ValueError) as exc:
            return CertificateProblem(f"the client certificate or key (--tls-cert/--tls-key) does not load: {exc}",
                                      "pass a PEM certificate and its own private key")
    try:
        tls = context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        return _verify_mistake(exc, host, port, address, timeout)
    except TimeoutError:
        return None
    except OSError as exc:  # ssl.SSLError too: refused or cut off during the handshake
        if speaks_plaintext_h2(host, port, timeout):
            return TlsMismatch(f"the server at {address} does not speak TLS",
                               f"drop {TLS_FLAGS}, or start the server with --tls-cert/--tls-key")
        if isinstance(exc, ssl.SSLError) and (_is_alert(exc) or isinstance(exc, ssl.SSLEOFError)):
            return _client_cert_mistake(address, security)
        return None
    # With TLS 1.3 a server that wants a client certificate it did not get (or does not
    # trust) hangs up after the handshake; one content with us answers HTTP/2 SETTINGS.
    try:
        tls.sendall(H2_PREFACE)
        answer = tls.recv(1)
    except TimeoutError:
        return None
    except OSError:
        answer = b""
    finally:
        tls.close()
    return None if answer else _client_cert_mistake(address, security)


def _verify_mistake(exc: ssl.SSLCertVerificationError, host: str, port: int, address: str,
                    timeout: float) -> CertificateProblem:
    if exc.verify_code == 62 or "mismatch" in str(exc.verify_message):  # X509_V_ERR_HOSTNAME_MISMATCH
        names = certificate_names(host, port, timeout)
        held = f"is for {', '.join(names)}" if names else "does not name it"
        return CertificateProblem(
            f"the certificate of the server at {address} {held}, not {host}",
            f"connect to a name it holds ({SERVER_FLAG}), or reissue it: psgrid certs DIR --hosts {host},...")
    return CertificateProblem(
        f"the certificate of the server at {address} is not trusted ({exc.verify_message})",
        "pass --tls-ca with the CA certificate that signed it (the ca.pem `psgrid certs` wrote)")


def _client_cert_mistake(address: str, security) -> CertificateProblem:
    if security.cert is None:
        return CertificateProblem(f"the server at {address} requires a client certificate",
                                  "pass --tls-cert/--tls-key (Security(cert=..., key=...) in the SDK), "
                                  "signed by the CA the server trusts")
    return CertificateProblem(f"the server at {address} refused the client certificate given (--tls-cert)",
                              "use one signed by the CA the server trusts (its --tls-ca)")


def speaks_plaintext_h2(host: str, port: int, timeout: float = PROBE_S) -> bool:
    """Whether ``host:port`` answers an HTTP/2 preface in plaintext with a SETTINGS frame."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(H2_PREFACE)
            head = _read(sock, 9)
    except OSError:
        return False
    return len(head) == 9 and head[3] == 0x04  # frame type SETTINGS


def certificate_names(host: str, port: int, timeout: float = PROBE_S) -> list[str]:
    """The host names and addresses the certificate at ``host:port`` is for (unverified)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                context.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return []
    try:
        from cryptography import x509

        names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except Exception:  # noqa: BLE001 - no names is an answer too
        return []
    return [str(n.value) for n in names if isinstance(n, (x509.DNSName, x509.IPAddress))]


def _load_client_certificate(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Present ``cert``/``key`` (PEM bytes): ``ssl`` reads them only from files, so
    from memory-backed ones where Linux has them (the key never touches a disk)."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("psgrid-probe"), os.memfd_create("psgrid-probe")]
        try:
            for fd, data in zip(fds, (cert, key)):
                os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # private (0700), removed at once
        paths = [os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")]
        for path, data in zip(paths, (cert, key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
        context.load_cert_chain(*paths)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _is_alert(exc: ssl.SSLError) -> bool:
    """The peer sent a TLS alert: it speaks TLS and refused something of ours."""
    text = f"{exc.reason or ''} {exc}".upper()
    return "ALERT" in text


class Reminder:
    """When a process waiting for something should say so: at once, then every ``every_s``.

    Pure: the caller passes the clock, so a test needs no sleeping.
    """

    def __init__(self, every_s: float = REMIND_EVERY_S):
        self.every_s = every_s
        self._last: float | None = None

    def due(self, now: float) -> bool:
        """True on the first call and once ``every_s`` passed since the last True."""
        if self._last is None or now - self._last >= self.every_s:
            self._last = now
            return True
        return False

    def reset(self) -> None:
        """The wait is over: the next wait is announced at once."""
        self._last = None
