"""A worker covering a gone worker's rank sends what the two workers together would have sent."""
from __future__ import annotations

import torch

from psgrid.build import build_dataset, build_model
from psgrid.dataset import ShardSampler
from psgrid.spec import JobSpec
from psgrid.worker.step import GradientStep

SPEC = JobSpec(model="psgrid.examples.models:mlp", model_kwargs={"hidden": 32},
               dataset="psgrid.examples.datasets:digits", steps=10, batch_size=32, num_workers=2, seed=3)


def step_for(rank: int, shards: int = 2) -> GradientStep:
    dataset = build_dataset(SPEC)
    sampler = ShardSampler(len(dataset.train_x), rank, 2, SPEC.batch_size, SPEC.seed)
    return GradientStep(build_model(SPEC), dataset, sampler, torch.device("cpu"), shards=shards, world_size=2)


def grads(step: GradientStep) -> list[torch.Tensor]:
    """Copies of what the worker would push to each shard, tensor by tensor."""
    return [v.clone() for layout, buf in zip(step.layouts, step.grad_buffers) for v in layout.views(buf).values()]


def server_mean(pushes: list[tuple[list[torch.Tensor], int]]) -> list[torch.Tensor]:
    """The server's BSP mean: sums weighted by rows, divided by the total (server/store.py)."""
    sums = [torch.zeros_like(g) for g in pushes[0][0]]
    for grads, rows in pushes:
        for acc, g in zip(sums, grads):
            acc.add_(g, alpha=rows)
    total = sum(rows for _, rows in pushes)
    return [acc.div_(total) for acc in sums]


def test_covering_a_rank_gives_the_round_the_fault_free_gradients_bit_for_bit():
    torch.set_num_threads(1)
    both, w0, w1 = step_for(0), step_for(0), step_for(1)
    _, rows = both.run(4, (0, 1))
    covered = server_mean([(grads(both), rows)])
    _, r0 = w0.run(4)
    g0 = grads(w0)
    _, r1 = w1.run(4)
    fault_free = server_mean([(g0, r0), (grads(w1), r1)])
    assert rows == r0 + r1
    assert all(torch.equal(a, b) for a, b in zip(covered, fault_free))


def test_gradients_straight_in_the_push_buffers_are_the_copied_ones(monkeypatch):
    """A small model's backward adds into its push buffers (worker/step.py,
    DIRECT_GRADS_BYTES); a large one's gradients are copied there: the same bytes."""
    import psgrid.worker.step as step_module

    torch.set_num_threads(1)
    for shards in (1, 2):
        direct = step_for(0, shards)
        monkeypatch.setattr(step_module, "DIRECT_GRADS_BYTES", 0)
        copied = step_for(0, shards)
        monkeypatch.undo()
        assert not copied._grad_binds
        if shards == 1:  # (two shards split this model's first weight: no views there)
            assert direct._grad_binds
        for step in (3, 4):
            direct.run(step)
            copied.run(step)
            assert all(torch.equal(a, b) for a, b in zip(grads(direct), grads(copied)))
        # the weights a pull brings are loaded into the model either way
        for step in (direct, copied):
            for shard, (layout, buf) in enumerate(zip(step.layouts, step.weight_buffers)):
                buf.fill_(0)
                step.load(shard, layout, buf)
            assert all(not p.detach().any() for _, p in step.params)


def test_gradients_computed_into_another_buffer_are_the_same_bytes(monkeypatch):
    """A worker with a push segment in shared memory computes its gradients there
    (GradientStep.gradients_into), directly (a small model) or copied: the same bytes as
    in its own buffers, and the old buffer is left alone."""
    import psgrid.worker.step as step_module

    torch.set_num_threads(1)
    for direct_bytes in (step_module.DIRECT_GRADS_BYTES, 0):
        monkeypatch.setattr(step_module, "DIRECT_GRADS_BYTES", direct_bytes)
        own, moved = step_for(0, 1), step_for(0, 1)
        assert bool(moved._grad_binds) is bool(direct_bytes)
        old = moved.grad_buffers[0]
        segment = torch.full((own.layouts[0].total_bytes + 64,), 7, dtype=torch.uint8)
        moved.gradients_into(0, segment[: own.layouts[0].total_bytes])
        assert moved.grad_buffers[0].data_ptr() == segment.data_ptr()
        for step in (3, 4):
            own.run(step)
            moved.run(step)
            assert torch.equal(own.grad_buffers[0], segment[: own.layouts[0].total_bytes])
        assert not old.any() and (segment[own.layouts[0].total_bytes:] == 7).all()
