"""Push compression: the encodings' sizes and errors, the checks a hostile payload meets,
error feedback, and local SGD's round state."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psgrid.codec import Layout
from psgrid.compression import INT8_BLOCK, decode, encode, topk_count, wire_layout
from psgrid.errors import InvalidArgument, InvalidSpec
from psgrid.spec import Encoding
from psgrid.worker.compress import PushEncoder

ENCODINGS = [Encoding("fp16"), Encoding("bf16"), Encoding("int8"), Encoding("topk", 0.1)]


def tensors(seed: int = 0, shapes=((33, 17), (5,), (1000,))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}


def roundtrip(named: dict[str, torch.Tensor], enc: Encoding) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    layout = Layout.of_tensors(named.items())
    wire = torch.zeros(wire_layout(layout, enc).total_bytes, dtype=torch.uint8)
    payload = encode(layout, enc, named, wire)
    out = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    decode(layout, enc, payload, out)
    return layout.views(out), payload


def test_parse_and_print():
    assert Encoding.parse("topk:0.01") == Encoding("topk", 0.01) and str(Encoding("topk", 0.01)) == "topk:0.01"
    assert Encoding.parse("") == Encoding() and not Encoding.parse("none").lossy
    for bad in ("zip", "topk", "topk:0", "topk:0.9", "topk:nan", "fp16:2", "int4"):
        with pytest.raises(InvalidSpec):
            Encoding.parse(bad)


@pytest.mark.parametrize("enc", ENCODINGS, ids=str)
def test_each_encoding_is_smaller_and_close(enc):
    named = tensors()
    decoded, payload = roundtrip(named, enc)
    dense = sum(t.numel() * 4 for t in named.values())
    assert payload.numel() < dense
    for name, t in named.items():
        if enc.kind == "topk":
            k = topk_count(t.numel(), enc.ratio)
            kept = decoded[name].reshape(-1) != 0
            assert kept.sum() == k  # the k largest, exactly
            assert torch.equal(decoded[name].reshape(-1)[kept], t.reshape(-1)[kept])
            assert t.reshape(-1)[~kept].abs().max() <= t.reshape(-1)[kept].abs().min()
        else:
            tol = {"fp16": 1e-3, "bf16": 8e-3, "int8": 1 / 127}[enc.kind] * t.abs().max()
            assert (decoded[name] - t).abs().max() <= tol


def test_sizes():
    layout = Layout.of([("w", torch.float32, (1000, 1000))])
    assert wire_layout(layout, Encoding("fp16")).total_bytes == 2_000_000
    int8 = wire_layout(layout, Encoding("int8")).total_bytes  # values, a scale per block, alignment
    assert 1_000_000 + 4 * math.ceil(1e6 / INT8_BLOCK) <= int8 < 1_000_000 + 4 * math.ceil(1e6 / INT8_BLOCK) + 128
    assert wire_layout(layout, Encoding("topk", 0.01)).total_bytes == 8 * 10_000


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 700), min_size=1, max_size=4), st.sampled_from(ENCODINGS), st.integers(0, 2**31))
def test_any_shapes_roundtrip_to_their_own_dtype(sizes, enc, seed):
    named = tensors(seed, [(n,) for n in sizes])
    decoded, _ = roundtrip(named, enc)
    for name, t in named.items():
        assert decoded[name].shape == t.shape and bool(torch.isfinite(decoded[name]).all())


def test_fp16_clamps_instead_of_overflowing():
    decoded, _ = roundtrip({"w": torch.tensor([1e6, -1e6, 1.0])}, Encoding("fp16"))
    assert bool(torch.isfinite(decoded["w"]).all())


def _corrupt(enc: Encoding, section: str, value) -> torch.Tensor:
    named = {"w": torch.randn(600)}
    layout = Layout.of_tensors(named.items())
    wire = torch.zeros(wire_layout(layout, enc).total_bytes, dtype=torch.uint8)
    encode(layout, enc, named, wire)
    wire_layout(layout, enc).views(wire)[section][0] = value
    return layout, wire


@pytest.mark.parametrize("enc, section, value, message", [
    (Encoding("int8"), "w#scale", -1.0, "finite and >= 0"),
    (Encoding("int8"), "w#scale", float("nan"), "finite and >= 0"),
    (Encoding("topk", 0.1), "w#index", 600, "in \\[0, 600\\)"),
    (Encoding("topk", 0.1), "w#index", -1, "in \\[0, 600\\)"),
])
def test_hostile_payloads_are_refused(enc, section, value, message):
    layout, wire = _corrupt(enc, section, value)
    with pytest.raises(InvalidArgument, match=message):
        decode(layout, enc, wire, torch.zeros(layout.total_bytes, dtype=torch.uint8))


def test_repeated_topk_indices_are_refused():
    enc = Encoding("topk", 0.1)
    layout, wire = _corrupt(enc, "w#index", 0)
    idx = wire_layout(layout, enc).views(wire)["w#index"]
    idx[1] = idx[0]
    with pytest.raises(InvalidArgument, match="unique"):
        decode(layout, enc, wire, torch.zeros(layout.total_bytes, dtype=torch.uint8))


@pytest.mark.parametrize("enc", ENCODINGS, ids=str)
def test_error_feedback_loses_nothing_for_good(enc):
    """Over many pushes, what the server read plus the residual is what was meant, exactly
    up to float rounding: the encoding delays values, never drops them."""
    layout = Layout.of([("w", torch.float64, (300,))])
    encoder = PushEncoder((layout,), enc)
    meant = torch.zeros(300, dtype=torch.float64)
    read = torch.zeros(300, dtype=torch.float64)
    out = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        grad = torch.randn(300, generator=g, dtype=torch.float64)
        meant += grad
        dense = layout.pack({"w": grad})
        decode(layout, enc, encoder.encode(0, dense), out)
        read += layout.views(out)["w"]
    residual = layout.views(encoder._residual[0])["w"]
    torch.testing.assert_close(read + residual, meant, rtol=0, atol=1e-9)


def test_a_step_computed_again_does_not_count_its_residual_twice():
    layout = Layout.of([("w", torch.float32, (100,))])
    encoder = PushEncoder((layout,), Encoding("topk", 0.05))
    grad = layout.pack({"w": torch.randn(100)})
    encoder.save()
    encoder.encode(0, grad.clone())
    first = encoder._residual[0].clone()
    encoder.restore()  # the push was refused: the same step again
    encoder.encode(0, grad.clone())
    assert torch.equal(encoder._residual[0], first)
    encoder.reset()
    assert not encoder._residual[0].any()


def test_without_error_feedback_there_is_no_residual():
    layout = Layout.of([("w", torch.float32, (100,))])
    encoder = PushEncoder((layout,), Encoding("topk", 0.05), error_feedback=False)
    encoder.encode(0, layout.pack({"w": torch.randn(100)}))
    assert encoder._residual == []
