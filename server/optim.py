"""Server-side optimizers, applied in place to a job's parameters.

Each mirrors torch.optim's single-tensor implementation (same operations in
the same order), so a server step matches ``torch.optim`` on the same inputs.
State tensors live in the parameter's dtype, as in torch.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Mapping

import torch

from psgrid.spec import OptimizerSpec


class Optimizer(abc.ABC):
    """Updates a fixed set of named parameters in place.

    ``step`` MUST apply exactly one update using ``grads`` (same names, shapes
    and dtypes as the parameters) and MUST NOT keep references to ``grads``.
    ``state_tensors`` returns every piece of state a checkpoint must hold.
    """

    def __init__(self, spec: OptimizerSpec, params: Mapping[str, torch.Tensor]):
        self.spec = spec
        self.params = dict(params)
        self.steps = 0

    @abc.abstractmethod
    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Apply one update."""

    @abc.abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Named state tensors (views, not copies)."""


class SGD(Optimizer):
    """torch.optim.SGD: weight decay, momentum with dampening, Nesterov."""

    def __init__(self, spec: OptimizerSpec, params: Mapping[str, torch.Tensor]):
        super().__init__(spec, params)
        self.momentum_buffers: dict[str, torch.Tensor] = {}
        if spec.momentum:
            self.momentum_buffers = {n: torch.zeros_like(p) for n, p in self.params.items()}

    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        s = self.spec
        first = self.steps == 0
        for name, p in self.params.items():
            d_p = grads[name]
            if s.weight_decay:
                d_p = d_p.add(p, alpha=s.weight_decay)
            if s.momentum:
                buf = self.momentum_buffers[name]
                if first:
                    buf.copy_(d_p)
                else:
                    buf.mul_(s.momentum).add_(d_p, alpha=1 - s.dampening)
                d_p = d_p.add(buf, alpha=s.momentum) if s.nesterov else buf
            p.add_(d_p, alpha=-s.lr)
        self.steps += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"momentum_buffer.{n}": b for n, b in self.momentum_buffers.items()}


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay) and, with ``decoupled``, AdamW."""

    def __init__(self, spec: OptimizerSpec, params: Mapping[str, torch.Tensor], decoupled: bool):
        super().__init__(spec, params)
        self.decoupled = decoupled
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}

    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        s = self.spec
        beta1, beta2 = s.betas
        step = self.steps + 1
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = s.lr / bias_correction1
        bias_correction2_sqrt = math.sqrt(bias_correction2)
        for name, p in self.params.items():
            grad = grads[name]
            if s.weight_decay:
                if self.decoupled:
                    p.mul_(1 - s.lr * s.weight_decay)
                else:
                    grad = grad.add(p, alpha=s.weight_decay)
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(s.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
        self.steps = step

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"exp_avg.{n}": t for n, t in self.exp_avg.items()}
        out.update({f"exp_avg_sq.{n}": t for n, t in self.exp_avg_sq.items()})
        return out


def make_optimizer(spec: OptimizerSpec, params: Mapping[str, torch.Tensor]) -> Optimizer:
    """The optimizer ``spec`` names, over ``params`` (updated in place)."""
    if spec.name == "sgd":
        return SGD(spec, params)
    if spec.name in ("adam", "adamw"):
        return Adam(spec, params, decoupled=spec.name == "adamw")
    raise ValueError(f"unknown optimizer {spec.name!r}")
