"""Shared-memory segments for the step stream when a worker and a server share a host.

The server creates two files under ``/dev/shm`` per step stream, mode 0600, named
``psgrid-<server pid>-<random>``: one the worker writes its gradients into, one the
server writes the weights into. Each starts with a random nonce, also sent in the
offer on the (authenticated) stream: a worker that reads the same nonce from the
file sees the server's memory, so the path is never used across hosts, and
maps both, then unlinks them. From then on only the two mappings keep the memory
alive, so it is freed when both processes let go, whatever way they end (kill -9
included). The server unlinks them too when the stream ends, and a server that
starts removes the files of psgrid servers that are no longer running (one
killed between creating and the worker's unlink).

Requests and answers on the stream order every access: the worker writes a
gradient, then sends the push; the server reads it before it answers. The server
writes the weights, then answers the pull; the worker reads them before its next
request. So nobody ever reads a half-written buffer.

A job's parameters themselves move into shared memory once a worker on this
host asks for it (:class:`SharedStore`): the server's parameter buffer, which
workers read their weights from directly, so a pull copies nothing on the
server. It is a file without a name (``O_TMPFILE``), so nothing is left in
``/dev/shm`` whatever way the server ends; each offer links it under a fresh
``psgrid-<pid>-<random>`` name that the worker unlinks once it mapped it
(read-only), like the segments above. Here an answer does not order every
access: an async job's parameters change whenever another worker's push is
applied, and a BSP job's when a round is applied without a worker dropped from
the barrier. So a sequence number in the file's header (odd while the server
writes, bumped around every write) tells a worker that what it copied out may
be torn: it pulls again, and that pull asks for a copy.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import os
import pathlib
import re
import secrets
import socket
import struct
import warnings
import weakref

import torch

logger = logging.getLogger(__name__)

ROOT = pathlib.Path("/dev/shm")
PREFIX = "psgrid-"
#: Bytes before the data: the nonce, padded so the data stays 64-byte aligned.
HEADER_BYTES = 64
NONCE_BYTES = 16
#: A SharedStore's write sequence number: a little-endian uint64 after the nonce.
_SEQ = struct.Struct("<Q")
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400
#: Free space left in /dev/shm after a pair of segments.
MARGIN_BYTES = 16 << 20
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+$")


class Unavailable(Exception):
    """Shared memory cannot be used here; the message says why (one log line)."""


@dataclasses.dataclass
class Segment:
    """One mapped file: ``data`` is its payload part (uint8), ``nonce`` its first bytes."""

    path: pathlib.Path
    nonce: bytes
    data: torch.Tensor

    @classmethod
    def create(cls, nbytes: int) -> "Segment":
        path = ROOT / f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        nonce = secrets.token_bytes(NONCE_BYTES)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER_BYTES + nbytes)
            os.pwrite(fd, nonce, 0)
        finally:
            os.close(fd)
        return cls(path, nonce, _map(path, nbytes))

    @classmethod
    def attach(cls, path: str, nbytes: int, nonce: bytes) -> "Segment":
        """Map the server's file at ``path``; Unavailable unless it holds ``nonce``."""
        p = _checked(path, nbytes, nonce)
        return cls(p, nonce, _map(p, nbytes))

    def unlink(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class SharedStore:
    """A job's parameter buffer in shared memory (see the module's docstring).

    The server makes it (:meth:`create`), writes it only inside :meth:`writing`,
    and gives it a name per offer (:meth:`link`); a worker maps that name
    read-only (:meth:`attach`), unlinks it, and once it copied weights out asks
    :meth:`unchanged` with the sequence number the pull's answer gave.
    """

    def __init__(self, data: torch.Tensor, nonce: bytes, header: memoryview, fd: int | None = None):
        #: The payload part (uint8): the parameters, laid out as on the wire.
        self.data = data
        self.nonce = nonce
        self._header = header
        self._fd = fd
        if fd is not None:
            weakref.finalize(self, os.close, fd)

    @classmethod
    def create(cls, nbytes: int) -> "SharedStore":
        """A nameless file in /dev/shm, mode 0600; Unavailable when the system has none."""
        check_space(nbytes)
        try:
            fd = os.open(ROOT, os.O_TMPFILE | os.O_RDWR, 0o600)
        except (AttributeError, OSError) as exc:  # no O_TMPFILE on this system or filesystem
            raise Unavailable(f"{ROOT} takes no nameless files here ({exc})") from None
        try:
            os.ftruncate(fd, HEADER_BYTES + nbytes)
            nonce = secrets.token_bytes(NONCE_BYTES)
            os.pwrite(fd, nonce, 0)
            whole = mmap.mmap(fd, HEADER_BYTES + nbytes)
        except OSError:
            os.close(fd)
            raise
        data = torch.frombuffer(whole, dtype=torch.uint8, offset=HEADER_BYTES, count=nbytes)
        return cls(data, nonce, memoryview(whole)[:HEADER_BYTES], fd)

    def link(self) -> Segment:
        """A fresh name for the file, for one offer (unlinked by whoever maps it first)."""
        path = ROOT / f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{self._fd}".encode(), _AT_FDCWD, os.fsencode(path),
                        _AT_SYMLINK_FOLLOW) != 0:
            err = ctypes.get_errno()
            raise Unavailable(f"cannot name the parameters' file ({os.strerror(err)})")
        return Segment(path, self.nonce, self.data)

    @classmethod
    def attach(cls, path: str, nbytes: int, nonce: bytes) -> "SharedStore":
        """Map the server's parameters at ``path``, read-only; Unavailable unless the file
        holds ``nonce`` and ``nbytes``."""
        p = _checked(path, nbytes, nonce)
        try:
            with open(p, "rb") as f:
                whole = mmap.mmap(f.fileno(), HEADER_BYTES + nbytes, prot=mmap.PROT_READ)
        except OSError as exc:
            raise Unavailable(f"cannot map {p.name} ({exc.strerror})") from None
        with warnings.catch_warnings():  # read-only on purpose: a worker never writes the server's weights
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(whole, dtype=torch.uint8, offset=HEADER_BYTES, count=nbytes)
        return cls(data, nonce, memoryview(whole)[:HEADER_BYTES])

    @property
    def seq(self) -> int:
        """The write sequence number: odd while a write is under way."""
        return _SEQ.unpack_from(self._header, NONCE_BYTES)[0]

    def writing(self) -> "_Writing":
        """A context for one write of the parameters (the server's, under the job's lock)."""
        return _Writing(self)

    def unchanged(self, seq: int) -> bool:
        """Whether nothing wrote the parameters since a reader saw ``seq`` (even)."""
        return seq % 2 == 0 and self.seq == seq


