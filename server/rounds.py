"""BSP rounds and gradient acceptance for one job: the part of :class:`~psgrid.server.jobs.Job`
that takes a validated gradient, and (synchronous) gathers a round and applies its mean.

A mixin of ``Job``: it uses the job's ``steps`` (StepClock), ``store``,
``accumulator``, ``workers``/``worker_names``, ``coverage`` and ``lineage``.
Every method expects the caller to hold ``job.cond``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import TYPE_CHECKING

import torch

from psgrid.errors import PushAhead

if TYPE_CHECKING:
    from psgrid.server.tables import JobTables


@dataclasses.dataclass(frozen=True)
class UpdateRecord:
    """One accepted gradient push, as the update log records it. Written to the
    log when applied and then dropped: the server keeps none in memory."""

    job_id: str
    worker_id: str
    #: The worker's stable name (ids change when a worker restarts).
    worker_name: str
    seq: int
    base_version: int
    base_step: int
    #: Steps between the weights the gradient was computed on and its own step.
    staleness: int
    #: Parameter version once this push is applied.
    version: int
    time_unix: float


@dataclasses.dataclass(frozen=True)
class _Last:
    """The gradient that completes a BSP round, not counted until the round is applied."""

    worker_id: str
    seq: int
    grads: dict[str, torch.Tensor]
    weight: int
    #: A bound on its |values| (None: not known).
    grad_max: float | None
    #: Its embedding-table row gradients ({table: (ids, grads)}; None: the job has no tables).
    rows: dict | None = None
    #: ``grads`` as one flat tensor (codec.Layout.flat); None when they are not one.
    flat: torch.Tensor | None = None


class GradientRounds:
    """Accepting gradients; in BSP, the round being gathered and its application."""

    _round_records: list[UpdateRecord]
    _applied: list[UpdateRecord]
    tables: JobTables | None

    def accept_gradient(self, worker_id: str, seq: int, base_version: int, base_step: int,
                        grads: dict[str, torch.Tensor], samples: int = 1,
                        grad_max: float | None = None, ranks: tuple[int, ...] = (),
                        rows: dict | None = None, flat: torch.Tensor | None = None) -> UpdateRecord:
        """Apply (or, in BSP, accumulate weighted by ``samples``) one validated gradient push
        whose values are at most ``grad_max`` in magnitude (None: not known), with its
        embedding-table ``rows`` ({table: (unique ids, gradient rows)}, checked); ``flat``:
        ``grads`` as one flat tensor, when they are one (codec.Layout.flat).

        Raises NonFiniteGradient when the update it makes (BSP: the round it completes)
        would not be finite; then nothing changed.
        """
        store = self.require_store()
        steps = self.steps
        steps.check_push(worker_id, seq)
        if steps.synchronous:
            expected = tuple(self.coverage(worker_id))
            if (tuple(ranks) or (self.rank_of(worker_id),)) != expected:
                raise PushAhead(f"step {seq} of {worker_id} was computed on the data of ranks {list(ranks)}, "
                                f"the round now expects ranks {list(expected)} of it (a worker left or "
                                "came back); pull again")
            weight = max(1, samples)
            if steps.active <= steps.arrived | {worker_id}:  # the round's last gradient: apply them all
                self._apply_round(_Last(worker_id, seq, grads, weight, grad_max, rows, flat))
            else:
                self.accumulator.add(grads, weight, grad_max, flat)
                if self.tables is not None:
                    self.tables.stage(worker_id, seq, weight, rows or {}, checked=True)
                steps.accept(worker_id, seq)
            version = store.version if not steps.arrived else store.version + 1
        else:
            scale = 1.0
            if self.spec.scale_stale and seq > base_step:  # computed on weights seq - base_step steps old
                scale = 1.0 / (1 + seq - base_step)
                if flat is not None:
                    flat.mul_(scale)
                else:
                    for g in grads.values():
                        g.mul_(scale)
                grad_max = None if grad_max is None else grad_max * scale
            # the rows' update is computed and checked first, written once the dense one is in
            write_rows = self.tables.prepare_now(rows, scale) if self.tables is not None and rows else None
            store.apply(grads, grad_max, flat)
            if write_rows is not None:
                write_rows()
            steps.accept(worker_id, seq)
            version = store.version
        record = UpdateRecord(
            self.job_id, worker_id, self.worker_names[self.rank_of(worker_id)], seq, base_version, base_step,
            staleness=seq - base_step, version=version, time_unix=self._clock(),
        )
        if steps.synchronous and steps.arrived:
            self._round_records.append(record)  # applied (and logged) with its round
            # No pull can go on until the round is applied (_apply_round wakes them).
        else:
            self._applied.append(record)
            self.cond.notify_all()
        return record

    def _apply_round(self, last: _Last) -> None:
        """BSP: apply the mean of the gradients that arrived for this round and of
        ``last``, the gradient that completes it.

        Raises NonFiniteGradient when the mean or the update would not be finite;
        then nothing changed: ``last`` is not counted and the round stays open.
        """
        write_rows = None
        if self.tables is not None:  # the round's rows: computed and checked aside, written with its dense update
            self.tables.stage(last.worker_id, last.seq, last.weight, last.rows or {}, checked=True)
            try:
                write_rows = self.tables.prepare_round(last.seq)
            except BaseException:
                self.tables.unstage(last.worker_id)
                raise
        try:
            self._apply_mean(last)
        except BaseException:
            if self.tables is not None:
                self.tables.unstage(last.worker_id)
            raise
        if write_rows is not None:
            write_rows()
        self.steps.accept(last.worker_id, last.seq)
        # Who contributed, and on which ranks' data: shards whose rounds differ in either drifted apart.
        names = sorted(f"{self.worker_names[self.workers.index(w)]}{self.coverage(w)}"
                       for w in self.steps.arrived)
        entry = f"{self.lineage}|{self.steps.global_step}:{','.join(names)}"
        self.lineage = hashlib.sha256(entry.encode()).hexdigest()[:16]
        self.steps.round_applied()
        self._applied.extend(dataclasses.replace(r, version=self.store.version) for r in self._round_records)
        self._round_records.clear()
        self._maybe_aligned()
        self.cond.notify_all()

    def _apply_mean(self, last: _Last) -> None:
        """Apply the round's mean (with ``last``) and empty the accumulator; nothing
        changes when that raises. In place when the bounds say that nothing can
        overflow (the common case), else computed aside and checked exactly."""
        acc, store = self.accumulator, self.store
        grads, weight, grad_max = last.grads, last.weight, last.grad_max
        bound = acc.mean_bound(grad_max, weight) if grad_max is not None else math.inf
        if acc.fits(grad_max, weight) and store.predict(bound) is not None:
            acc.add(grads, weight, grad_max, last.flat)
            store.apply(acc.mean(), bound, acc.flat)
        else:
            store.apply(acc.mean_aside(grads, weight))
        acc.reset()

    def take_applied(self) -> list[UpdateRecord]:
        """Updates applied since the last call, in order (for the update log), forgotten here."""
        applied, self._applied = self._applied, []
        return applied

    def _reset_round(self) -> None:
        """BSP: forget the round being gathered; the workers that had pushed compute it again.

        Called when the round's membership changes (a worker lost, back or
        replaced): each step's round holds every rank's batch exactly once, so
        the weights equal a fault-free run's. Their waiting pulls wake up at the
        current step (the runner trains that step again).
        """
        steps = self.steps
        if steps is None or not steps.synchronous or self.accumulator is None:
            return
        for worker in steps.arrived:
            steps.clocks[worker] = steps.global_step
            self.progress[worker].finished = False  # its last step is undone
        steps.arrived.clear()
        self.accumulator.reset()
        if self.tables is not None:
            self.tables.reset()
        self._round_records.clear()
        self.cond.notify_all()
