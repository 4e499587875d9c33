"""The step stream's shared-memory path (psgrid.shm): used on one host, exact, cleaned up,
and a fallback to the stream whenever it cannot be used."""
from __future__ import annotations

import logging
import os
import pathlib
import stat

import pytest
import torch

from psgrid import shm
from psgrid.worker.ps_client import ParameterServerClient, push_header

from helpers.inproc import make_rig, spec


def grads(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.full((4,), value)}


def segments_of(pid: int) -> list[str]:
    return [p.name for p in shm.ROOT.iterdir() if p.name.startswith(f"{shm.PREFIX}{pid}-")]


def train(rig, steps: int) -> None:
    for seq in range(steps):
        rig.pull(0, seq)
        assert rig.push(0, seq, grads(0.1 * (seq + 1))) == (seq + 1, False)


@pytest.mark.skipif(not shm.ROOT.is_dir(), reason="no /dev/shm on this system")
def test_on_one_host_the_tensors_move_through_shared_memory_and_match_the_stream(server_factory):
    results = {}
    for shared in (True, False):
        server = server_factory()
        rig = make_rig(server.port, spec(num_workers=1, staleness=None))
        rig.ps = ParameterServerClient(f"127.0.0.1:{server.port}", timeout_s=10, retry_for_s=0,
                                       shared_memory=shared)
        train(rig, 5)
        stream = rig.ps.stream(rig.workers[0])
        assert (stream.shm is not None) is shared
        results[shared] = rig.params()
        pulled = rig.pull(0, 5)
        assert all(torch.equal(rig.layout.views(pulled.buffer)[k], results[shared][k]) for k in results[shared])
        rig.ps.close()
    assert all(torch.equal(results[True][k], results[False][k]) for k in results[True])
    assert segments_of(os.getpid()) == []  # mapped, then unlinked at once


def mapped_read_only(t: torch.Tensor) -> bool:
    """Whether the memory at ``t`` is mapped without write permission in this process."""
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= t.data_ptr() < hi:
            return line.split()[1].startswith("r-")
    raise AssertionError("not mapped")


@pytest.mark.skipif(not shm.ROOT.is_dir(), reason="no /dev/shm on this system")
def test_a_bsp_worker_reads_the_weights_where_the_server_keeps_them(server_factory):
    """No copy on the server: the pull's answer names the job's own parameters, mapped
    read-only into the worker; the training is bit for bit that of the stream; the job's
    parameters leave shared memory when it ends."""
    results = {}
    for shared in (True, False):
        server = server_factory()
        rig = make_rig(server.port, spec(num_workers=1, staleness=0))
        rig.ps = ParameterServerClient(f"127.0.0.1:{server.port}", timeout_s=10, retry_for_s=0,
                                       shared_memory=shared)
        train(rig, 5)
        stream = rig.ps.stream(rig.workers[0])
        pulled = rig.pull(0, 5)
        if shared:
            assert stream.store is not None and pulled.buffer.data_ptr() == stream.store.data.data_ptr()
            assert pulled.intact() and mapped_read_only(pulled.buffer)
        else:
            assert stream.store is None and pulled.intact is None
        results[shared] = {k: v.clone() for k, v in rig.layout.views(pulled.buffer).items()}
        assert all(torch.equal(results[shared][k], v) for k, v in rig.params().items())
        job = server.core.state.job(rig.job_id)
        assert (job.store.shared is not None) is shared
        rig.jobs.cancel(rig.job_id)
        assert job.store.shared is None  # over: back in private memory, the same weights
        assert all(torch.equal(results[shared][k], v) for k, v in rig.params().items())
        rig.ps.close()
    assert all(torch.equal(results[True][k], results[False][k]) for k in results[True])
    assert segments_of(os.getpid()) == []  # every name unlinked once mapped


@pytest.mark.skipif(not shm.ROOT.is_dir(), reason="no /dev/shm on this system")
def test_weights_written_while_a_worker_read_them_are_not_taken_as_read(server_factory):
    """A round applied after a pull's answer (as one applied without a worker dropped from
    the barrier) changes the write sequence number: that worker's copy counts as torn."""
    server = server_factory()
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    for worker in (0, 1):
        rig.pull(worker, 0)  # the first pull opens the shared-memory path
    held = rig.pull(0, 0)
    assert held.intact is not None and held.intact()
    rig.push(0, 0, grads(0.1))
    assert held.intact()  # half a round: nothing written yet
    rig.push(1, 0, grads(0.2))
    assert not held.intact()
    fresh = rig.pull(0, 1)
    assert fresh.intact is None  # after a torn read, a copy
    again = rig.pull(0, 1)
    assert again.intact() and torch.equal(again.buffer, fresh.buffer)  # in place again, at step 1


@pytest.mark.skipif(not shm.ROOT.is_dir(), reason="no /dev/shm on this system")
def test_the_segments_are_private_and_gone_from_dev_shm_once_mapped(server_factory):
    server = server_factory()
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    rig.pull(0, 0)
    stream = rig.ps.stream(rig.workers[0])
    push, pull = stream.shm
    assert not push.path.exists() and not pull.path.exists()
    segment = shm.Segment.create(64)  # what the server creates
    try:
        assert stat.S_IMODE(segment.path.stat().st_mode) == 0o600
        with pytest.raises(shm.Unavailable):
            shm.Segment.attach(str(segment.path), 64, b"x" * shm.NONCE_BYTES)  # not the offered nonce
        with pytest.raises(shm.Unavailable):
            shm.Segment.attach("/tmp/not-a-segment", 64, segment.nonce)
    finally:
        segment.unlink()


