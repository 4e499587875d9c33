"""The serving pipeline: bounded stages in front of the dynamic batcher (no gRPC).

Shaped like an Elixir Broadway pipeline::

    producer (the RPC handlers)          submit(): Overloaded at once when full
        -> preprocess   processors, concurrency P, bounded buffer
        -> features     processors, concurrency F, bounded buffer
        -> batcher      batch processors, concurrency B, bounded buffer
        -> each request's rows back to its own caller

Back-pressure flows upstream: a processor whose downstream buffer is full
blocks, its own buffer fills, and only the producer's hand-off rejects. So
the pipeline holds at most the sum of its buffers plus one request per
processor and one batch per batch processor, whatever the offered load.

``preprocess`` and ``features`` are functions ``f(examples) -> examples``
applied to each request's examples at once (rows along dimension 0): per
request, not per example. They MUST map rows independently and keep the
row count; the batcher concatenates the results of many requests. A stage
whose function is None is the identity and is skipped (no thread hop).
The pipeline does not look inside payloads; the inference app hands user
functions torch tensors (:func:`psgrid.inference.arrays.on_tensors`).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from psgrid.errors import DeadlineExceeded, Internal, InvalidArgument, Overloaded, PsgridError, Unavailable
from psgrid.inference.batcher import (
    BatchFn,
    BatchPolicy,
    BatchStats,
    DynamicBatcher,
    Ticket,
    TicketState,
    start_threads,
)

logger = logging.getLogger(__name__)

Transform = Callable[[Any], Any]


def chain(*fns: Transform | None) -> Transform:
    """The functions applied in order, skipping None: the pipeline's stages inline
    (how a new model version's smoke batch is prepared)."""
    steps = [fn for fn in fns if fn is not None]

    def apply(examples: Any) -> Any:
        for fn in steps:
            examples = fn(examples)
        return examples

    return apply


class Stage:
    """A Broadway processor group: a bounded FIFO and ``concurrency`` threads.

    Each thread takes a ticket, applies ``fn`` to its payload and hands it to
    ``downstream(ticket, block=True)``. Dropped or expired tickets are
    skipped; a ticket whose ``fn`` raises fails with that error (ValueError
    and TypeError count as bad input: InvalidArgument; anything else not a
    psgrid error is Internal).
    """

    def __init__(self, name: str, fn: Transform, downstream: Callable[[Ticket, bool], None],
                 concurrency: int = 1, capacity: int = 256, clock=time.monotonic):
        if concurrency < 1 or capacity < 1:
            raise ValueError(f"stage {name}: concurrency and capacity must be >= 1")
        self.name, self.fn, self.capacity, self.concurrency = name, fn, capacity, concurrency
        self._downstream, self._clock = downstream, clock
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.rejected = 0
        self.dropped = 0

    def put(self, ticket: Ticket, block: bool = False) -> None:
        """Queue a ticket: Overloaded when full unless ``block`` (then wait for room)."""
        with self._cond:
            while len(self._queue) >= self.capacity and not self._closed:
                if not block:
                    self.rejected += 1
                    raise Overloaded(f"{self.name}: {self.capacity} requests already waiting")
                self._cond.wait()
            if self._closed:
                raise Unavailable(f"{self.name} is shutting down")
            self._queue.append(ticket)
            # Consumers wait only on an empty queue, producers only on a full one, so
            # one ticket needs one consumer woken, not all of them.
            self._cond.notify()

    def discard(self, ticket: Ticket) -> bool:
        """Remove a ticket that is still queued here; True if it was."""
        with self._cond:
            try:
                self._queue.remove(ticket)
            except ValueError:
                return False
            self.dropped += 1
            self._cond.notify_all()
            return True

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def _get(self) -> Ticket | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            ticket = self._queue.popleft()
            if len(self._queue) == self.capacity - 1:  # producers may be blocked on a full queue
                self._cond.notify_all()
            return ticket

    def _process(self, ticket: Ticket) -> None:
        if ticket.pending and not ticket.expired(self._clock()):
            try:
                ticket.payload = self.fn(ticket.payload)
            except Exception as exc:  # noqa: BLE001 - the ticket carries the error
                ticket.fail(_stage_error(self.name, exc))
                return
        if ticket.pending and not ticket.expired(self._clock()):
            try:
                self._downstream(ticket, True)
            except PsgridError as exc:
                ticket.fail(exc)
            return
        # The caller left (cancelled, or its deadline passed) before or during fn.
        ticket.drop(DeadlineExceeded(f"deadline passed in {self.name}"))
        with self._cond:
            self.dropped += 1

    def _loop(self) -> None:
        while (ticket := self._get()) is not None:
            self._process(ticket)

    def start(self) -> "Stage":
        self._threads += start_threads(self._loop, self.name, self.concurrency)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop: queued tickets fail with Unavailable; threads are joined."""
        with self._cond:
            self._closed = True
            doomed = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for ticket in doomed:
            ticket.fail(Unavailable(f"{self.name} shut down"))
        for thread in self._threads:
            thread.join(timeout)


def _stage_error(stage: str, exc: Exception) -> PsgridError:
    if isinstance(exc, PsgridError):
        return exc
    if isinstance(exc, (ValueError, TypeError)):
        return InvalidArgument(f"{stage}: {exc}")
    logger.error("[serve] %s failed: %s: %s", stage, type(exc).__name__, exc)
    return Internal(f"{stage} failed: {type(exc).__name__}: {exc}")


@dataclasses.dataclass(frozen=True)
class PipelineStats:
    """Buffer depths now and counters since start."""

    waiting: dict[str, int]
    rejected: int
    dropped: int
    batches: BatchStats

    @property
    def queued(self) -> int:
        return sum(self.waiting.values())


class Pipeline:
    """preprocess -> features -> dynamic batcher, with immediate rejection at the door.

    Contracts: :meth:`submit` returns at once, having queued the ticket, or
    raises Overloaded (the first buffer is full) or Unavailable (closed).
    :meth:`cancel` drops a ticket and frees its place wherever it waits.
    Every submitted ticket is eventually resolved, failed or dropped.
    """

    def __init__(self, run_batch: BatchFn, *, preprocess: Transform | None = None,
                 features: Transform | None = None, max_batch_size: int = 100,
                 batch_timeout_s: float = 0.005, queue_capacity: int = 256,
                 preprocess_concurrency: int = 2, features_concurrency: int = 2,
                 batch_concurrency: int = 1, clock=time.monotonic):
        self.batcher = DynamicBatcher(
            run_batch, BatchPolicy(max_batch_size, batch_timeout_s), capacity=queue_capacity,
            concurrency=batch_concurrency, clock=clock, name="batcher")
        self.stages: list[Stage] = []
        downstream: Callable[[Ticket, bool], None] = self.batcher.submit
        for name, fn, concurrency in (("features", features, features_concurrency),
                                      ("preprocess", preprocess, preprocess_concurrency)):
            if fn is not None:
                stage = Stage(name, fn, downstream, concurrency, queue_capacity, clock)
                self.stages.insert(0, stage)
                downstream = stage.put
        self._entry = downstream

    def submit(self, ticket: Ticket) -> None:
        self._entry(ticket, False)

    def cancel(self, ticket: Ticket) -> None:
        """The caller has gone: drop the ticket and free its place (no-op once answered)."""
        if ticket.state is TicketState.DONE:
            return
        ticket.drop()
        for stage in self.stages:
            if stage.discard(ticket):
                return
        self.batcher.discard(ticket)

    def stats(self) -> PipelineStats:
        waiting = {s.name: s.waiting() for s in self.stages}
        waiting["batcher"] = self.batcher.waiting()
        batches = self.batcher.stats()
        rejected = batches.rejected + sum(s.rejected for s in self.stages)
        dropped = batches.dropped + sum(s.dropped for s in self.stages)
        return PipelineStats(waiting, rejected, dropped, batches)

    def start(self) -> "Pipeline":
        self.batcher.start()
        for stage in self.stages:
            stage.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Front to back: stop the stages, then let the batcher run what reached it."""
        for stage in self.stages:
            stage.close(timeout)
        self.batcher.close(timeout)
