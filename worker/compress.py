"""A worker's side of compression: encode each push, with error feedback.

Error feedback (Seide et al. 2014; Deep Gradient Compression): what a lossy
encoding leaves out of a push is kept (the *residual*) and added to the next
push, so that nothing is lost for good, only delayed. Residuals live in this
process only: a restarted worker starts again from zero (docs/design.md,
"Training over slow links").
"""
from __future__ import annotations

import torch

from psgrid.codec import Layout
from psgrid.compression import decode, encode, wire_layout
from psgrid.spec import Encoding


class PushEncoder:
    """Encodes what a worker pushes to each shard, carrying residuals when ``error_feedback``.

    :meth:`encode` adds the shard's residual to the dense payload (in place),
    encodes it, and keeps what the encoding lost as the next residual.
    :meth:`save` and :meth:`restore` bracket a step that may be computed again
    (its push refused, or its round started again on the server): the residual
    goes back to what it was before that step's push.
    """

    def __init__(self, layouts: tuple[Layout, ...], encoding: Encoding, error_feedback: bool = True):
        self.layouts = layouts
        self.encoding = encoding
        self.error_feedback = error_feedback and encoding.lossy
        self._wire = [torch.zeros(wire_layout(l, encoding).total_bytes, dtype=torch.uint8) for l in layouts]
        self._residual = [torch.zeros(l.total_bytes, dtype=torch.uint8) for l in layouts] if self.error_feedback else []
        self._saved = [r.clone() for r in self._residual]

    def wire_bytes(self, shard: int) -> int:
        return self._wire[shard].numel()

    @torch.no_grad()
    def encode(self, shard: int, dense: torch.Tensor) -> torch.Tensor:
        """The encoded payload of ``dense`` (a buffer laid out as the shard's layout, which
        this changes: the residual is added to it)."""
        layout = self.layouts[shard]
        views = layout.views(dense)
        if self.error_feedback:
            residual = layout.views(self._residual[shard])
            for name, view in views.items():
                view.add_(residual[name])
        payload = encode(layout, self.encoding, views, self._wire[shard])
        if self.error_feedback:
            # residual = what was meant - what the server will read
            decode(layout, self.encoding, payload, self._residual[shard], check=False)
            for name, view in views.items():
                residual[name].neg_().add_(view)
        return payload

    def save(self) -> None:
        """Remember the residuals as they are now (the start of a step)."""
        for saved, residual in zip(self._saved, self._residual):
            saved.copy_(residual)

    def restore(self) -> None:
        """Back to the residuals of the last :meth:`save` (that step is computed again)."""
        for saved, residual in zip(self._saved, self._residual):
            residual.copy_(saved)

    def reset(self) -> None:
        """Zero residuals (the server went back further than one step: the ones of then are gone)."""
        for residual in self._residual:
            residual.zero_()
