"""Fixed ports for clusters played on one machine come from below the ephemeral range."""
from __future__ import annotations

import socket

from psgrid.supervisor.launch import _ephemeral_low, consecutive_free_ports


def test_fixed_ports_are_free_and_never_ones_a_port_0_bind_could_be_given():
    """A shard's direct step channel (or any client) binds port 0 while `psgrid up` starts
    the shards one by one: it must not be handed a port a later shard was promised."""
    for _ in range(20):
        base = consecutive_free_ports(3)
        assert base + 3 <= _ephemeral_low()
        socks = [socket.socket() for _ in range(3)]
        try:
            for offset, sock in enumerate(socks):
                sock.bind(("127.0.0.1", base + offset))
        finally:
            for sock in socks:
                sock.close()
