"""What a push's payload carries when a job compresses it, and how it is read back.

A job's ``compression`` (:class:`psgrid.spec.Encoding`) says how every worker encodes what it
pushes (a gradient, or a model delta under local SGD): ``none`` (the tensors'
own bytes), ``fp16``/``bf16`` (each value in 16 bits), ``int8`` (blocks of
``INT8_BLOCK`` values, each block one float32 scale and one int8 a value) or
``topk:RATIO`` (per tensor the ``ceil(RATIO x numel)`` values largest in
magnitude, as int32 indices and float32 values). Pure torch, no gRPC.

An encoded payload is laid out like any tensor set (:class:`psgrid.codec.Layout`:
named sections at 64-byte aligned offsets), by :func:`wire_layout` from the
job's layout and the encoding alone, so both ends know its exact size before a
byte arrives. The server decodes it to the parameters' dtype at its accept
point (:func:`decode`, which checks what a hostile sender could get wrong:
scales finite and >= 0, indices in range and unique), and from there on a
compressed push is a push like any other.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from psgrid.codec import Layout
from psgrid.errors import InvalidArgument
from psgrid.spec import Encoding

#: Values per int8 block: each block has its own float32 scale (1.6 % overhead).
INT8_BLOCK = 256
_FP16_MAX = torch.finfo(torch.float16).max
#: JobSpec.pull_dtype -> the dtype training pulls are sent in.
PULL_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def topk_count(numel: int, ratio: float) -> int:
    """Values top-k sends of a tensor of ``numel``: at least one of a non-empty tensor."""
    return min(numel, max(1, math.ceil(ratio * numel))) if numel else 0


@functools.lru_cache(maxsize=64)
def wire_layout(layout: Layout, encoding: Encoding) -> Layout:
    """How a payload of ``layout``'s tensors, encoded as ``encoding``, is laid out."""
    kind = encoding.kind
    if kind == "none":
        return layout
    sections: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for m in layout.tensors:
        if kind in ("fp16", "bf16"):
            sections.append((m.name, torch.float16 if kind == "fp16" else torch.bfloat16, m.shape))
        elif kind == "int8":
            sections.append((m.name + "#scale", torch.float32, (math.ceil(m.numel / INT8_BLOCK),)))
            sections.append((m.name, torch.int8, (m.numel,)))
        else:
            k = topk_count(m.numel, encoding.ratio)
            sections.append((m.name + "#index", torch.int32, (k,)))
            sections.append((m.name + "#value", torch.float32, (k,)))
    return Layout.of(sections)


@functools.lru_cache(maxsize=64)
def cast_layout(layout: Layout, dtype: torch.dtype) -> Layout:
    """``layout`` with every floating tensor in ``dtype`` (a pull sent in 16 bits)."""
    return Layout.of((m.name, dtype if m.dtype.is_floating_point else m.dtype, m.shape) for m in layout.tensors)


# --- encoding (the worker) -------------------------------------------------------


