"""Local SGD: H local steps on the worker between two pushes, and the push is the model delta.

With ``sync_every = H`` a worker pulls the global weights w, takes H steps of
its own ``local_optimizer`` (torch.optim, state kept here between rounds) on its
next H batches, and pushes the *pseudo-gradient* ``w - w_local``: the server's
optimizer applies it as it would a gradient, so the server's optimizer is the
outer one (SGD lr 1: plain model averaging; SGD with momentum: SlowMo; SGD
Nesterov lr 0.7 momentum 0.9: DiLoCo), and a BSP round, its deduplication and
checkpoints carry over unchanged. The local optimizer's state lives in this
process only: a restarted worker starts it afresh.
"""
from __future__ import annotations

import copy

import torch

from psgrid.partition import piece_view
from psgrid.spec import OptimizerSpec
from psgrid.worker.step import GradientStep


def torch_optimizer(spec: OptimizerSpec, params) -> torch.optim.Optimizer:
    """The torch.optim optimizer ``spec`` names, over ``params``."""
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, dampening=spec.dampening,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


class LocalSGD:
    """Runs a round's local steps on ``step``'s model and leaves the delta in its grad buffers."""

    def __init__(self, step: GradientStep, spec: OptimizerSpec):
        self.step = step
        self.spec = spec
        self.optimizer = torch_optimizer(spec, [p for _, p in step.params])
        self._saved = copy.deepcopy(self.optimizer.state_dict())

    def run(self, local_steps: range, ranks: tuple[int, ...], pulled: list) -> tuple[float, int, int]:
        """Take the local steps (their batches on ``ranks``' data) from the weights just
        pulled, then write ``pulled - local`` into the grad buffers; return (mean loss, rows
        of one step, examples in all)."""
        step, losses, rows, seen = self.step, 0.0, 0, 0
        for s in local_steps:
            loss, rows = step.run(s, ranks)
            if len(ranks) > 1:
                self._grads_from_buffers()  # the weighted mean over the ranks is in the buffers
            self.optimizer.step()
            losses, seen = losses + loss, seen + rows
        self._delta(pulled)
        return losses / max(1, len(local_steps)), rows, seen

    @torch.no_grad()
    def _grads_from_buffers(self) -> None:
        step = self.step
        for pieces, layout, buf in zip(step.partition.pieces, step.layouts, step.grad_buffers):
            views = layout.views(buf)
            for piece in pieces:
                param = step._by_name[piece.tensor]
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                piece_view(param.grad, piece).copy_(views[piece.name])

    @torch.no_grad()
    def _delta(self, pulled: list) -> None:
        step = self.step
        for shard, (pieces, layout, buf) in enumerate(zip(step.partition.pieces, step.layouts, step.grad_buffers)):
            out, start = layout.views(buf), pulled[shard].layout.views(pulled[shard].buffer)
            for piece in pieces:
                local = piece_view(step._by_name[piece.tensor].detach(), piece)
                out[piece.name].copy_(start[piece.name]).sub_(local.to(out[piece.name].device))

    def save(self) -> None:
        """Remember the optimizer's state as it is now (the start of a round)."""
        self._saved = copy.deepcopy(self.optimizer.state_dict())

    def restore(self) -> None:
        """Back to the state of the last :meth:`save` (that round is computed again)."""
        self.optimizer.load_state_dict(copy.deepcopy(self._saved))

    def reset(self) -> None:
        """A fresh optimizer state (the server went back further than one round)."""
        self.optimizer = torch_optimizer(self.spec, [p for _, p in self.step.params])
        self.save()
