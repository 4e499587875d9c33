"""The direct step channel: a step stream's frames on a plain socket, beside gRPC.

A worker's step stream (:mod:`psgrid.stepframes`) costs, on gRPC's Python
stack, a hand-off between threads for every message on both ends (the
request iterator's thread, the server's polling thread, the handler), about
a millisecond each on a busy host. The same frames on a socket cost a
``sendall`` and a ``recv_into``: one thread per end, no hand-off.

How one is set up (docs/design.md, "The direct step channel"):

1. The worker asks on its gRPC step stream, which the cluster token (or TLS)
   already authenticated: a ``channel_open`` frame.
2. The server answers with a port on its host and a ticket: 32 random bytes,
   good for one connection within :data:`TICKET_TTL_S`, issued for that
   registered worker (:class:`Tickets`).
3. The worker connects, sends the ticket, waits for the server's one-byte
   acceptance, and the stream goes on there, frame by frame as on gRPC: each
   frame a 4-byte little-endian length and its bytes. The gRPC stream is closed.

A connection whose first 32 bytes are not a live ticket, all within
:data:`TICKET_WAIT_S`, is closed before anything else is read; at most
:data:`MAX_UNPROVEN` connections wait to present one at once. A server with
TLS offers no channel (its frames would travel in the clear); its workers stay
on gRPC, as they do when anything in the set-up fails. A broken channel raises
:class:`ChannelBroken`, a ``grpc.RpcError`` with code UNAVAILABLE, so that the
callers' retries treat it as a broken gRPC stream.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from psgrid.codec import Head, Pieces, split_head

logger = logging.getLogger(__name__)

TICKET_BYTES = 32
#: A ticket is good for a connection this long after it was issued.
TICKET_TTL_S = 30.0
#: A connection must present its whole ticket within this long.
TICKET_WAIT_S = 5.0
#: Connections still to present a ticket, at once; more are closed as they come.
MAX_UNPROVEN = 64
#: The byte the server sends once a ticket is taken: the worker leaves gRPC only then.
ACCEPTED = b"\x01"
#: The largest frame either end reads: a 2 MiB chunk or inline payload and its header, with room.
FRAME_LIMIT = 8 << 20
#: Connections one server keeps at once (a worker has one per server and job it trains).
MAX_CONNECTIONS = 1024
#: Frames this large or larger are read into the connection's own reused buffer (fresh
#: memory per frame costs page faults: a 1 MiB pull spent ~2 ms there) and sent without
#: being joined to their length.
LARGE_FRAME = 64 << 10
#: Bytes of a large frame read first by next_head, to find where its payload starts.
HEAD_BYTES = 4096


class ChannelBroken(grpc.RpcError):
    """The channel ended or failed: for callers, a gRPC stream that became UNAVAILABLE."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def _recv_exact(sock: socket.socket, n: int, buffer: bytearray | None = None,
                deadline: float | None = None) -> bytearray:
    """``n`` bytes from ``sock`` (into ``buffer``'s start when given); ChannelBroken when it
    ends first, or (``deadline``, monotonic) when they are not all in by then."""
    buffer = bytearray(n) if buffer is None else buffer
    view, got = memoryview(buffer), 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelBroken("step channel: too slow")
            sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:n])
        except OSError as exc:
            raise ChannelBroken(f"step channel: {exc}") from None
        if k == 0:
            raise ChannelBroken("step channel: the other end closed it")
        got += k
    return buffer


