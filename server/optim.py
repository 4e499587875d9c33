"""Server-side optimizers, applied in place to a job's parameters.

Each mirrors torch.optim's single-tensor implementation (same operations in
the same order), so a server step matches ``torch.optim`` on the same inputs.
State tensors live in the parameter's dtype, as in torch.

Each also bounds its own step (:meth:`Optimizer.predict`): from the largest
magnitudes in the parameters, the state and the gradient it tells how large
any value of the step can get, so that the store checks the result of a step
exactly only when it might leave the dtype's range.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping

import torch

from psgrid.spec import OptimizerSpec

#: Bounds on the largest magnitude in the parameters ("param") and in each group of state tensors.
Bounds = dict[str, float]


def magnitude(tensors: Iterable[torch.Tensor]) -> float:
    """The largest |value| in ``tensors`` (NaN when one holds NaN, inf when one holds Inf)."""
    peak = 0.0
    for t in tensors:
        if t.numel():
            lo, hi = t.aminmax()  # one pass, like a sum; NaN propagates
            lo, hi = float(lo), float(hi)
            if math.isnan(lo) or math.isnan(hi):
                return math.nan
            peak = max(peak, -lo, hi)
    return peak


class Optimizer(abc.ABC):
    """Updates a fixed set of named parameters in place.

    ``step`` MUST apply exactly one update using ``grads`` (same names, shapes
    and dtypes as the parameters) and MUST NOT keep references to ``grads``.
    ``state_tensors`` returns every piece of state a checkpoint must hold.
    ``predict`` MUST over-estimate, never under: the store skips its exact check
    of a step whose predicted peak is far below the dtype's largest value.
    """

    def __init__(self, spec: OptimizerSpec, params: Mapping[str, torch.Tensor], flat: torch.Tensor | None = None):
        self.spec = spec
        self.params = dict(params)
        #: The parameters as one flat tensor they are all views of (None: they are not).
        self.flat = flat
        self.steps = 0

    @abc.abstractmethod
    def step(self, grads: Mapping[str, torch.Tensor], flat: torch.Tensor | None = None) -> None:
        """Apply one update; ``flat``: ``grads`` as one flat tensor laid out as the
        parameters' (an optimizer may then update them all in one call per op)."""

    def _state_like_params(self) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """A zeroed state tensor per parameter: views of one flat tensor when the
        parameters are (then returned too), else each its own."""
        if self.flat is None:
            return None, {n: torch.zeros_like(p) for n, p in self.params.items()}
        flat = torch.zeros_like(self.flat)
        views = {}
        for name, p in self.params.items():
            start = (p.data_ptr() - self.flat.data_ptr()) // p.element_size()
            views[name] = flat[start: start + p.numel()].view(p.shape)
        return flat, views

    @abc.abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Named state tensors (views, not copies)."""

    @abc.abstractmethod
    def magnitudes(self) -> Bounds:
        """The largest magnitude now in the parameters and in each group of state, measured."""

    @abc.abstractmethod
    def predict(self, now: Bounds, grad_max: float) -> tuple[Bounds, float]:
        """Bounds after one :meth:`step` with gradients of magnitude at most ``grad_max``,
        given bounds ``now`` (keys as :meth:`magnitudes`), and a bound on every value
        the step computes on the way (its peak)."""


class SGD(Optimizer):
    """torch.optim.SGD: weight decay, momentum with dampening, Nesterov."""

    def __init__(self, spec: OptimizerSpec, params: Mapping[str, torch.Tensor], flat: torch.Tensor | None = None):
        super().__init__(spec, params, flat)
        self.momentum_buffers: dict[str, torch.Tensor] = {}
        self._flat_momentum: torch.Tensor | None = None
        if spec.momentum:
            self._flat_momentum, self.momentum_buffers = self._state_like_params()

    def step(self, grads: Mapping[str, torch.Tensor], flat: torch.Tensor | None = None) -> None:
        first = self.steps == 0
        if flat is not None and self.flat is not None:  # the same ops, over every parameter at once
            self._update(self.flat, flat, self._flat_momentum, first)
            self.steps += 1
            return
        for name, p in self.params.items():
            self._update(p, grads[name], self.momentum_buffers.get(name), first)
        self.steps += 1

    def _update(self, p: torch.Tensor, d_p: torch.Tensor, buf: torch.Tensor | None, first: bool) -> None:
        s = self.spec
        if s.weight_decay:
            d_p = d_p.add(p, alpha=s.weight_decay)
        if s.momentum:
            if first:
                buf.copy_(d_p)
            else:
                buf.mul_(s.momentum).add_(d_p, alpha=1 - s.dampening)
            d_p = d_p.add(buf, alpha=s.momentum) if s.nesterov else buf
        p.add_(d_p, alpha=-s.lr)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"momentum_buffer.{n}": b for n, b in self.momentum_buffers.items()}

    def magnitudes(self) -> Bounds:
        return {"param": magnitude(self.params.values()), "momentum": magnitude(self.momentum_buffers.values())}

    def predict(self, now: Bounds, grad_max: float) -> tuple[Bounds, float]:
        s = self.spec
        d_p = grad_max + s.weight_decay * now["param"]
        buf = 0.0
        if s.momentum:
            buf = d_p if self.steps == 0 else s.momentum * now["momentum"] + abs(1 - s.dampening) * d_p
            update = d_p + s.momentum * buf if s.nesterov else buf
        else:
            update = d_p
        param = now["param"] + s.lr * update
        return {"param": param, "momentum": buf}, max(d_p, buf, update, s.lr * update, param)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay) and, with ``decoupled``, AdamW."""

    def __init__(self, spec: OptimizerSpec, params: Mapping[str, torch.Tensor], decoupled: bool,
                 flat: torch.Tensor | None = None):
        super().__init__(spec, params, flat)
        self.decoupled = decoupled
        self._flat_exp_avg, self.exp_avg = self._state_like_params()
        self._flat_exp_avg_sq, self.exp_avg_sq = self._state_like_params()

    def step(self, grads: Mapping[str, torch.Tensor], flat: torch.Tensor | None = None) -> None:
        beta1, beta2 = self.spec.betas
        step = self.steps + 1
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = self.spec.lr / bias_correction1
        bias_correction2_sqrt = math.sqrt(bias_correction2)
        if flat is not None and self.flat is not None:  # the same ops, over every parameter at once
            self._update(self.flat, flat, self._flat_exp_avg, self._flat_exp_avg_sq, step_size,
                         bias_correction2_sqrt)
        else:
            for name, p in self.params.items():
                self._update(p, grads[name], self.exp_avg[name], self.exp_avg_sq[name], step_size,
                             bias_correction2_sqrt)
        self.steps = step

    def _update(self, p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step_size: float, bias_correction2_sqrt: float) -> None:
        s = self.spec
        beta1, beta2 = s.betas
        if s.weight_decay:
            if self.decoupled:
                p.mul_(1 - s.lr * s.weight_decay)
            else:
                grad = grad.add(p, alpha=s.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(s.eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"exp_avg.{n}": t for n, t in self.exp_avg.items()}
        out.update({f"exp_avg_sq.{n}": t for n, t in self.exp_avg_sq.items()})
        return out

    def magnitudes(self) -> Bounds:
        return {"param": magnitude(self.params.values()), "exp_avg": magnitude(self.exp_avg.values()),
                "exp_avg_sq": magnitude(self.exp_avg_sq.values())}

    def predict(self, now: Bounds, grad_max: float) -> tuple[Bounds, float]:
        s = self.spec
        beta1, beta2 = s.betas
        step = self.steps + 1
        param, grad = now["param"], grad_max
        if s.weight_decay and self.decoupled:
            param *= abs(1 - s.lr * s.weight_decay)
        elif s.weight_decay:
            grad += s.weight_decay * now["param"]
        exp_avg = max(now["exp_avg"], grad)  # a lerp stays between its ends
        exp_avg_sq = beta2 * now["exp_avg_sq"] + (1 - beta2) * grad * grad
        denom = math.sqrt(exp_avg_sq) / math.sqrt(1 - beta2**step) + s.eps
        ratio = exp_avg / s.eps  # exp_avg / denom, and denom >= eps
        param += s.lr / (1 - beta1**step) * ratio
        peak = max(param, grad, now["exp_avg"] + grad, grad * grad, exp_avg_sq, denom, ratio)
        return {"param": param, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, peak


def make_optimizer(spec: OptimizerSpec, params: Mapping[str, torch.Tensor],
                   flat: torch.Tensor | None = None) -> Optimizer:
    """The optimizer ``spec`` names, over ``params`` (updated in place; ``flat``: one
    tensor they are all views of, end to end, when they are)."""
    if spec.name == "sgd":
        return SGD(spec, params, flat)
    if spec.name in ("adam", "adamw"):
        return Adam(spec, params, decoupled=spec.name == "adamw", flat=flat)
    raise ValueError(f"unknown optimizer {spec.name!r}")
