"""Tensor codec: layouts, frames and payloads round-trip bit-exactly."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psgrid import codec, messages
from psgrid.codec import ALIGN, Layout, PayloadAssembler
from psgrid.errors import DtypeMismatch, MalformedPayload, PayloadTooLarge, ShapeMismatch
from psgrid.v1 import parameter_server_pb2 as ps
from psgrid.v1 import tensor_pb2


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return raw.remainder(2).bool().view(shape)
    return raw.view(dtype).view(shape)


def roundtrip(named: dict[str, torch.Tensor], chunk_bytes: int) -> dict[str, torch.Tensor]:
    """Encode as a pull stream, decode it, return the tensors."""
    layout = Layout.of_tensors(named.items())
    payload = layout.pack(named)
    frames = list(codec.encode_pull(codec.JobState.RUNNING, 7, 3, layout, payload))
    assert all(len(f) <= chunk_bytes + 16 or i == 0 for i, f in enumerate(frames))
    pulled = codec.decode_pull(iter(frames), lambda n: torch.empty(n, dtype=torch.uint8))
    assert (pulled.version, pulled.step) == (7, 3)
    return pulled.layout.views(pulled.buffer)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    tensors=st.lists(st.tuples(st.sampled_from(codec.SUPPORTED_DTYPES), shapes, st.integers(0, 2**31)),
                     min_size=0, max_size=6),
)
def test_any_dtypes_and_shapes_roundtrip_bit_exactly(tensors):
    named = {f"t{i}": random_tensor(d, s, seed) for i, (d, s, seed) in enumerate(tensors)}
    out = roundtrip(named, codec.CHUNK_BYTES)
    assert list(out) == list(named)
    for name, t in named.items():
        assert_bit_equal(out[name], t)


@pytest.mark.parametrize("dtype", codec.SUPPORTED_DTYPES)
def test_special_values_survive(dtype):
    if dtype.is_floating_point:
        t = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, 65504.0]).to(dtype)
    elif dtype == torch.bool:
        t = torch.tensor([True, False])
    else:
        info = torch.iinfo(dtype)
        t = torch.tensor([info.min, info.max, 0, 1], dtype=dtype)
    assert_bit_equal(roundtrip({"x": t}, codec.CHUNK_BYTES)["x"], t)


@pytest.mark.parametrize("numel", [0, 1, 16 * 2**20 + 3])  # the last is ~64 MiB of float32
def test_sizes_zero_one_and_64_mib(numel):
    t = random_tensor(torch.float32, (numel,), seed=numel)
    out = roundtrip({"big": t, "tail": torch.arange(5, dtype=torch.int64)}, codec.CHUNK_BYTES)
    assert_bit_equal(out["big"], t)
    assert out["tail"].tolist() == [0, 1, 2, 3, 4]


def test_layout_offsets_are_aligned_and_dense():
    layout = Layout.of([("a", torch.float16, (3,)), ("b", torch.float64, (2, 2)), ("c", torch.bool, ())])
    assert [m.offset for m in layout.tensors] == [0, ALIGN, 2 * ALIGN]
    assert layout.total_bytes == 3 * ALIGN


def test_chunk_frames_are_valid_protobuf():
    payload = torch.arange(1000, dtype=torch.uint8)
    frames = list(codec.chunk_frames(payload, chunk_bytes=300))
    assert len(frames) == 4
    joined = b"".join(ps.PushRequest.FromString(f).chunk for f in frames)
    assert joined == bytes(payload.numpy())
    # and protobuf's own encoding is recognised by the fast path
    generic = ps.PullResponse(chunk=b"xyz" * 1000).SerializeToString()
    assert bytes(codec.chunk_payload(generic)) == b"xyz" * 1000


def test_header_frame_is_not_mistaken_for_a_chunk():
    header = ps.PushRequest(header=ps.PushHeader(job_id="j")).SerializeToString()
    assert codec.chunk_payload(header) is None


def _header(**spec) -> tensor_pb2.TensorSetHeader:
    base = dict(name="w", dtype=codec.PROTO_BY_TORCH[torch.float32], shape=[2, 3], offset=0, nbytes=24)
    base.update(spec)
    return tensor_pb2.TensorSetHeader(tensors=[tensor_pb2.TensorSpec(**base)], total_bytes=64)


def test_header_validation():
    assert codec.layout_from_proto(_header(), max_bytes=1 << 20).tensors[0].shape == (2, 3)
    with pytest.raises(MalformedPayload):
        codec.layout_from_proto(_header(nbytes=20), max_bytes=1 << 20)
    with pytest.raises(DtypeMismatch):
        codec.layout_from_proto(_header(dtype=99), max_bytes=1 << 20)
    with pytest.raises(MalformedPayload):
        codec.layout_from_proto(_header(shape=[-1, 3]), max_bytes=1 << 20)
    with pytest.raises(PayloadTooLarge):
        codec.layout_from_proto(_header(shape=[1 << 40], nbytes=4 << 40), max_bytes=1 << 20)


def test_assembler_rejects_short_and_long_payloads():
    layout = Layout.of([("w", torch.float32, (4,))])
    buf = torch.empty(layout.total_bytes, dtype=torch.uint8)
    asm = PayloadAssembler(layout, buf)
    asm.feed(b"\0" * 16)
    with pytest.raises(MalformedPayload):
        asm.finish()
    with pytest.raises(MalformedPayload):
        asm.feed(b"\0" * layout.total_bytes)


def test_check_matches_names_the_difference():
    a = Layout.of([("w", torch.float32, (2, 2))])
    with pytest.raises(ShapeMismatch, match="shape"):
        a.check_matches(Layout.of([("w", torch.float32, (4,))]))
    with pytest.raises(DtypeMismatch):
        a.check_matches(Layout.of([("w", torch.float64, (2, 2))]))
    with pytest.raises(ShapeMismatch):
        a.check_matches(Layout.of([("v", torch.float32, (2, 2))]))


def test_job_spec_roundtrip():
    from psgrid.spec import JobSpec, OptimizerSpec

    spec = JobSpec(model="m.n:f", dataset="d.e:g", model_kwargs={"h": 64, "x": [1, 2.5]},
                   optimizer=OptimizerSpec("adamw", lr=0.1, weight_decay=0.01, betas=(0.8, 0.99)),
                   steps=10, staleness=None, num_workers=3, seed=2**40)
    assert messages.spec_from_proto(messages.spec_to_proto(spec)) == spec
    assert messages.spec_from_proto(messages.spec_to_proto(spec.replace(staleness=0))).staleness == 0
