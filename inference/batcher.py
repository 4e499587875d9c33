"""The dynamic batcher: the pure core of serving (no gRPC, no torch).

In Elixir Broadway's words this is the *batcher* stage: messages (here
:class:`Ticket`, one per caller's request, carrying one or several examples)
wait in a bounded buffer; a *batch processor* takes them out in groups of at
most ``max_batch_size`` examples, or fewer once the oldest has waited
``batch_timeout_s``, runs the model once on the group and routes each
request's rows back to its own ticket.

The model is any callable ``run_batch(payloads) -> (outputs, version)``: it
gets the payloads of one batch in order and MUST return one output per
payload, in the same order, plus the tag of the model version that computed
all of them. The batcher never splits a request across batches, so every
answer comes from exactly one version.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from psgrid.errors import Cancelled, DeadlineExceeded, Internal, Overloaded, PsgridError, Unavailable

logger = logging.getLogger(__name__)

#: ``run_batch(payloads) -> (outputs, version)``: see the module docstring.
BatchFn = Callable[[list[Any]], tuple[Sequence[Any], int]]
Clock = Callable[[], float]


class TicketState(str, enum.Enum):
    """PENDING -> DONE (answered or failed) | DROPPED (cancelled or past its deadline).

    Exactly one transition leaves PENDING; every later one is ignored, so a
    result computed for a caller who has gone is dropped, never delivered.
    """

    PENDING = "PENDING"
    DONE = "DONE"
    DROPPED = "DROPPED"


class Ticket:
    """One caller's request in flight: its examples and, once done, its answer.

    ``payload`` may be replaced by the stages it passes through (preprocessing,
    feature extraction); ``rows`` is the number of examples and never changes.
    ``on_done(ticket)`` runs once, in the thread that resolves the ticket.
    """

    __slots__ = ("payload", "rows", "deadline", "state", "result", "version", "error",
                 "_event", "_lock", "_on_done", "tag")

    def __init__(self, payload: Any, rows: int, deadline: float | None = None,
                 on_done: Callable[["Ticket"], None] | None = None, tag: Any = None):
        if rows < 1:
            raise ValueError(f"a ticket carries at least one example, got rows={rows}")
        self.payload, self.rows, self.deadline, self.tag = payload, rows, deadline, tag
        self.state = TicketState.PENDING
        self.result: Any = None
        self.version = 0
        self.error: PsgridError | None = None
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._on_done = on_done

    @property
    def pending(self) -> bool:
        return self.state is TicketState.PENDING

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _finish(self, state: TicketState, result: Any, version: int, error: PsgridError | None) -> bool:
        with self._lock:
            if self.state is not TicketState.PENDING:
                return False
            self.state, self.result, self.version, self.error = state, result, version, error
            self.payload = None  # the examples are no longer needed: free them now
        self._event.set()
        if self._on_done is not None:
            self._on_done(self)
        return True

    def resolve(self, result: Any, version: int) -> bool:
        """Deliver the answer; False (and nothing happens) unless still PENDING."""
        return self._finish(TicketState.DONE, result, version, None)

    def fail(self, error: PsgridError) -> bool:
        """Deliver an error; False unless still PENDING."""
        return self._finish(TicketState.DONE, None, 0, error)

    def drop(self, error: PsgridError | None = None) -> bool:
        """The caller has gone (cancelled, deadline): any later answer is discarded."""
        return self._finish(TicketState.DROPPED, None, 0, error or Cancelled("request cancelled"))

    def wait(self, timeout: float | None = None) -> tuple[Any, int]:
        """Block for the answer: ``(result, version)``; raises the ticket's error.

        When ``timeout`` passes first the ticket is dropped and DeadlineExceeded raised.
        """
        if not self._event.wait(timeout):
            self.drop(DeadlineExceeded("no answer before the deadline"))
        if self.error is not None:
            raise self.error
        return self.result, self.version


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """When a batch is due and how much goes into it: pure arithmetic.

    ``plan`` looks at the waiting requests' sizes and the oldest one's arrival
    time and answers ``(take, wait_s)``: take the first ``take`` requests now
    (0: none), or wait ``wait_s`` seconds before asking again (None: until
    something arrives). A batch is due when the waiting examples reach
    ``max_batch_size`` or the oldest request has waited ``batch_timeout_s``.
    A batch holds whole requests, in arrival order, up to ``max_batch_size``
    examples; a single request larger than that forms a batch of its own.
    """

    max_batch_size: int = 100
    batch_timeout_s: float = 0.005

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.batch_timeout_s <= 60:
            raise ValueError(f"batch_timeout_s must be in [0, 60], got {self.batch_timeout_s}")

    def take(self, sizes: Iterable[int]) -> int:
        """How many of the first requests fit in one batch (at least one if any wait)."""
        total, count = 0, 0
        for rows in sizes:
            if count and total + rows > self.max_batch_size:
                break
            total, count = total + rows, count + 1
        return count

    def plan(self, sizes: Iterable[int], waiting_rows: int, oldest_arrival: float | None,
             now: float, flush: bool = False) -> tuple[int, float | None]:
        """``sizes`` is read only when a batch is due, so it may be a lazy iterable."""
        if oldest_arrival is None:
            return 0, None
        due = oldest_arrival + self.batch_timeout_s
        if flush or waiting_rows >= self.max_batch_size or now >= due:
            return self.take(sizes), None
        return 0, due - now


@dataclasses.dataclass
class BatchStats:
    """Counters since start; read them with :meth:`DynamicBatcher.stats`."""

    batches: int = 0
    examples: int = 0
    requests: int = 0
    failed_batches: int = 0
    dropped: int = 0
    rejected: int = 0
    max_batch_examples: int = 0


class DynamicBatcher:
    """Groups tickets into batches and runs them on ``concurrency`` threads.

    Contracts: the buffer never holds more than ``capacity`` requests;
    :meth:`submit` without ``block`` raises Overloaded at once when it is
    full. Tickets dropped while waiting leave the buffer (their place is free
    again) and are never run. A batch that fails is retried one request at a
    time, so one bad request fails alone. :meth:`close` runs what is waiting,
    then submit raises Unavailable; tickets no thread could run fail with
    Unavailable.
    """

    def __init__(self, run_batch: BatchFn, policy: BatchPolicy | None = None, capacity: int = 256,
                 concurrency: int = 1, clock: Clock = time.monotonic, name: str = "batcher"):
        if capacity < 1 or concurrency < 1:
            raise ValueError(f"capacity and concurrency must be >= 1, got {capacity}, {concurrency}")
        self.policy = policy or BatchPolicy()
        self.capacity, self.concurrency, self.name = capacity, concurrency, name
        self._run_batch, self._clock = run_batch, clock
        self._waiting: collections.deque[tuple[Ticket, float]] = collections.deque()
        self._rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._stats = BatchStats()

    # --- producer side -------------------------------------------------------------

    def submit(self, ticket: Ticket, block: bool = False) -> None:
        """Queue ``ticket``; Overloaded when full (or wait for room if ``block``)."""
        with self._cond:
            while len(self._waiting) >= self.capacity and not self._closed:
                if not block:
                    self._stats.rejected += 1
                    raise Overloaded(f"{self.name}: {self.capacity} requests already waiting")
                self._cond.wait()
            if self._closed:
                raise Unavailable(f"{self.name} is shutting down")
            self._waiting.append((ticket, self._clock()))
            self._rows += ticket.rows
            # A batch processor needs waking only for a new oldest request (its
            # timeout starts) or a full batch; sparing the rest spares GIL handoffs.
            if len(self._waiting) == 1 or self._rows >= self.policy.max_batch_size:
                self._cond.notify_all()

    def discard(self, ticket: Ticket) -> bool:
        """Take a (dropped) ticket out of the buffer, freeing its place; False if absent."""
        with self._cond:
            for i, (waiting, _) in enumerate(self._waiting):
                if waiting is ticket:
                    del self._waiting[i]
                    self._rows -= ticket.rows
                    self._stats.dropped += 1
                    self._cond.notify_all()
                    return True
        return False

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def stats(self) -> BatchStats:
        with self._cond:
            return dataclasses.replace(self._stats)

    # --- consumer side -------------------------------------------------------------

    def _prune(self, now: float) -> None:
        """Forget dropped and expired tickets at the head of the buffer."""
        while self._waiting:
            ticket, _ = self._waiting[0]
            if ticket.pending and not ticket.expired(now):
                return
            self._waiting.popleft()
            self._rows -= ticket.rows
            self._stats.dropped += 1
            ticket.drop(DeadlineExceeded("deadline passed while waiting for a batch"))
            self._cond.notify_all()

    def next_batch(self) -> list[Ticket] | None:
        """Block until a batch is due and take it; None once closed and empty."""
        with self._cond:
            while True:
                now = self._clock()
                self._prune(now)
                sizes = (t.rows for t, _ in self._waiting)
                oldest = self._waiting[0][1] if self._waiting else None
                take, wait_s = self.policy.plan(sizes, self._rows, oldest, now, flush=self._closed)
                if take:
                    batch = [self._waiting.popleft()[0] for _ in range(take)]
                    self._rows -= sum(t.rows for t in batch)
                    self._cond.notify_all()
                    return batch
                if self._closed:
                    return None
                self._cond.wait(wait_s)

    def run(self, batch: list[Ticket]) -> None:
        """Run one batch and route each output to its ticket (dropped ones discard it)."""
        live, payloads = [], []
        for ticket in batch:
            payload = ticket.payload  # read before the state: a drop clears it
            if ticket.pending and payload is not None:
                live.append(ticket)
                payloads.append(payload)
        if not live:
            return
        try:
            outputs, version = self._run_batch(payloads)
            if len(outputs) != len(live):
                raise Internal(f"the model returned {len(outputs)} outputs for {len(live)} requests")
        except Exception as exc:  # noqa: BLE001 - each ticket gets the error
            self._count(live, failed=True)
            if len(live) > 1:
                logger.warning("[serve] a batch of %d requests failed (%s); retrying them one by one",
                               len(live), exc)
                for ticket in live:
                    self.run([ticket])
                return
            live[0].fail(_as_psgrid_error(exc))
            return
        self._count(live)
        for ticket, output in zip(live, outputs):
            ticket.resolve(output, version)

    def _count(self, live: list[Ticket], failed: bool = False) -> None:
        rows = sum(t.rows for t in live)
        with self._cond:
            s = self._stats
            if failed:
                s.failed_batches += 1
                return
            s.batches, s.examples, s.requests = s.batches + 1, s.examples + rows, s.requests + len(live)
            s.max_batch_examples = max(s.max_batch_examples, rows)

    def _loop(self) -> None:
        while (batch := self.next_batch()) is not None:
            self.run(batch)

    # --- life cycle ----------------------------------------------------------------

    def start(self) -> "DynamicBatcher":
        self._threads += start_threads(self._loop, self.name, self.concurrency)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking tickets, run what is waiting, and join the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        with self._cond:  # without threads (never started, or stuck): fail the rest
            while self._waiting:
                self._waiting.popleft()[0].fail(Unavailable(f"{self.name} shut down"))
            self._rows = 0


def start_threads(target, name: str, count: int) -> list[threading.Thread]:
    """``count`` daemon threads running ``target``, named ``name-0`` .. ``name-{count-1}``."""
    threads = [threading.Thread(target=target, name=f"{name}-{i}", daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _as_psgrid_error(exc: Exception) -> PsgridError:
    if isinstance(exc, PsgridError):
        return exc
    logger.error("[serve] model failed on a request: %s: %s", type(exc).__name__, exc)
    return Internal(f"the model failed: {type(exc).__name__}: {exc}")
