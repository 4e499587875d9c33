"""One job's parameters: a flat byte buffer, typed views into it, and the optimizer.

The payload layout on the wire and in memory is the same (:class:`Layout`), so
a pull streams slices of ``flat`` and needs no packing step.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from psgrid.codec import Layout
from psgrid.errors import DtypeMismatch, NonFiniteGradient
from psgrid.server.optim import make_optimizer
from psgrid.spec import OptimizerSpec

TRAINABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_finite(tensors: Mapping[str, torch.Tensor], what: str = "gradient") -> None:
    """Raise NonFiniteGradient naming the first tensor that holds NaN or Inf."""
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        # A sum is NaN/Inf whenever an element is, and runs ~25x faster than
        # isfinite().all(); only a suspicious sum (NaN/Inf, or an overflow of
        # large finite values) pays for the exact element-wise check.
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise NonFiniteGradient(f"{what} {name!r} holds NaN or Inf")


class ParameterStore:
    """Parameters of one job, their version and their optimizer state."""

    def __init__(self, layout: Layout, initial: torch.Tensor, optimizer: OptimizerSpec):
        for m in layout.tensors:
            if m.dtype not in TRAINABLE_DTYPES:
                raise DtypeMismatch(f"parameter {m.name!r} has non-trainable dtype {m.dtype}")
        self.layout = layout
        self.flat = initial
        self.params = layout.views(self.flat)
        check_finite(self.params, what="initial parameter")
        self.optimizer = make_optimizer(optimizer, self.params)
        self.version = 0

    @property
    def nbytes(self) -> int:
        return self.layout.total_bytes

    def apply(self, grads: Mapping[str, torch.Tensor]) -> None:
        """One optimizer step with ``grads`` (cast to each parameter's dtype)."""
        cast = {n: grads[n].to(p.dtype) for n, p in self.params.items()}
        self.optimizer.step(cast)
        self.version += 1

    def snapshot_into(self, out: torch.Tensor | None) -> torch.Tensor:
        """Copy the payload into ``out`` (reused when large enough); return it."""
        if out is None or out.numel() < self.flat.numel():
            out = torch.empty_like(self.flat)
        out[: self.flat.numel()].copy_(self.flat)
        return out


class GradientAccumulator:
    """Sums BSP gradients in float32 (float64 for float64 parameters)."""

    def __init__(self, layout: Layout):
        self.sums = {
            m.name: torch.zeros(m.shape, dtype=torch.float64 if m.dtype == torch.float64 else torch.float32)
            for m in layout.tensors
        }
        self.count = 0
        self.weight = 0

    def add(self, grads: Mapping[str, torch.Tensor], weight: int = 1) -> None:
        """Add a gradient averaged over ``weight`` examples."""
        for name, acc in self.sums.items():
            acc.add_(grads[name], alpha=weight)
        self.count += 1
        self.weight += weight

    def mean(self) -> dict[str, torch.Tensor]:
        """The example-weighted mean, computed in place; equal weights give the plain mean."""
        for acc in self.sums.values():
            acc.div_(self.weight)
        return self.sums

    def reset(self) -> None:
        for acc in self.sums.values():
            acc.zero_()
        self.count = 0
        self.weight = 0
