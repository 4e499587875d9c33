"""Server-side optimizers match torch.optim on the same inputs (to 1e-6)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psgrid.server.optim import make_optimizer
from psgrid.spec import OptimizerSpec

CONFIGS = [
    OptimizerSpec("sgd", lr=0.1),
    OptimizerSpec("sgd", lr=0.05, weight_decay=0.01),
    OptimizerSpec("sgd", lr=0.05, momentum=0.9),
    OptimizerSpec("sgd", lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.001),
    OptimizerSpec("sgd", lr=0.05, momentum=0.9, nesterov=True),
    OptimizerSpec("adam", lr=0.01),
    OptimizerSpec("adam", lr=0.01, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6),
    OptimizerSpec("adamw", lr=0.01),
    OptimizerSpec("adamw", lr=0.003, weight_decay=0.1, betas=(0.85, 0.95)),
]


def reference(spec: OptimizerSpec, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, dampening=spec.dampening,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def run_both(spec: OptimizerSpec, shapes, steps: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    init = {f"p{i}": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shapes)}
    grads = [{n: torch.randn(t.shape, generator=g, dtype=dtype) for n, t in init.items()} for _ in range(steps)]
    ours = {n: t.clone() for n, t in init.items()}
    opt = make_optimizer(spec, ours)
    theirs = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    ref = reference(spec, list(theirs.values()))
    for step_grads in grads:
        opt.step(step_grads)
        for n, p in theirs.items():
            p.grad = step_grads[n].clone()
        ref.step()
    return ours, {n: p.detach() for n, p in theirs.items()}


@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: f"{s.name}-m{s.momentum}-n{s.nesterov}-wd{s.weight_decay}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_optim(spec, dtype):
    ours, theirs = run_both(spec, [(5, 3), (7,), ()], steps=25, seed=1, dtype=dtype)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    spec=st.sampled_from(CONFIGS),
    lr=st.floats(1e-4, 0.5),
    shapes=st.lists(st.lists(st.integers(1, 6), max_size=3).map(tuple), min_size=1, max_size=3),
    steps=st.integers(1, 12),
    seed=st.integers(0, 1000),
)
def test_matches_torch_optim_property(spec, lr, shapes, steps, seed):
    import dataclasses

    spec = dataclasses.replace(spec, lr=lr)
    ours, theirs = run_both(spec, shapes, steps, seed)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=1e-6)


def test_updates_are_in_place():
    p = torch.zeros(3)
    opt = make_optimizer(OptimizerSpec("sgd", lr=1.0), {"p": p})
    opt.step({"p": torch.ones(3)})
    assert p.tolist() == [-1.0, -1.0, -1.0]


def _end_to_end(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The tensors copied into one flat tensor, and views of it (as a job's store lays them out)."""
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    views, start = {}, 0
    for name, t in tensors.items():
        views[name] = flat[start: start + t.numel()].view(t.shape)
        start += t.numel()
    return flat, views


@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: f"{s.name}-m{s.momentum}-n{s.nesterov}-wd{s.weight_decay}")
def test_one_flat_update_is_bit_for_bit_the_per_tensor_one(spec):
    """Parameters lying end to end in one tensor are updated by one op per step of the
    rule instead of one per tensor: the same values, to the bit, state included."""
    g = torch.Generator().manual_seed(3)
    init = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate([(5, 3), (7,), (), (4, 4)])}
    per_tensor = {n: t.clone() for n, t in init.items()}
    flat, views = _end_to_end(init)
    plain, fused = make_optimizer(spec, per_tensor), make_optimizer(spec, views, flat)
    for _ in range(12):
        grads = {n: torch.randn(t.shape, generator=g) for n, t in init.items()}
        grad_flat, grad_views = _end_to_end(grads)
        plain.step(grads)
        fused.step(grad_views, grad_flat)
    for n in init:
        assert torch.equal(per_tensor[n], views[n]), n
    for (n, a), (_, b) in zip(plain.state_tensors().items(), fused.state_tensors().items()):
        assert torch.equal(a, b), n
