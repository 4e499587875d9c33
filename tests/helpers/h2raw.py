"""A minimal raw HTTP/2 client, on plain sockets, for callers that never finish a gRPC request.

A gRPC library always finishes what it starts; an attacker does not. A :class:`SlowCall` is
one TCP connection carrying one gRPC call (stream 1) that sends its HEADERS and then either a
DATA frame whose 5-byte gRPC prefix declares ``declared`` bytes but carries only ``sent`` of
them, or nothing at all (``sent=None``). It answers the server's SETTINGS and PINGs as a live
client must, so only the server's own limits can end it. A :class:`Horde` holds many of them
and services them all from one background thread, recording how the server ended each call.

Plaintext only (no TLS). Requests are HPACK literals without indexing and without Huffman;
the server's header blocks are decoded in full (static and dynamic table, Huffman), enough to
read ``grpc-status``.
"""
from __future__ import annotations

import dataclasses
import selectors
import socket
import struct
import threading
import time
import urllib.parse

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20

# HPACK static table (RFC 7541 appendix A): names only; no caller here reads a static value.
_STATIC = (":authority :method :method :path :path :scheme :scheme" + " :status" * 7 +
           " accept-charset accept-encoding accept-language accept-ranges accept"
           " access-control-allow-origin age allow authorization cache-control content-disposition"
           " content-encoding content-language content-length content-location content-range"
           " content-type cookie date etag expect expires from host if-match if-modified-since"
           " if-none-match if-range if-unmodified-since last-modified link location max-forwards"
           " proxy-authenticate proxy-authorization range referer refresh retry-after server"
           " set-cookie strict-transport-security transfer-encoding user-agent vary via"
           " www-authenticate").split()
# HPACK's Huffman code (RFC 7541 appendix B) is canonical, so each symbol's code length
# (one letter per symbol 0..256, 'a' = 5 bits ... 'z' = 30 bits) defines the whole code.
_LENGTHS = ("isxxxxxxxtzxxzxxxxxxxxzxxxxxxxxxbffhibdgffdgdbbbaaabbbbbbbcdkbhf"
            "ibccccccccccccccccccccccdcdioijbkabababbbaccbbbabcbaabccccckgjix"
            "prpprrrsrssssststtrstssssqrsrsstrqprrssqsrrtqrssqqrqsrssprrrsrrs"
            "vvporsruvvvwwvtuoqvwwvwtqqvvxwwwptpqrqqsrruuttvsvwvvwwwwwxwwwwwvz")


def _huffman_codes() -> dict[tuple[int, int], int]:
    codes, code, previous = {}, 0, 0
    for length, symbol in sorted((ord(c) - ord("a") + 5, s) for s, c in enumerate(_LENGTHS)):
        code <<= length - previous
        codes[(length, code)] = symbol
        code, previous = code + 1, length
    return codes


_HUFFMAN = _huffman_codes()


