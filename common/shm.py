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
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import secrets
import socket

import torch

logger = logging.getLogger(__name__)

ROOT = pathlib.Path("/dev/shm")
PREFIX = "psgrid-"
#: Bytes before the data: the nonce, padded so the data stays 64-byte aligned.
HEADER_BYTES = 64
NONCE_BYTES = 16
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
        return cls(p, nonce, _map(p, nbytes))

    def unlink(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


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
