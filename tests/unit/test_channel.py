"""Tickets of the direct step channel (psgrid.channel), on a scripted clock."""
from __future__ import annotations

from psgrid.channel import TICKET_BYTES, TICKET_TTL_S, Tickets


def test_a_ticket_names_its_worker_once_and_only_while_it_lives():
    now = [100.0]
    tickets = Tickets(clock=lambda: now[0])
    a, b, c = tickets.issue("w-a"), tickets.issue("w-b"), tickets.issue("w-c")
    assert len({a, b, c}) == 3 and all(len(t) == TICKET_BYTES for t in (a, b, c))
    assert tickets.redeem(b) == "w-b"
    assert tickets.redeem(b) is None  # used
    assert tickets.redeem(bytes(TICKET_BYTES)) is None  # never issued
    now[0] += TICKET_TTL_S - 0.01
    assert tickets.redeem(a) == "w-a"
    now[0] += 0.02
    assert tickets.redeem(c) is None  # expired


def test_expired_tickets_are_forgotten_as_new_ones_are_issued():
    now = [0.0]
    tickets = Tickets(clock=lambda: now[0])
    for _ in range(100):
        tickets.issue("w")
    now[0] += TICKET_TTL_S + 1
    tickets.issue("w")
    assert len(tickets._live) == 1


def test_the_channel_is_asked_of_the_host_a_grpc_target_names():
    from psgrid.worker.ps_client import _host_of

    assert _host_of("10.0.0.5:7070") == "10.0.0.5"
    assert _host_of("[::1]:7070") == "::1"
    assert _host_of("dns:///ps-0.cluster.local:7070") == "ps-0.cluster.local"
    assert _host_of("ipv4:127.0.0.1:7070") == "127.0.0.1"
    assert _host_of("unix:/run/psgrid.sock") is None


def test_split_head_finds_a_last_inline_payload_within_the_prefix_only():
    import torch

    from psgrid import codec

    payload = torch.ones(100_000, dtype=torch.uint8)
    frame = codec.header_frame(b"\x08\x05", payload)  # a header of one varint field, then the payload
    header, start = codec.split_head(frame[:4096], len(frame))
    assert header == b"\x08\x05" and len(frame) - start == 100_000
    assert codec.split_head(frame[:3], len(frame)) is None  # cut inside the header
    assert codec.split_head(frame[:4096], len(frame) + 1) is None  # not the frame's length
    assert codec.split_head(codec.header_frame(b"\x08\x05", None), 4) is None  # no payload
