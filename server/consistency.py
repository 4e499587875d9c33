"""The consistency model: which worker may compute which step, and when.

One knob, ``staleness``:

* ``0`` (BSP): the gradients of every active worker for step t are averaged
  and applied once; a worker may compute step t+1 only after that.
* ``s > 0`` (SSP): each push is applied on arrival; a worker may compute step
  c only while ``c <= global_step + s``, where the global step is the slowest
  active worker's clock.
* ``None`` (asynchronous): each push is applied on arrival; nobody waits.

A worker's *clock* is the number of its pushes the server has accepted; the
push for step c carries ``seq = c``. Pure logic, no locks: the caller holds
the job's lock.
"""
from __future__ import annotations

from collections.abc import Iterable

from psgrid.errors import FailedPrecondition, PushAhead


class StepClock:
    """Per-worker clocks and the global step of one job."""

    def __init__(self, staleness: int | None, workers: Iterable[str]):
        self.staleness = staleness
        self.clocks: dict[str, int] = {w: 0 for w in workers}
        self.active: set[str] = set(self.clocks)
        #: BSP: workers whose gradient for the current round is in.
        self.arrived: set[str] = set()
        self._bsp_step = 0

    @classmethod
    def restored(cls, staleness: int | None, clocks: dict[str, int], global_step: int) -> "StepClock":
        """A clock rebuilt from a checkpoint. Every worker counts at the barrier: the
        job waits for each to come back (or to be declared lost)."""
        clock = cls(staleness, clocks)
        clock.clocks = dict(clocks)
        clock._bsp_step = global_step
        return clock

    def checkpoint_clocks(self) -> dict[str, int]:
        """Clocks consistent with the applied parameters.

        In BSP a push accepted into a round that has not been applied yet is
        not in the parameters; its worker computes that step again.
        """
        if self.synchronous:
            return {w: min(c, self._bsp_step) for w, c in self.clocks.items()}
        return dict(self.clocks)

    @property
    def synchronous(self) -> bool:
        return self.staleness == 0

    @property
    def global_step(self) -> int:
        """Steps every active worker has completed (BSP: rounds applied)."""
        if self.synchronous:
            return self._bsp_step
        clocks = [self.clocks[w] for w in self.active]
        return min(clocks) if clocks else min(self.clocks.values(), default=0)

    def may_compute(self, worker: str, clock: int) -> bool:
        """True when ``worker`` may pull the weights to compute step ``clock``."""
        if self.staleness is None:
            return True
        return clock <= self.global_step + self.staleness

    def is_duplicate(self, worker: str, seq: int) -> bool:
        """True when the push for ``seq`` was accepted before (a retry)."""
        return seq < self.clocks[worker]

    def check_push(self, worker: str, seq: int) -> None:
        """Raise unless ``seq`` is the next step of ``worker`` and within the bound."""
        expected = self.clocks[worker]
        if self.synchronous and expected != self._bsp_step:
            # BSP: only a worker at the global step is in the barrier (a lost one rejoins first).
            raise PushAhead(f"push seq {seq} of {worker}: its clock here is {expected}, the round is "
                            f"step {self._bsp_step}; pull again")
        if seq != expected:
            raise PushAhead(f"push seq {seq} skips ahead: the next step of {worker} here is {expected}; "
                            "pull again")
        if not self.may_compute(worker, seq):
            raise FailedPrecondition(
                f"step {seq} of {worker} is more than {self.staleness} steps ahead of "
                f"global step {self.global_step}; pull first"
            )

    def accept(self, worker: str, seq: int) -> bool:
        """Record the push of ``seq``; return True when an update must be applied now.

        Asynchronous and SSP: always True. BSP: True once every active worker's
        gradient for the round is in; the caller applies the average and calls
        :meth:`round_applied`.
        """
        self.check_push(worker, seq)
        self.clocks[worker] = seq + 1
        if not self.synchronous:
            return True
        self.arrived.add(worker)
        return self.round_complete()

    def round_complete(self) -> bool:
        return bool(self.arrived) and self.active <= self.arrived

    def round_applied(self) -> None:
        self.arrived.clear()
        self._bsp_step += 1

    def leave(self, worker: str) -> None:
        """Drop a worker from the barrier (it finished, or it is gone)."""
        self.active.discard(worker)

    def rejoin(self, worker: str, replaces: str | None = None) -> None:
        """Bring a worker (back) into the barrier; a new incarnation may replace an old id.

        Its clock is fast-forwarded to the global step, so it never drags the
        global step backwards: the steps it missed are skipped, not replayed.
        """
        step = self.global_step
        if replaces is not None and replaces != worker:
            self.clocks[worker] = self.clocks.pop(replaces)
            self.active.discard(replaces)
            if replaces in self.arrived:
                self.arrived.discard(replaces)
                self.arrived.add(worker)
        self.clocks[worker] = max(self.clocks.get(worker, 0), step)
        self.active.add(worker)