@pytest.mark.parametrize("why", ["disabled", "no room"])
def test_without_shared_memory_the_worker_stays_on_the_stream_and_says_why(server_factory, monkeypatch,
                                                                          caplog, why):
    server = server_factory(shared_memory=why != "disabled")
    if why == "no room":
        monkeypatch.setattr(shm, "MARGIN_BYTES", 1 << 62)
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    with caplog.at_level(logging.INFO, logger="psgrid.worker.ps_client"):
        train(rig, 3)
    assert rig.ps.stream(rig.workers[0]).shm is None
    said = [r.getMessage() for r in caplog.records if "no shared memory" in r.getMessage()]
    assert len(said) == 1 and ("shared_memory = false" in said[0] or "MiB free" in said[0]), said


def test_a_killed_servers_segments_are_swept_by_the_next_one(tmp_path):
    if not shm.ROOT.is_dir():
        pytest.skip("no /dev/shm on this system")
    import subprocess
    import sys

    # A process that creates a segment and dies without unlinking it (as kill -9 would leave it).
    code = "from psgrid import shm; s = shm.Segment.create(64); print(s.path.name, flush=True)"
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert (shm.ROOT / name).exists()
    assert shm.sweep() >= 1
    assert not (shm.ROOT / name).exists()


@pytest.mark.skipif(not shm.ROOT.is_dir(), reason="no /dev/shm on this system")
def test_segments_a_worker_cannot_map_are_dropped_at_once(server_factory, monkeypatch):
    """As from a container with its own /dev/shm: the offer's files are not the worker's
    to see; it declines, and the server drops them while the stream goes on."""
    def elsewhere(path, nbytes, nonce):
        raise shm.Unavailable("not this host's /dev/shm")

    monkeypatch.setattr(shm.Segment, "attach", staticmethod(elsewhere))
    server = server_factory()
    rig = make_rig(server.port, spec(num_workers=1, staleness=None))
    train(rig, 3)
    assert rig.ps.stream(rig.workers[0]).shm is None
    assert segments_of(os.getpid()) == []  # the server's own, in this process: gone, stream still open


@pytest.mark.parametrize("address, local", [("127.0.0.1:5", True), ("localhost:5", True),
                                            ("192.0.2.1:5", False), ("no-such-host.invalid:5", False)])
def test_shared_memory_is_only_asked_of_a_server_on_this_host(address, local):
    assert shm.is_local(address) is local
    assert ParameterServerClient(address, shared_memory=True).shared_memory is local


@pytest.mark.skipif(not shm.ROOT.is_dir(), reason="no /dev/shm on this system")
def test_an_async_worker_reads_in_place_and_after_a_torn_read_gets_a_copy(server_factory):
    """An async job's parameters change while a worker reads them: it reads them in place
    all the same, checks its copy, and the pull after a torn read is a copy (then in
    place again)."""
    server = server_factory()
    rig = make_rig(server.port, spec(num_workers=2, staleness=None))
    for worker in (0, 1):
        rig.pull(worker, 0)  # the first pull opens the shared-memory path
    stream = rig.ps.stream(rig.workers[0])
    held = rig.pull(0, 0)
    assert held.intact is not None and held.buffer.data_ptr() == stream.store.data.data_ptr()
    expected = held.buffer.clone()
    assert held.intact()
    rig.push(1, 0, grads(0.1))  # applied at once: the weights change under worker 0's feet
    assert not held.intact() and stream.torn
    copied = rig.pull(0, 0)
    assert copied.intact is None and copied.buffer.data_ptr() == stream.shm[1].data.data_ptr()
    assert not torch.equal(copied.buffer, expected) and not stream.torn
    assert all(torch.equal(v, rig.layout.views(copied.buffer)[k]) for k, v in rig.params().items())
    again = rig.pull(0, 0)
    assert again.intact is not None and again.intact()


@pytest.mark.skipif(not shm.ROOT.is_dir(), reason="no /dev/shm on this system")
def test_a_gradient_written_into_the_push_segment_is_pushed_as_it_is(server_factory):
    """A worker computes its gradient into its stream's push segment (push_segment): the
    push sends only the header, and the server takes the same gradient as from a copy."""
    results = {}
    for in_place in (True, False):
        server = server_factory()
        rig = make_rig(server.port, spec(num_workers=1, staleness=0))
        rig.pull(0, 0)  # opens the shared-memory path
        segment = rig.ps.push_segment(rig.job_id, rig.workers[0])
        assert segment is not None and rig.ps.push_segment("another-job", rig.workers[0]) is None
        for seq in range(3):
            rig.pull(0, seq)
            packed = rig.layout.pack(grads(0.1 * (seq + 1)))
            if in_place:
                segment[: packed.numel()].copy_(packed)  # as backward leaves it there
                packed = segment[: packed.numel()]
            header = push_header(rig.job_id, rig.workers[0], seq, 0, seq, rig.layout)
            assert rig.ps.push(header, packed) == (seq + 1, False)
        results[in_place] = rig.params()
        rig.ps.close()
    assert all(torch.equal(results[True][k], results[False][k]) for k in results[True])
