"""The gradient step: weights in, one mini-batch forward/backward, gradients out.

Pure torch, no gRPC: :mod:`psgrid.worker.runner` moves the bytes. With S
parameter-server shards the parameters are split as :mod:`psgrid.partition`
says, and every shard has its own reusable weight and gradient buffer.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from psgrid import sparse
from psgrid.codec import Layout
from psgrid.partition import partition, piece_view
from psgrid.dataset import Dataset, ShardSampler
from psgrid.build import trainable


#: Models up to this size get their gradients straight in the push buffers (backward
#: adds into zeroed buffers). Above it the zeroing pass, and the read of the buffer
#: the add makes, cost more memory traffic than the per-tensor copies they save.
DIRECT_GRADS_BYTES = 8 << 20


class GradientStep:
    """Computes this worker's gradient for a step into reusable host buffers, one per shard."""

    def __init__(self, model: nn.Module, dataset: Dataset, sampler: ShardSampler,
                 device: torch.device, shards: int = 1, world_size: int = 1):
        self.device = device
        self.model = model.to(device)
        self.dataset = dataset
        self.sampler = sampler
        self.world_size = world_size
        self._samplers = {sampler.rank: sampler}
        self.params = trainable(self.model)
        self._by_name = dict(self.params)
        self.full_layout = Layout.of_tensors((n, p.detach()) for n, p in self.params)
        self.partition = partition(self.full_layout, shards)
        self.layouts = self.partition.layouts
        pin = device.type == "cuda"
        self.grad_buffers = [torch.zeros(l.total_bytes, dtype=torch.uint8, pin_memory=pin) for l in self.layouts]
        self.weight_buffers = [torch.zeros(l.total_bytes, dtype=torch.uint8, pin_memory=pin) for l in self.layouts]
        self._grad_views = [l.views(b) for l, b in zip(self.layouts, self.grad_buffers)]
        #: Per shard, the buffer the model's parameters are views of, laid out as the
        #: shard's payload (None: they are not; see _bind_to_buffers).
        self._model_buffers: list[torch.Tensor | None] = [None] * len(self.layouts)
        #: (parameter, its view in the gradient buffers) while gradients land there directly;
        #: and the (parameter, shard, piece name) they were made from.
        self._grad_binds: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._grad_bind_keys: list[tuple[nn.Parameter, int, str]] = []
        self._bind_to_buffers()
        x, y = dataset.train_x, dataset.train_y
        self._x, self._y = x.to(device), y.to(device)
        #: The model's embedding tables (psgrid.sparse), by name: their rows live on the servers.
        self.tables = sparse.tables(self.model)
        #: Where a step's rows come from (the runner binds the servers'); None: no tables.
        self.row_source: sparse.RowSource | None = None
        #: The row gradients of the step just computed: {table: (unique ids, summed rows)}.
        self.row_grads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _bind_to_buffers(self) -> None:
        """On the CPU, when no tensor is split between shards: make every parameter a view
        of one buffer per shard, laid out as that shard's payload, and every gradient a
        view of the shard's gradient buffer. A pull then loads with one copy, and
        backward leaves the gradients of a small model (DIRECT_GRADS_BYTES) where the
        push sends them from (a step otherwise copies each tensor both ways, one
        Python call each)."""
        if self.device.type != "cpu" or not all(p.whole for pieces in self.partition.pieces for p in pieces):
            return
        for shard, (layout, pieces) in enumerate(zip(self.layouts, self.partition.pieces)):
            flat = torch.zeros(layout.total_bytes, dtype=torch.uint8)
            views, grads = layout.views(flat), self._grad_views[shard]
            for piece in pieces:
                param = self._by_name[piece.tensor]
                views[piece.name].copy_(param)
                param.data = views[piece.name]
                if self.full_layout.total_bytes <= DIRECT_GRADS_BYTES:
                    self._grad_binds.append((param, grads[piece.name]))
                    self._grad_bind_keys.append((param, shard, piece.name))
            self._model_buffers[shard] = flat

    def gradients_into(self, shard: int, buffer: torch.Tensor) -> None:
        """Compute shard ``shard``'s gradients into ``buffer`` from now on: the push segment
        of the worker's step stream in shared memory (psgrid.shm), which a push then need
        not copy into. ``buffer`` is as large as the shard's payload; on the CPU only (a
        GPU's copies want the pinned buffer)."""
        if self.device.type != "cpu" or buffer.data_ptr() == self.grad_buffers[shard].data_ptr():
            return
        buffer.zero_()  # its padding too, as in the worker's own buffers: the same bytes go out
        self.grad_buffers[shard] = buffer
        self._grad_views[shard] = self.layouts[shard].views(buffer)
        self._grad_binds = [(param, self._grad_views[s][name]) for param, s, name in self._grad_bind_keys]

    def buffer_for(self, shard: int) -> Callable[[int], torch.Tensor]:
        """Where a pull of shard ``shard`` lands (its reused weight buffer)."""
        def get(nbytes: int) -> torch.Tensor:
            if nbytes > self.weight_buffers[shard].numel():
                self.weight_buffers[shard] = torch.empty(
                    nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            return self.weight_buffers[shard]
        return get

    @torch.no_grad()
    def initial_payload(self, shard: int) -> torch.Tensor:
        pieces = self.partition.pieces[shard]
        return self.layouts[shard].pack(
            {p.name: piece_view(self._by_name[p.tensor].detach(), p).cpu() for p in pieces})

    @torch.no_grad()
    def load(self, shard: int, layout: Layout, buffer: torch.Tensor) -> None:
        """Copy one shard's pulled weights into the model (converted when they came in 16 bits)."""
        flat = self._model_buffers[shard]
        if flat is not None and layout == self.layouts[shard]:
            flat.copy_(buffer[: layout.total_bytes])  # the same bytes, laid out the same: one copy
            return
        self.layouts[shard].check_matches(layout, cast=True)
        views = layout.views(buffer)
        for piece in self.partition.pieces[shard]:
            piece_view(self._by_name[piece.tensor], piece).copy_(views[piece.name], non_blocking=True)

    def indices(self, step: int, rank: int) -> torch.Tensor:
        """Rows of the batch for ``step`` of ``rank``'s data shard (a worker also computes
        for workers that are gone)."""
        if rank not in self._samplers:
            s = self.sampler
            self._samplers[rank] = ShardSampler(len(self.dataset.train_x), rank, self.world_size,
                                                s.batch_size, s.seed)
        return self._samplers[rank].indices(step)

    def run(self, step: int, ranks: tuple[int, ...] = ()) -> tuple[float, int]:
        """Forward/backward on the batch for ``step``; return (loss, rows).

        Each shard's gradients end up in ``grad_buffers[shard]``, laid out as
        ``layouts[shard]``. Covering several ranks (workers that are gone), it
        computes each rank's batch on its own and combines their means weighted by
        rows, in rank order, as the server combines the pushes of the workers it
        stands in for: the round then gets the gradients a fault-free run gets
        (bit for bit with two workers), not those of one bigger batch, whose
        different summation order would drift the weights apart over many steps.
        """
        own = ranks or (self.sampler.rank,)
        if len(own) == 1:
            return self._backward(self.indices(step, own[0]))
        losses, rows, row_parts = 0.0, 0, []
        for i, rank in enumerate(own):
            loss, n = self._backward(self.indices(step, rank), accumulate=i > 0)
            if i == 0:
                self._scale_grads(lambda view: view.mul_(n))
            losses, rows = losses + loss * n, rows + n
            row_parts.append((n, self.row_grads))
        self._scale_grads(lambda view: view.div_(rows))  # as the server's mean: a division, not a product
        self.row_grads = _combine_rows(row_parts, rows)
        return losses / rows, rows

    def rows_bound(self):
        """The context a forward pass of the model needs: its tables' rows bound (psgrid.sparse)."""
        if not self.tables:
            return contextlib.nullcontext(None)
        if self.row_source is None:
            raise RuntimeError("the model has embedding tables and no row source is bound")
        return sparse.rows_from(self.row_source)

    def metrics(self) -> dict[str, float]:
        """The dataset's evaluation of the model as it is now (its tables' rows from the servers)."""
        with self.rows_bound():
            return self.dataset.metrics(self.model)

    def _backward(self, idx: torch.Tensor, accumulate: bool = False) -> tuple[float, int]:
        """Gradients of the mean loss over rows ``idx``: copied into the grad buffers,
        or (``accumulate``) added to them weighted by the rows."""
        idx = idx.to(self.device)
        direct = bool(self._grad_binds) and not accumulate
        if direct:  # backward adds each gradient into its zeroed place in the buffers
            for buffer in self.grad_buffers:
                buffer.zero_()
            for param, view in self._grad_binds:
                param.grad = view
        else:
            for _, p in self.params:
                p.grad = None
        with self.rows_bound() as used:
            loss = self.dataset.loss_fn(self.model(self._x[idx]), self._y[idx])
            loss.backward()
        self.row_grads = used.gradients() if used is not None else {}
        if direct:
            self._check_grads_in_place()
        else:
            self._copy_grads(accumulate, len(idx))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss.item(), len(idx)

    def _check_grads_in_place(self) -> None:
        """Backward added into the gradients it found (it does, without create_graph);
        should a model's hook have put another tensor there, copy that one in."""
        with torch.no_grad():
            for param, view in self._grad_binds:
                if param.grad is not view:
                    if param.grad is None:
                        view.zero_()
                    else:
                        view.copy_(param.grad)

    @torch.no_grad()
    def _copy_grads(self, accumulate: bool, rows: int) -> None:
        """Copy the gradients into the grad buffers, or (``accumulate``) add them weighted by ``rows``."""
        for pieces, views in zip(self.partition.pieces, self._grad_views):
            for piece in pieces:
                grad = self._by_name[piece.tensor].grad
                if accumulate:
                    if grad is not None:
                        views[piece.name].add_(piece_view(grad, piece), alpha=rows)
                elif grad is None:
                    views[piece.name].zero_()
                else:
                    views[piece.name].copy_(piece_view(grad, piece), non_blocking=True)

    @torch.no_grad()
    def _scale_grads(self, scale: Callable[[torch.Tensor], object]) -> None:
        for views in self._grad_views:
            for view in views.values():
                scale(view)


def _combine_rows(parts: list[tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]],
                  rows: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Row gradients of several ranks' batches (each the mean over its ``n`` rows)
    combined as the dense ones are: weighted by rows, then divided by all of them."""
    out = {}
    for name in {name for _, grads in parts for name in grads}:
        pairs = [(grads[name][0], grads[name][1] * n) for n, grads in parts if name in grads]
        ids = torch.cat([i for i, _ in pairs])
        unique, inverse = torch.unique(ids, return_inverse=True)
        summed = torch.zeros(unique.numel(), pairs[0][1].shape[1]).index_add_(0, inverse, torch.cat([g for _, g in pairs]))
        out[name] = (unique, summed.div_(rows))
    return out
