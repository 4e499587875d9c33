"""Compressed pushes and 16-bit pulls through a real server: the frames say what they
carry, the server decodes at its accept point, and refuses what does not match the job."""
from __future__ import annotations

import grpc
import pytest
import torch

from psgrid.compression import decode, encode, wire_layout
from psgrid.errors import InvalidArgument
from psgrid.spec import Encoding
from psgrid.worker.ps_client import push_header

from helpers.inproc import make_rig, spec


def grads(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}


def encoded(rig, enc: Encoding, named: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The payload of ``named`` encoded as ``enc``, and what the server will read from it."""
    wire = torch.zeros(wire_layout(rig.layout, enc).total_bytes, dtype=torch.uint8)
    payload = encode(rig.layout, enc, named, wire)
    out = torch.zeros(rig.layout.total_bytes, dtype=torch.uint8)
    decode(rig.layout, enc, payload, out)
    return payload, rig.layout.views(out)


def push(rig, seq: int, enc: Encoding, payload: torch.Tensor):
    header = push_header(rig.job_id, rig.workers[0], seq, 0, seq, rig.layout, encoding=enc,
                         payload_bytes=payload.numel())
    return rig.ps.push(header, payload)


@pytest.mark.parametrize("compression", ["fp16", "int8", "topk:0.25"])
def test_the_server_applies_what_the_worker_encoded(server, compression):
    enc = Encoding.parse(compression)
    rig = make_rig(server.port, spec(num_workers=1, staleness=0, compression=compression))
    before = rig.params()
    rig.pull(0, 0)  # opens shared memory: the second push goes through it
    for seq in range(2):
        payload, read = encoded(rig, enc, grads(seq))
        assert push(rig, seq, enc, payload) == (seq + 1, False)
        for name in before:  # SGD lr 0.5 on what the server read
            before[name] = before[name] - 0.5 * read[name]
        rig.pull(0, seq + 1)
    after = rig.params()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6)
    info = rig.jobs.get(rig.job_id)
    assert info.pushes == 2 and info.bytes_pushed == 2 * payload.numel()
    assert info.dense_bytes_pushed == 2 * rig.layout.total_bytes


def test_a_push_in_another_encoding_than_the_jobs_is_refused_and_changes_nothing(server):
    rig = make_rig(server.port, spec(num_workers=1, staleness=0, compression="fp16"))
    before = rig.params()
    with pytest.raises(InvalidArgument, match="fp16") as info:
        rig.push(0, 0, grads())  # a plain float32 push
    assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    payload, _ = encoded(rig, Encoding("int8"), grads())
    with pytest.raises(InvalidArgument, match="fp16"):
        push(rig, 0, Encoding("int8"), payload)
    payload, _ = encoded(rig, Encoding("fp16"), grads())
    with pytest.raises(InvalidArgument, match="payload_bytes"):
        header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout, encoding=Encoding("fp16"),
                             payload_bytes=payload.numel() - 8)
        rig.ps.push(header, payload[:-8])
    assert rig.version() == 0 and all(torch.equal(rig.params()[k], before[k]) for k in before)
    assert push(rig, 0, Encoding("fp16"), payload) == (1, False)  # the stream went on


def test_repeated_topk_indices_are_refused_and_change_nothing(server):
    enc = Encoding("topk", 0.5)
    rig = make_rig(server.port, spec(num_workers=1, staleness=0, compression=str(enc)))
    before = rig.params()
    payload, _ = encoded(rig, enc, grads())
    wire_layout(rig.layout, enc).views(payload)["w#index"][1] = wire_layout(rig.layout, enc).views(payload)["w#index"][0]
    with pytest.raises(InvalidArgument, match="unique"):
        push(rig, 0, enc, payload)
    assert rig.version() == 0 and all(torch.equal(rig.params()[k], before[k]) for k in before)


def test_pulls_in_16_bits_and_the_master_copy_stays_full_precision(server):
    rig = make_rig(server.port, spec(num_workers=1, staleness=0, pull_dtype="bf16"))
    master = rig.params()
    pulled = rig.pull(0, 0)
    assert {m.dtype for m in pulled.layout.tensors} == {torch.bfloat16}
    for name, view in pulled.layout.views(pulled.buffer).items():
        assert torch.equal(view, master[name].to(torch.bfloat16))
    assert rig.params()["w"].dtype == torch.float32  # what a client fetches: the full-precision copy
    info = rig.jobs.get(rig.job_id)
    assert info.pulls == 1 and info.bytes_pulled == pulled.layout.total_bytes


def test_scale_stale_scales_a_late_push_by_its_staleness(server):
    rig = make_rig(server.port, spec(num_workers=1, staleness=None, scale_stale=True))
    before = rig.params()
    g = {"w": torch.ones(4, 3), "b": torch.ones(4)}
    rig.push(0, 0, g, base_step=0)  # fresh: as it is
    rig.push(0, 1, g, base_step=0)  # one step stale: halved
    after = rig.params()
    for name in before:  # SGD lr 0.5
        torch.testing.assert_close(after[name], before[name] - 0.5 * 1.5, rtol=0, atol=1e-6)
