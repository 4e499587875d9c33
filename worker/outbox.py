"""What a worker pushes each step: a gradient, or after ``sync_every`` local steps its
model delta (:mod:`psgrid.worker.local_sgd`), encoded as the job says
(:mod:`psgrid.worker.compress`).

One server step is one push of every worker (a *round*). A job's ``steps`` and
``epochs`` count local steps, so its work is the same whatever ``sync_every``:
it runs ``ceil(local steps / sync_every)`` rounds, and the server's step, its
checkpoints and the clocks count rounds.
"""
from __future__ import annotations

import math

import torch

from psgrid.spec import JobSpec
from psgrid.worker.compress import PushEncoder
from psgrid.worker.local_sgd import LocalSGD
from psgrid.worker.step import GradientStep


class Outbox:
    """Computes step ``clock``'s push of one worker and encodes it.

    State that outlives a step (the local optimizer's, the error-feedback
    residuals) is saved when a round is first computed and put back when the
    same round is computed again (its push refused, or the round started again
    on the server after a worker came or went), so a round computed twice counts
    once; a server that went back further than one round (a restore or a
    roll-back) finds that state started afresh.
    """

    def __init__(self, step: GradientStep, spec: JobSpec):
        self.step = step
        self.every = spec.sync_every
        self.local_steps_total = step.sampler.total_steps(spec.epochs, spec.steps)
        self.rounds = math.ceil(self.local_steps_total / self.every)
        self.local = LocalSGD(step, spec.local_optimizer) if self.every > 1 else None
        self.encoding = spec.encoding
        self.encoder = PushEncoder(step.layouts, self.encoding, spec.error_feedback) if self.encoding.lossy else None
        self._round = -1

    def local_range(self, clock: int) -> range:
        """The local steps (data steps) of round ``clock``."""
        return range(clock * self.every, min((clock + 1) * self.every, self.local_steps_total))

    def compute(self, clock: int, ranks: tuple[int, ...], pulled: list) -> tuple[float, int, int]:
        """Compute round ``clock`` on the weights just loaded from ``pulled``; return (loss,
        rows of one step: the BSP weight, examples in all)."""
        self._begin(clock)
        if self.local is None:
            loss, rows = self.step.run(clock, ranks)
            return loss, rows, rows
        return self.local.run(self.local_range(clock), ranks or (self.step.sampler.rank,), pulled)

    def payloads(self) -> list[torch.Tensor]:
        """The push of the round just computed, for each shard (encoded when the job says so)."""
        buffers = self.step.grad_buffers
        if self.encoder is None:
            return list(buffers)
        return [self.encoder.encode(shard, buf) for shard, buf in enumerate(buffers)]

    def evaluate_due(self, clock: int, every: int) -> bool:
        """Whether round ``clock`` crosses a multiple of ``every`` local steps."""
        steps = self.local_range(clock)
        return bool(every) and bool(steps) and (steps[-1] + 1) // every > steps[0] // every

    def _begin(self, clock: int) -> None:
        parts = [p for p in (self.local, self.encoder) if p is not None]
        if clock == self._round:
            for p in parts:
                p.restore()
            return
        if clock < self._round:
            for p in parts:
                p.reset()
        for p in parts:
            p.save()
        self._round = clock
