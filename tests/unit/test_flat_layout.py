"""A job's tensors as one flat tensor (codec.Layout.flat): one op over all of them."""
from __future__ import annotations

import pytest
import torch

from psgrid.codec import Layout
from psgrid.errors import NonFiniteGradient
from psgrid.server.store import GradientAccumulator, check_finite

END_TO_END = Layout.of([("w", torch.float32, (16, 4)), ("b", torch.float32, (16,)), ("v", torch.float32, (2, 8))])


def test_tensors_end_to_end_in_one_dtype_are_one_flat_tensor():
    assert END_TO_END.flat_dtype == torch.float32
    buffer = torch.arange(END_TO_END.total_bytes, dtype=torch.uint8)
    flat = END_TO_END.flat(buffer)
    assert flat.numel() == 16 * 4 + 16 + 16
    assert flat.data_ptr() == END_TO_END.views(buffer)["w"].data_ptr()


def test_mixed_dtypes_or_a_gap_are_not():
    mixed = Layout.of([("w", torch.float32, (16,)), ("h", torch.float16, (16,))])
    gap = Layout.of([("b", torch.float32, (3,)), ("w", torch.float32, (16,))])  # 12 bytes, then aligned to 64
    assert mixed.flat_dtype is None and gap.flat_dtype is None
    assert gap.flat(torch.zeros(gap.total_bytes, dtype=torch.uint8)) is None
    assert Layout.of([]).flat_dtype is None


def test_check_finite_on_the_flat_tensor_still_names_the_tensor_at_fault():
    buffer = torch.zeros(END_TO_END.total_bytes, dtype=torch.uint8)
    views = END_TO_END.views(buffer)
    views["b"][3] = -7.5
    assert check_finite(views, flat=END_TO_END.flat(buffer)) == 7.5
    views["v"][1, 2] = float("nan")
    with pytest.raises(NonFiniteGradient, match="'v'"):
        check_finite(views, flat=END_TO_END.flat(buffer))


def test_the_flat_accumulator_sums_and_averages_as_the_per_tensor_one():
    mixed = Layout.of([(m.name, torch.float32 if m.name != "b" else torch.float64, m.shape)
                       for m in END_TO_END.tensors])  # the same tensors, not one flat tensor
    flat_acc, plain_acc = GradientAccumulator(END_TO_END), GradientAccumulator(mixed)
    assert flat_acc.flat is not None and plain_acc.flat is None
    g = torch.Generator().manual_seed(0)
    for weight in (32, 17, 32):
        buffer = torch.zeros(END_TO_END.total_bytes, dtype=torch.uint8)
        grads = END_TO_END.views(buffer)
        for t in grads.values():
            t.copy_(torch.randn(t.shape, generator=g))
        flat_acc.add(grads, weight, check_finite(grads), END_TO_END.flat(buffer))
        plain_acc.add({n: t.clone() for n, t in grads.items()}, weight, check_finite(grads))
    plain_mean = plain_acc.mean()  # in place: once
    for name, value in flat_acc.mean().items():
        if name != "b":  # float64 sums there
            assert torch.equal(value, plain_mean[name]), name
    flat_acc.reset()
    assert flat_acc.count == 0 and not flat_acc.flat.any()


def test_lazy_views_are_the_views_made_on_first_look():
    buffer = END_TO_END.pack({m.name: torch.randn(m.shape) for m in END_TO_END.tensors})
    lazy = END_TO_END.lazy_views(buffer)
    assert len(lazy) == 3 and lazy._views is None  # not made by counting them
    made = END_TO_END.views(buffer)
    assert list(lazy) == list(made) and all(torch.equal(lazy[n], made[n]) for n in made)
    assert check_finite(lazy) == check_finite(made)