def _send_parts(sock: socket.socket, parts: list) -> None:
    """Send ``parts`` one after the other, gathered by the kernel (``sendmsg``), however
    many calls a large one takes."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


class Connection:
    """One end of a channel: frames in, frames out.

    A large frame read is a view into this connection's buffer, good until the
    next read: its reader uses it first (the step stream's both ends copy a
    payload where it belongs as each frame arrives).
    """

    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):  # a peer gone without a word is noticed in ~90 s, as gRPC's keepalive
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        self._sock = sock
        self._closed = False
        self._send_lock = threading.Lock()
        self._buffer = bytearray()

    def send(self, frames: Iterable[bytes]) -> None:
        """Send ``frames``: small ones together, in one system call with whatever follows
        them up to a large frame's payload (every send on loopback wakes the reader,
        which may take the CPU from the sender before its next send)."""
        with self._send_lock:
            try:
                small: list[bytes] = []
                for frame in frames:
                    if isinstance(frame, Pieces):  # a payload's view: sent where it lies, not copied
                        small += (frame.nbytes.to_bytes(4, "little"), *frame[:-1])
                        _send_parts(self._sock, [b"".join(small), frame[-1]])  # one system call for both
                        small = []
                        continue
                    small.append(len(frame).to_bytes(4, "little"))
                    if len(frame) < LARGE_FRAME:
                        small.append(frame)
                    else:
                        self._sock.sendall(b"".join(small))
                        small = []
                        self._sock.sendall(frame)
                if small:
                    self._sock.sendall(b"".join(small))
            except OSError as exc:
                raise ChannelBroken(f"step channel: {exc}") from None

    def __iter__(self) -> "Connection":
        return self

    def __next__(self) -> bytes | memoryview:
        """The next frame; ChannelBroken when the channel ends (mid-frame or between frames)."""
        n = self._frame_length()
        if n < LARGE_FRAME:
            return bytes(_recv_exact(self._sock, n)) if n else b""
        return self._rest_of_frame(n, b"")

    def next_head(self) -> bytes | memoryview | Head:
        """The next frame, as ``next``; but a large header frame whose inline payload is its
        last field comes as a :class:`~psgrid.codec.Head`, its payload left on the socket
        but for what the first HEAD_BYTES brought: the reader receives the rest where it
        belongs (a pull's weights: into the worker's buffer, not copied out of this one)."""
        n = self._frame_length()
        if n < LARGE_FRAME:
            return bytes(_recv_exact(self._sock, n)) if n else b""
        first = memoryview(_recv_exact(self._sock, HEAD_BYTES))
        split = split_head(first, n)
        if split is None:
            return self._rest_of_frame(n, first)
        header, start = split
        return Head(header, n - start, first[start:], self._receive_into)

    def _frame_length(self) -> int:
        n = int.from_bytes(_recv_exact(self._sock, 4), "little")
        if n > FRAME_LIMIT:
            self.cancel()
            raise ChannelBroken(f"step channel: a frame of {n} bytes (at most {FRAME_LIMIT})")
        return n

    def _rest_of_frame(self, n: int, first: bytes | memoryview) -> memoryview:
        """A large frame of ``n`` bytes, ``first`` of them read already, in the reused buffer."""
        if len(self._buffer) < n:
            self._buffer = bytearray(n)
        view = memoryview(self._buffer)
        view[: len(first)] = first
        _recv_exact(self._sock, n - len(first), view[len(first): n])
        return view[:n]

    def _receive_into(self, view: memoryview) -> None:
        _recv_exact(self._sock, len(view), view)

    def done(self) -> bool:
        """Whether the channel ended (cancelled here, or closed by the other end while idle)."""
        if self._closed:
            return True
        try:
            poller = select.poll()  # not select.select: no limit on the descriptor's number
            poller.register(self._sock, select.POLLIN)
            if not poller.poll(0):
                return False  # open, nothing to read
            return not self._sock.recv(1, socket.MSG_PEEK)  # readable: data, or the end
        except OSError:
            return True

    def cancel(self) -> None:
        """End the channel: a read or send blocked on it, here or at the other end, ends.
        Safe from any thread: the socket is shut down, and closed only by :meth:`close`."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Cancel and free the socket (its owner, once nothing reads or sends on it)."""
        self.cancel()
        self._sock.close()

    def time_remaining(self) -> None:
        """As a gRPC call without a deadline (the server's handlers ask)."""
        return None