def huffman_decode(data: bytes) -> bytes:
    """Decode an HPACK Huffman string (the trailing padding, up to 7 one-bits, is dropped)."""
    out, code, length = bytearray(), 0, 0
    for byte in data:
        for shift in range(7, -1, -1):
            code, length = code << 1 | (byte >> shift) & 1, length + 1
            if (symbol := _HUFFMAN.get((length, code))) is not None:
                out.append(symbol)
                code = length = 0
    return bytes(out)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 9-byte header, then ``payload``."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, bits: int, first: int = 0) -> bytes:
    limit = (1 << bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    return bytes(out + bytes([value]))


def _read_int(block: bytes, i: int, bits: int) -> tuple[int, int]:
    value, limit, shift = block[i] & (1 << bits) - 1, (1 << bits) - 1, 0
    i += 1
    if value == limit:
        while True:
            value, shift, i = value + ((block[i] & 127) << shift), shift + 7, i + 1
            if not block[i - 1] & 128:
                break
    return value, i


def request_headers(path: str, authority: str, metadata=()) -> bytes:
    """The HPACK block of a gRPC POST to ``path``, with ``metadata`` ((name, value) pairs) appended."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
              ("content-type", "application/grpc"), ("te", "trailers"), *metadata]
    out = bytearray()
    for name, value in fields:  # literal without indexing, new name, raw strings
        out += b"\x00"
        for text in (name.encode(), value.encode()):
            out += _hpack_int(len(text), 7) + text
    return bytes(out)


class HpackDecoder:
    """One connection's HPACK decoder: its dynamic table lives as long as the connection."""

    def __init__(self, max_size: int = 4096):
        self.table: list[tuple[str, str]] = []  # newest first
        self.max_size = max_size

    def _get(self, index: int) -> tuple[str, str]:
        return (_STATIC[index - 1], "") if index <= len(_STATIC) else self.table[index - len(_STATIC) - 1]

    def _evict(self) -> None:
        while sum(32 + len(n) + len(v) for n, v in self.table) > self.max_size:
            self.table.pop()

    def _string(self, block: bytes, i: int) -> tuple[str, int]:
        huffman = block[i] & 128
        n, i = _read_int(block, i, 7)
        raw = block[i:i + n]
        return (huffman_decode(raw) if huffman else raw).decode("latin-1"), i + n

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The (name, value) fields of one complete header block, in order."""
        fields, i = [], 0
        while i < len(block):
            byte = block[i]
            if byte & 128:  # indexed field
                index, i = _read_int(block, i, 7)
                fields.append(self._get(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                self.max_size, i = _read_int(block, i, 5)
                self._evict()
                continue
            indexing = byte & 0x40
            index, i = _read_int(block, i, 6 if indexing else 4)
            if index:
                name = self._get(index)[0]
            else:
                name, i = self._string(block, i)
            value, i = self._string(block, i)
            fields.append((name, value))
            if indexing:
                self.table.insert(0, (name, value))
                self._evict()
        return fields


@dataclasses.dataclass
class Outcome:
    """How the server ended one call: ``how`` is "status" (trailers), "rst", "closed" (or "error":
    this client could not parse what came, the exception in ``message``);
    ``code`` is the grpc-status or the RST_STREAM error code; ``after_s`` counts from the open.
    ``goaway`` is the GOAWAY error code if one came first (the connection's, not the call's)."""

    how: str
    code: int | None
    after_s: float
    goaway: int | None = None
    message: str = ""


class SlowCall:
    """One connection with one gRPC call that never completes its request.

    Sends the preface, SETTINGS, HEADERS for ``path`` and, unless ``sent`` is None, one DATA
    frame declaring a ``declared``-byte message and carrying ``sent`` bytes of it. ``metadata``
    adds headers, e.g. ``[("authorization", "Bearer TOKEN")]``. Blocking until it has sent all
    that; afterwards :meth:`pump` (the Horde's thread) reads and answers the server.
    """

    def __init__(self, address: str, path: str, declared: int = 100, sent: int | None = 10,
                 metadata=(), timeout: float = 10.0):
        host, port = address.rsplit(":", 1)
        self.opened = time.monotonic()
        self.outcome: Outcome | None = None
        self._goaway: int | None = None
        self._buffer, self._block, self._headers_flags = b"", b"", 0
        self._hpack = HpackDecoder()
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        out = PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 0))  # ENABLE_PUSH = 0
        out += frame(HEADERS, END_HEADERS, 1, request_headers(path, address, metadata))
        if sent is not None:
            out += frame(DATA, 0, 1, b"\x00" + struct.pack(">I", declared) + b"\x00" * sent)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(out)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def _end(self, how: str, code: int | None, message: str = "") -> None:
        if self.outcome is None:
            self.outcome = Outcome(how, code, time.monotonic() - self.opened, self._goaway, message)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)  # a few bytes to an idle socket: never a partial write in practice
        except OSError:
            self._end("closed", None)

    def pump(self) -> bool:
        """Read what the server sent and answer it; False once the connection is closed."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._end("closed", None)
            return False
        self._buffer += data
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                break
            kind, flags = self._buffer[3], self._buffer[4]
            stream = int.from_bytes(self._buffer[5:9], "big") & 0x7FFFFFFF
            payload, self._buffer = self._buffer[9:9 + length], self._buffer[9 + length:]
            self._on_frame(kind, flags, stream, payload)
        return True

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            self._send(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._send(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            self._goaway = int.from_bytes(payload[4:8], "big")
        elif kind == RST_STREAM and stream == 1:
            self._end("rst", int.from_bytes(payload[:4], "big"))
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                pad = payload[0] if flags & PADDED else 0
                payload = payload[(1 if flags & PADDED else 0) + (5 if flags & PRIORITY else 0):len(payload) - pad]
                self._headers_flags = flags
            self._block += payload
            if flags & END_HEADERS:
                fields = dict(self._hpack.decode(self._block))  # always: keeps the table in step
                self._block = b""
                if "grpc-status" in fields:
                    message = urllib.parse.unquote(fields.get("grpc-message", ""))  # percent-encoded
                    self._end("status", int(fields["grpc-status"]), message)
                elif self._headers_flags & END_STREAM:
                    self._end("status", None)

    def close(self) -> None:
        self.sock.close()


class Horde:
    """Many :class:`SlowCall` connections, serviced by one background thread until :meth:`close`."""

    def __init__(self):
        self.calls: list[SlowCall] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._pending: list[SlowCall] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="h2raw-horde", daemon=True)
        self._thread.start()

    def open(self, address: str, path: str, count: int, **kwargs) -> list[SlowCall]:
        """Open ``count`` :class:`SlowCall` (``kwargs`` go to it) and hand them to the thread.

        Raises OSError (refused, reset) from the first that fails; those opened before it stay.
        """
        calls = []
        try:
            for _ in range(count):
                calls.append(SlowCall(address, path, **kwargs))
        finally:
            with self._lock:
                self.calls += calls
                self._pending += calls
            self._wake_w.send(b"x")
        return calls

    def _loop(self) -> None:
        while not self._closed.is_set():
            for key, _ in self._selector.select(timeout=0.5):
                if key.fileobj is self._wake_r:
                    self._wake_r.recv(4096)
                    continue
                try:
                    alive = key.data.pump()
                except Exception as exc:  # noqa: BLE001 - a frame this parser cannot read
                    key.data._end("error", None, repr(exc))
                    alive = False
                if not alive:
                    self._selector.unregister(key.fileobj)
            with self._lock:
                pending, self._pending = self._pending, []
                self._changed.notify_all()
            for call in pending:
                self._selector.register(call.sock, selectors.EVENT_READ, call)

    def outcomes(self) -> list[Outcome | None]:
        """Each call's outcome so far (None: still open), in the order they were opened."""
        with self._lock:
            return [call.outcome for call in self.calls]

    def wait_ended(self, timeout: float, count: int | None = None) -> int:
        """Wait until ``count`` calls (default: all) have ended, or ``timeout``; the number ended."""
        def ended() -> int:
            return sum(call.outcome is not None for call in self.calls)
        with self._changed:
            self._changed.wait_for(lambda: ended() >= (len(self.calls) if count is None else count), timeout)
            return ended()

    def close(self) -> None:
        """Stop the thread and close every connection."""
        self._closed.set()
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for call in self.calls:
            call.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Horde:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