class _Writing:
    def __init__(self, store: SharedStore):
        self._store = store

    def __enter__(self) -> None:
        s = self._store
        _SEQ.pack_into(s._header, NONCE_BYTES, s.seq + 1)

    def __exit__(self, *exc) -> None:
        s = self._store
        _SEQ.pack_into(s._header, NONCE_BYTES, s.seq + 1)


_libc = ctypes.CDLL(None, use_errno=True)


def _checked(path: str, nbytes: int, nonce: bytes) -> pathlib.Path:
    """``path`` as a psgrid segment of ``nbytes`` holding ``nonce``, or Unavailable saying why not."""
    p = pathlib.Path(path)
    if p.parent != ROOT or not _NAME.match(p.name):
        raise Unavailable(f"not a psgrid segment: {path!r}")
    try:
        st = p.stat()
        with open(p, "rb") as f:
            found = f.read(NONCE_BYTES)
    except OSError as exc:
        raise Unavailable(f"cannot open {p.name} ({exc.strerror}): not the server's host, or not its user")
    if found != nonce or st.st_size != HEADER_BYTES + nbytes:
        raise Unavailable(f"{p.name} is not the server's segment (another host's /dev/shm)")
    return p


def _map(path: pathlib.Path, nbytes: int) -> torch.Tensor:
    whole = torch.from_file(str(path), shared=True, size=HEADER_BYTES + nbytes, dtype=torch.uint8)
    return whole[HEADER_BYTES:]


def is_local(address: str) -> bool:
    """Whether HOST:PORT names this host (a loopback address, or one a socket can bind
    here): only then is shared memory worth asking for. Sends nothing."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def check_space(nbytes: int) -> None:
    """Unavailable unless /dev/shm exists and has room for ``nbytes`` and the margin."""
    try:
        st = os.statvfs(ROOT)
    except OSError:
        raise Unavailable(f"{ROOT} does not exist here") from None
    free = st.f_bavail * st.f_frsize
    if free < nbytes + MARGIN_BYTES:
        raise Unavailable(f"{ROOT} has {free >> 20} MiB free, {(nbytes + MARGIN_BYTES) >> 20} MiB needed "
                          "(containers often mount 64 MB: raise it with --shm-size)")


def sweep() -> int:
    """Remove segments of psgrid processes that no longer run (owned by this user); return how many."""
    removed = 0
    try:
        entries = list(ROOT.iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _NAME.match(entry.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid() or _alive(int(m.group(1))):
                continue
            entry.unlink()
            removed += 1
        except OSError:
            continue
    if removed:
        logger.info("removed %d shared-memory segment(s) of psgrid processes that are gone", removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