@torch.no_grad()
def encode(layout: Layout, encoding: Encoding, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Encode ``tensors`` (laid out as ``layout``) into ``out``, a uint8 buffer of at least
    ``wire_layout(layout, encoding).total_bytes``; return the payload (a slice of ``out``)."""
    wire = wire_layout(layout, encoding)
    views = wire.views(out)
    for m in layout.tensors:
        x = tensors[m.name].reshape(-1)
        if encoding.kind in ("fp16", "bf16"):
            target = views[m.name].view(-1)
            target.copy_(x.clamp(-_FP16_MAX, _FP16_MAX) if encoding.kind == "fp16" else x)
        elif encoding.kind == "int8":
            _encode_int8(x, views[m.name + "#scale"], views[m.name])
        elif encoding.kind == "topk":
            k = views[m.name + "#index"].numel()
            if k:
                idx = _topk_indices(x.abs(), k)
                views[m.name + "#index"].copy_(idx)
                views[m.name + "#value"].copy_(x[idx])
        else:
            views[m.name].copy_(tensors[m.name])
    return out[: wire.total_bytes]


#: Tensors larger than this find their top k among the values over a threshold taken from a sample.
TOPK_SAMPLE_FROM = 1 << 20
_TOPK_SAMPLE = 1 << 16


def _topk_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest of ``magnitude``: exactly torch.topk's set, found among the
    values over a threshold from a strided sample (about 2k of them) when the tensor is large,
    so that the full-size selection runs on a few thousandths of the values."""
    n = magnitude.numel()
    if n > TOPK_SAMPLE_FROM and 4 * k < n:
        sample = magnitude[:: n // _TOPK_SAMPLE]
        want = min(sample.numel(), math.ceil(2 * k * sample.numel() / n) + 1)
        threshold = torch.topk(sample, want, sorted=False).values.min()
        candidates = torch.nonzero(magnitude >= threshold).view(-1)
        if candidates.numel() >= k:  # every value outside them is below every one inside
            return candidates[torch.topk(magnitude[candidates], k, sorted=False).indices]
    return torch.topk(magnitude, k, sorted=False).indices


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole INT8_BLOCK blocks of a flat tensor as rows, and the rest."""
    whole = x.numel() // INT8_BLOCK * INT8_BLOCK
    return x[:whole].view(-1, INT8_BLOCK), x[whole:].view(1, -1)


def _encode_int8(x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor) -> None:
    rows, rest = _blocks(x)
    qrows, qrest = _blocks(q)
    for part, qpart, scale in ((rows, qrows, scales[: rows.shape[0]]), (rest, qrest, scales[rows.shape[0]:])):
        if not part.numel():
            continue
        peak = part.abs().amax(dim=1, keepdim=True).float()
        step = peak / 127
        scale.copy_(step.view(-1))
        qpart.copy_((part.float() / step.clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(-127, 127))


# --- decoding (the server, and the worker's error feedback) ------------------------


@torch.no_grad()
def decode(layout: Layout, encoding: Encoding, payload: torch.Tensor, out: torch.Tensor,
           check: bool = True) -> None:
    """Decode an encoded ``payload`` into ``out`` (a uint8 buffer laid out as ``layout``).

    ``check`` (a payload from the network): InvalidArgument for int8 scales that are
    negative or not finite, or top-k indices out of range or repeated; values that
    decode to NaN or Inf are left for the caller's finiteness check.
    """
    wire = wire_layout(layout, encoding)
    views, targets = wire.views(payload), layout.views(out)
    for m in layout.tensors:
        target = targets[m.name].view(-1)
        if encoding.kind in ("fp16", "bf16", "none"):
            target.copy_(views[m.name].view(-1))
        elif encoding.kind == "int8":
            scales = views[m.name + "#scale"]
            if check and scales.numel() and not (bool(torch.isfinite(scales).all()) and scales.min().item() >= 0):
                raise InvalidArgument(f"int8 scales of {m.name!r} must be finite and >= 0")
            _decode_int8(scales, views[m.name], target)
        else:
            idx, values = views[m.name + "#index"], views[m.name + "#value"]
            if check and idx.numel():
                if idx.min().item() < 0 or idx.max().item() >= m.numel:
                    raise InvalidArgument(f"top-k indices of {m.name!r} must lie in [0, {m.numel})")
                if torch.unique(idx).numel() != idx.numel():
                    raise InvalidArgument(f"top-k indices of {m.name!r} must be unique")
            target.zero_()
            target.index_copy_(0, idx.long(), values.to(target.dtype))


def _decode_int8(scales: torch.Tensor, q: torch.Tensor, target: torch.Tensor) -> None:
    rows, rest = _blocks(target)
    qrows, qrest = _blocks(q)
    n = rows.shape[0]
    if rows.numel():
        rows.copy_(qrows.float() * scales[:n].view(-1, 1))
    if rest.numel():
        rest.copy_(qrest.float() * scales[n:].view(-1, 1))
