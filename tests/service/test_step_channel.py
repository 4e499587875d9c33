"""The direct step channel (psgrid.channel): a worker's step stream on a plain socket
beside gRPC, entered with a one-use ticket got on the authenticated gRPC stream."""
from __future__ import annotations

import logging
import secrets
import socket

import pytest
import torch

from psgrid import channel, stepframes
from psgrid.errors import UnknownWorker
from psgrid.worker.ps_client import ParameterServerClient

from helpers.inproc import make_rig, spec
from helpers.wait import wait_until


def grads(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.full((4,), value)}


def train_bsp(rig, steps: int) -> None:
    for seq in range(steps):
        for worker in (0, 1):
            rig.pull(worker, seq)
        for worker in (0, 1):
            rig.push(worker, seq, grads(0.1 * (seq + 1) * (worker + 1)))


def grpc_only(rig, port: int) -> ParameterServerClient:
    return ParameterServerClient(f"127.0.0.1:{port}", timeout_s=10, retry_for_s=0, direct_channel=False)


def ticket(rig, port: int, worker: int = 0) -> bytes:
    """A ticket, asked for on a gRPC step stream as a worker would."""
    client = grpc_only(rig, port)
    stream = client.stream(rig.workers[worker])
    with stream.lock:
        stream.send([stepframes.channel_open(rig.workers[worker])])
        offer = stream.answer(None, 10)
    client.close()
    return offer.ticket


def enter(sock: socket.socket, good_ticket: bytes) -> None:
    """Present a ticket as a worker does; the server says it took it."""
    sock.sendall(good_ticket)
    sock.settimeout(10)
    assert sock.recv(1) == channel.ACCEPTED


def closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    """Whether the server closed ``sock`` (an EOF within ``timeout``), reading nothing else."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_step_stream_moves_to_the_channel_and_trains_bit_for_bit_as_on_grpc(server_factory):
    results = {}
    for offered in (True, False):
        server = server_factory(step_channel=offered)
        rig = make_rig(server.port, spec(num_workers=2, staleness=0))
        train_bsp(rig, 6)
        assert rig.ps.stream(rig.workers[0]).on_channel is offered
        assert (server.listener is not None) is offered
        results[offered] = rig.params()
    assert results[True].keys() == results[False].keys()
    assert all(torch.equal(results[True][k], results[False][k]) for k in results[True])


def test_without_a_channel_the_worker_stays_on_grpc_and_says_why_once(server_factory, caplog):
    server = server_factory(step_channel=False)
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    rig.ps = ParameterServerClient(f"127.0.0.1:{server.port}", timeout_s=10, retry_for_s=0)
    with caplog.at_level(logging.DEBUG, logger="psgrid.worker.ps_client"):
        caplog.clear()  # make_rig's own client said it too
        train_bsp(rig, 3)
        rig.ps.close_streams()  # a new stream asks again: said at DEBUG now
        train_bsp(rig, 1)
    said = [r for r in caplog.records if "no direct step channel" in r.getMessage()]
    assert [r.levelno for r in said][:1] == [logging.INFO], said
    assert all(r.levelno == logging.DEBUG for r in said[1:])
    assert "step_channel = false" in said[0].getMessage()


def test_a_connection_without_a_live_ticket_is_closed_unread_and_a_ticket_serves_once(server):
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    port = server.listener.port
    with socket.create_connection(("127.0.0.1", port)) as stranger:
        stranger.sendall(secrets.token_bytes(channel.TICKET_BYTES))
        assert closed_by_server(stranger)
    good = ticket(rig, server.port)
    with socket.create_connection(("127.0.0.1", port)) as first:
        enter(first, good)
        conn = channel.Connection(first)
        conn.send([stepframes.pull_request(rig.job_id, rig.workers[0], 0, False, 1.0)])
        assert next(conn)  # answered: the stream goes on here
        with socket.create_connection(("127.0.0.1", port)) as again:
            again.sendall(good)  # the same ticket: used up
            assert closed_by_server(again)


def test_a_ticket_is_only_for_a_registered_worker(server):
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    client = grpc_only(rig, server.port)
    stream = client.stream(rig.workers[0])
    with stream.lock:
        stream.send([stepframes.channel_open("w-0000000000")])
        with pytest.raises(UnknownWorker):
            stream.answer(None, 10)
    client.close()


def test_an_oversized_or_undecodable_frame_ends_the_channel(server):
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    for bad in ((channel.FRAME_LIMIT + 1).to_bytes(4, "little"), (3).to_bytes(4, "little") + b"\xff\xff\xff"):
        with socket.create_connection(("127.0.0.1", server.listener.port)) as sock:
            enter(sock, ticket(rig, server.port))
            sock.sendall(bad)
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk  # an error frame may come first, then the end
            assert b"" == sock.recv(1)
    # the server goes on: the worker still trains
    rig.pull(0, 0)
    assert rig.push(0, 0, grads(0.1)) == (1, False)


def test_a_broken_channel_is_left_for_a_new_stream_and_training_goes_on(server):
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    rig.pull(0, 0)
    rig.push(0, 0, grads(0.1))
    stream = rig.ps.stream(rig.workers[0])
    assert stream.on_channel
    server.listener.close()  # every channel ends, and no new one can be reached
    wait_until(lambda: stream.ended, timeout=10, message="the channel seen ended")
    rig.pull(0, 1)  # a new stream: offered a channel it cannot reach, so gRPC
    assert rig.push(0, 1, grads(0.2)) == (2, False)
    assert not rig.ps.stream(rig.workers[0]).on_channel


def test_a_channel_port_that_cannot_be_reached_is_given_up_once_for_the_client(server, caplog, monkeypatch):
    """A connection that times out (a firewall dropping the port): no stream of the client asks again."""
    from psgrid.worker import ps_client

    def unreachable(host, port, ticket, timeout, io_timeout=None):
        raise TimeoutError(f"no answer from {host}:{port} (this test)")
    monkeypatch.setattr(ps_client.channel, "connect", unreachable)
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    rig.ps = ParameterServerClient(f"127.0.0.1:{server.port}", timeout_s=10, retry_for_s=0)
    with caplog.at_level(logging.DEBUG, logger="psgrid.worker.ps_client"):
        caplog.clear()
        train_bsp(rig, 2)
    said = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO, said  # not asked again by the second stream
    assert rig.ps.channel_host is None
    assert not any(rig.ps.stream(w).on_channel for w in rig.workers)


def test_a_channel_that_stays_silent_is_closed_after_connection_idle_s(server_factory):
    server = server_factory(connection_idle_s=0.5)
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    with socket.create_connection(("127.0.0.1", server.listener.port)) as sock:
        enter(sock, ticket(rig, server.port))
        assert closed_by_server(sock, timeout=10)


def test_a_server_from_before_the_channel_leaves_the_worker_on_grpc(server, monkeypatch, caplog):
    """Such a server ends the stream at the frame it does not know (INVALID_ARGUMENT): the
    worker says so once, opens a plain stream and trains on."""
    from psgrid.errors import MalformedRequest

    known = stepframes.read_request

    def before_the_channel(frame):
        request, inline = known(frame)
        if request.WhichOneof("frame") == "channel_open":
            raise MalformedRequest("a step request starts with a pull, a push header or shm_open")
        return request, inline
    monkeypatch.setattr(stepframes, "read_request", before_the_channel)
    with caplog.at_level(logging.INFO, logger="psgrid.worker.ps_client"):
        rig = make_rig(server.port, spec(num_workers=1, staleness=None))
        rig.pull(0, 0)
        assert rig.push(0, 0, grads(0.1)) == (1, False)
    assert not rig.ps.stream(rig.workers[0]).on_channel and rig.ps.channel_host is None
    assert [r.getMessage() for r in caplog.records if "does not know the direct step channel" in r.getMessage()]


def test_a_stranger_who_drips_a_ticket_is_cut_off_and_many_do_not_crowd_out_workers(server, monkeypatch):
    """The whole ticket must come within TICKET_WAIT_S, however slowly it drips, and
    connections still to prove themselves have a bound of their own: workers get in."""
    monkeypatch.setattr(channel, "TICKET_WAIT_S", 1.0)
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    port = server.listener.port
    strangers = [socket.create_connection(("127.0.0.1", port)) for _ in range(channel.MAX_UNPROVEN + 8)]
    try:
        for sock in strangers[:4]:
            sock.sendall(b"x")  # one byte of 32, then nothing
        assert all(closed_by_server(sock, timeout=10) for sock in strangers[:4])
    finally:
        for sock in strangers:
            sock.close()
    client = ParameterServerClient(f"127.0.0.1:{server.port}", timeout_s=10, retry_for_s=0)
    rig.ps = client
    rig.pull(0, 0)
    assert rig.push(0, 0, grads(0.1)) == (1, False)
    assert client.stream(rig.workers[0]).on_channel


def test_a_pulls_weights_on_a_channel_land_in_the_workers_buffer_byte_for_byte():
    """A large pull answer is read up to its inline payload, the rest received straight into
    the worker's buffer (Connection.next_head); small frames and chunked payloads as before."""
    import socket
    import threading

    import torch

    from psgrid import codec, stepframes
    from psgrid.channel import Connection
    from psgrid.spec import JobState

    for numel in (30_000, 1 << 18, 3 << 19):  # under and over the 64 KiB large frame; over 2 MiB: chunks
        layout = codec.Layout.of([("w", torch.float32, (numel - 7,)), ("b", torch.float32, (7,))])
        weights = torch.arange(layout.total_bytes, dtype=torch.uint8)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
        sender, receiver = Connection(a), Connection(b)
        frames = list(codec.encode_pull(JobState.RUNNING, 3, 4, layout, weights, clock=4, pieces=True))
        thread = threading.Thread(target=sender.send, args=(frames,))
        thread.start()
        into = torch.zeros(layout.total_bytes + 64, dtype=torch.uint8)
        pulled = stepframes.read_reply(receiver, lambda n: into)
        thread.join()
        assert (pulled.version, pulled.step, pulled.clock, pulled.layout) == (3, 4, 4, layout)
        assert pulled.buffer is into and torch.equal(into[: layout.total_bytes], weights)
        sender.close()
        receiver.close()

