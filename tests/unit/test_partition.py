"""Partitioning parameters over shards: balanced by bytes, every row exactly once."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psgrid.codec import Layout
from psgrid.partition import covers, gather, partition, piece_view


def test_one_shard_holds_everything_whole():
    layout = Layout.of([("w", torch.float32, (10, 4)), ("b", torch.float32, (10,))])
    part = partition(layout, 1)
    assert [p.name for p in part.pieces[0]] == ["w", "b"]
    assert part.layouts[0].names == ["w", "b"]


def test_a_big_tensor_is_split_by_rows_and_shares_are_balanced():
    layout = Layout.of([("big", torch.float32, (1000, 256)), ("small", torch.float32, (256,))])
    part = partition(layout, 4)
    assert covers(part, layout)
    sizes = part.nbytes()
    assert max(sizes) - min(sizes) <= 256 * 4 + 1024  # within about a row and the small tensor
    assert all(any(p.tensor == "big" for p in pieces) for pieces in part.pieces)
    assert any(p.name.startswith("big#") for p in part.pieces[1])


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6),
       shards=st.integers(1, 5))
def test_every_row_once_and_gather_rebuilds_the_tensors(shapes, shards):
    full = {f"t{i}": torch.randn(s) for i, s in enumerate(shapes)}
    layout = Layout.of_tensors(full.items())
    part = partition(layout, shards)
    assert covers(part, layout)
    shard_tensors = [{p.name: piece_view(full[p.tensor], p).clone() for p in pieces} for pieces in part.pieces]
    for tensors, shard_layout in zip(shard_tensors, part.layouts):
        assert shard_layout.names == list(tensors)
        for m in shard_layout.tensors:
            assert tuple(tensors[m.name].shape) == m.shape
    rebuilt = {k: torch.zeros_like(v) for k, v in full.items()}
    gather(part, shard_tensors, rebuilt)
    assert all(torch.equal(rebuilt[k], full[k]) for k in full)


def test_partition_is_deterministic():
    layout = Layout.of([(f"l{i}", torch.float32, (37 * i + 1, 9)) for i in range(8)])
    assert partition(layout, 3) == partition(layout, 3)


def test_assemble_puts_whole_tensors_back_from_piece_names():
    from psgrid.partition import assemble

    full = {"enc.weight": torch.randn(50, 8), "enc.bias": torch.randn(50), "head": torch.randn(3, 50)}
    layout = Layout.of_tensors(full.items())
    part = partition(layout, 3)
    shards = [{p.name: piece_view(full[p.tensor], p).clone() for p in pieces} for pieces in part.pieces]
    rebuilt = assemble(shards)
    assert set(rebuilt) == set(full) and all(torch.equal(rebuilt[k], full[k]) for k in full)


def test_bsp_pulls_from_shards_at_different_steps_are_told_apart():
    from psgrid.codec import Pulled
    from psgrid.spec import JobState
    from psgrid.worker.shards import diverged

    layout = Layout.of([("w", torch.float32, (2,))])
    at = lambda step: Pulled(JobState.RUNNING, step, step, layout, torch.zeros(64, dtype=torch.uint8))  # noqa: E731
    assert not diverged([at(5), at(5)], synchronous=True)
    assert not diverged([at(5), at(3)], synchronous=False)  # SSP/async shards drift by design
    assert diverged([at(5), at(3)], synchronous=True)