def connect(host: str, port: int, ticket: bytes, timeout: float, io_timeout: float | None = None) -> Connection:
    """The worker's end: connect, present ``ticket`` and wait for the server to take it,
    all within ``timeout`` (OSError when anything fails: a port that is not a psgrid
    channel, a refused ticket). ``io_timeout``: the longest any later send or read blocks."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(ticket)
        if bytes(_recv_exact(sock, len(ACCEPTED), deadline=deadline)) != ACCEPTED:
            raise ConnectionError("not a psgrid step channel")
        sock.settimeout(io_timeout)
    except ChannelBroken as exc:
        sock.close()
        raise ConnectionError(f"the ticket was not taken: {exc.details()}") from None
    except OSError:
        sock.close()
        raise
    return Connection(sock)


class Tickets:
    """One-use tickets for channel connections, each bound to a worker."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[bytes, tuple[str, float]] = {}  # sha256(ticket) -> (worker, expiry)

    def issue(self, worker_id: str) -> bytes:
        ticket = secrets.token_bytes(TICKET_BYTES)
        now = self._clock()
        with self._lock:
            self._live = {k: v for k, v in self._live.items() if v[1] > now}
            self._live[hashlib.sha256(ticket).digest()] = (worker_id, now + TICKET_TTL_S)
        return ticket

    def redeem(self, ticket: bytes) -> str | None:
        """The worker ``ticket`` was issued to, once, while it lives; None otherwise."""
        with self._lock:
            entry = self._live.pop(hashlib.sha256(ticket).digest(), None)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]


class Listener:
    """The server's end: accepts channel connections and hands each, once its ticket is
    redeemed, to ``serve(connection, worker_id)`` on a thread of its own."""

    def __init__(self, host: str, tickets: Tickets, serve: Callable[[Connection, str], None],
                 idle_s: float | None = None):
        self.tickets = tickets
        self._serve = serve
        #: A connection that sends nothing (nor takes what is sent) for this long is closed.
        self.idle_s = idle_s
        # The host's first address, IPv4 or IPv6, as getaddrinfo resolves it (a name too).
        family, _, _, _, address = socket.getaddrinfo(host.strip("[]") or None, 0, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(address)
            self._sock.listen(128)
        except OSError:
            self._sock.close()
            raise
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._unproven = 0  # of them, still to present a ticket
        self._closed = False
        self._refused = 0
        self._thread = threading.Thread(target=self._accept, name="step-channel", daemon=True)

    def start(self) -> "Listener":
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                logger.warning("step channel: accept failed (%s); accepting again in 0.1 s", exc)
                time.sleep(0.1)  # out of file descriptors, say: it passes
                continue
            with self._lock:
                if self._closed or len(self._open) >= MAX_CONNECTIONS or self._unproven >= MAX_UNPROVEN:
                    sock.close()
                    continue
                self._open.add(sock)
                self._unproven += 1
            threading.Thread(target=self._handle, args=(sock, peer), name="step-channel-conn",
                             daemon=True).start()

    def _handle(self, sock: socket.socket, peer) -> None:
        proven = False
        try:
            try:
                ticket = bytes(_recv_exact(sock, TICKET_BYTES, deadline=time.monotonic() + TICKET_WAIT_S))
            except (ChannelBroken, OSError):
                ticket = b""
            worker_id = self.tickets.redeem(ticket) if ticket else None
            with self._lock:
                self._unproven -= 1
                proven = True
                if worker_id is None:
                    self._refused += 1
                    refused = self._refused
            if worker_id is None:  # said once, then every 100th: a stranger's loop must not flood the log
                if refused == 1 or refused % 100 == 0:
                    logger.info("refused a step channel connection from %s: no valid ticket (%d so far)",
                                peer, refused)
                return
            sock.settimeout(self.idle_s)
            sock.sendall(ACCEPTED)
            connection = Connection(sock)
            try:
                self._serve(connection, worker_id)
            finally:
                connection.cancel()
        except OSError as exc:
            logger.debug("step channel from %s ended: %s", peer, exc)
        finally:
            with self._lock:
                if not proven:
                    self._unproven -= 1
                self._open.discard(sock)
            sock.close()

    def close(self) -> None:
        """Stop accepting and end every connection (their handlers see the channel end)."""
        with self._lock:
            self._closed = True
            open_now = list(self._open)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._sock.close()
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
