"""Fixed ports for the tests that need them (the multi-host cluster file names its ports)."""
from __future__ import annotations

import socket


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that were free a moment ago.

    Everywhere else a child reports the port it bound. The multi-host form needs
    fixed ports instead (other machines dial a server before it starts), and the
    tests play every machine on one: so this binds port-0 sockets and closes them
    just before `psgrid up` binds the same ports. Acceptable in those tests only;
    another process could take a port in between.
    """
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            others = [socket.socket() for _ in range(1, count)]
            try:
                for offset, sock in enumerate(others, start=1):
                    sock.bind(("127.0.0.1", base + offset))
            except OSError:
                continue
            finally:
                for sock in others:
                    sock.close()
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")
