"""The gradient step: weights in, one mini-batch forward/backward, gradients out.

Pure torch, no gRPC: :mod:`psgrid.worker.runner` moves the bytes.
"""
from __future__ import annotations

import torch
from torch import nn

from psgrid.codec import Layout
from psgrid.worker.data import Dataset, ShardSampler
from psgrid.worker.loader import trainable


class GradientStep:
    """Computes this worker's gradient for a step into a reusable host buffer."""

    def __init__(self, model: nn.Module, dataset: Dataset, sampler: ShardSampler, device: torch.device):
        self.device = device
        self.model = model.to(device)
        self.dataset = dataset
        self.sampler = sampler
        self.params = trainable(self.model)
        self.layout = Layout.of_tensors((n, p.detach()) for n, p in self.params)
        pin = device.type == "cuda"
        self.grad_buffer = torch.zeros(self.layout.total_bytes, dtype=torch.uint8, pin_memory=pin)
        self.weight_buffer = torch.zeros(self.layout.total_bytes, dtype=torch.uint8, pin_memory=pin)
        self._grad_views = self.layout.views(self.grad_buffer)
        x, y = dataset.train_x, dataset.train_y
        self._x, self._y = x.to(device), y.to(device)

    def buffer_for(self, nbytes: int) -> torch.Tensor:
        """Where a pull of ``nbytes`` lands (the reused weight buffer)."""
        if nbytes > self.weight_buffer.numel():
            self.weight_buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        return self.weight_buffer

    def initial_payload(self) -> torch.Tensor:
        return self.layout.pack({n: p.detach().cpu() for n, p in self.params})

    @torch.no_grad()
    def load(self, layout: Layout, buffer: torch.Tensor) -> None:
        """Copy pulled weights into the model."""
        self.layout.check_matches(layout)
        views = layout.views(buffer)
        for name, p in self.params:
            p.copy_(views[name], non_blocking=True)

    def run(self, step: int) -> tuple[float, int]:
        """Forward/backward on this worker's batch for ``step``; return (loss, rows).

        Gradients end up in ``grad_buffer``, laid out as ``layout``.
        """
        idx = self.sampler.indices(step).to(self.device)
        for _, p in self.params:
            p.grad = None
        loss = self.dataset.loss_fn(self.model(self._x[idx]), self._y[idx])
        loss.backward()
        with torch.no_grad():
            for name, p in self.params:
                view = self._grad_views[name]
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss.item(), len(idx)
