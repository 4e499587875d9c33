"""One job on the parameter server: its state machine, clocks, store and event log.

Every method expects the caller to hold ``job.cond`` unless it says otherwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from psgrid.codec import Layout
from psgrid.errors import FailedPrecondition, InvalidArgument, JobNotRunning, NotAssigned, Overloaded
from psgrid.server.consistency import StepClock
from psgrid.server.rounds import GradientRounds, UpdateRecord
from psgrid.server.store import GradientAccumulator, ParameterStore
from psgrid.server.tables import JobTables, StagedRows
from psgrid.sparse import TableSpec
from psgrid.spec import HistoryRow, JobEvent, JobInfo, JobSpec, JobState

#: Prefix of the stand-in id of a rank whose worker has not (re-)registered yet.
AWAY = "away:"
#: Events kept per job; a watcher that falls further behind skips ahead.
MAX_EVENTS = 10_000
#: Points of a job's training curve kept (the oldest go first).
MAX_HISTORY = 100_000
#: Step-aligned snapshots of a sharded BSP job kept in memory per shard: two, so
#: that shards one aligned step apart still hold a step in common.
ALIGNED_IN_MEMORY = 2
#: Seconds a cancelled push has to let go of its worker's receive buffer.
HANDOVER_S = 5.0


@dataclasses.dataclass(eq=False)
class _Receiver:
    cancel: Callable[[], object] | None


@dataclasses.dataclass
class Traffic:
    """A job's training traffic on this server (JobInfo's counters): pushes accepted and
    their payload bytes as sent and uncompressed, pulls served with weights and their bytes."""

    pushes: int = 0
    bytes_pushed: int = 0
    dense_bytes_pushed: int = 0
    pulls: int = 0
    bytes_pulled: int = 0
    rows_pulled: int = 0
    rows_pushed: int = 0


@dataclasses.dataclass
class WorkerProgress:
    step: int = 0
    loss: float = math.nan
    samples_per_sec: float = 0.0
    finished: bool = False


class Job(GradientRounds):
    """A job's whole server-side state, guarded by ``cond``."""

    def __init__(self, job_id: str, spec: JobSpec, clock=time.time, next_event: int = 0,
                 shards: tuple[str, ...] = (), partition: bool = False):
        self.job_id = job_id
        self.spec = spec
        self.shards = tuple(shards)
        #: This server holds one shard of a job coordinated elsewhere.
        self.partition = partition
        #: Sharded BSP: called (under ``cond``) at every step that is a multiple of
        #: ``aligned_every``, so that every shard checkpoints the same steps.
        self.on_aligned: Callable[[Job], None] | None = None
        self.aligned_every = 0
        #: Bumped by each roll-back: a snapshot of an older timeline is never saved,
        #: and a roll-back asked for on the strength of an older one does nothing.
        self.timeline = 0
        #: Numbers the snapshots in the order they were taken: an older one is never
        #: written after a newer one.
        self.snapshot_stamp = 0
        #: Sharded BSP: the newest step-aligned snapshots (JobCheckpoints), in memory.
        self.aligned: deque = deque(maxlen=ALIGNED_IN_MEMORY)
        #: BSP: a digest of which workers contributed to each round applied so far.
        #: Two shards at the same step with different lineages applied different
        #: rounds (one dropped a worker the other kept): they have drifted apart.
        self.lineage = ""
        self.state = JobState.PENDING
        self._clock = clock
        self.created = self.updated = clock()
        #: Why the job, PENDING, has not started yet (Scheduler.schedule).
        self.waiting = ""
        lock = threading.RLock()
        self.cond = threading.Condition(lock)
        #: Notified when a push lets go of its worker's receive buffer (receiving()); on the
        #: same lock, so that a push's end does not wake every waiting pull.
        self._handover = threading.Condition(lock)
        self.workers: list[str] = []
        #: Worker names by rank: a restarted worker of the same name takes its rank back.
        self.worker_names: list[str] = []
        self.lost: set[str] = set()
        #: When the ranks of a restored or partition job went away (see open_away).
        self.away_since = 0.0
        #: The worker that evaluates the final weights: the lowest-ranked one still there.
        self.evaluator: str | None = None
        self.steps: StepClock | None = None
        self.store: ParameterStore | None = None
        self.accumulator: GradientAccumulator | None = None
        #: The job's embedding tables (this server's rows of them), from the first init push.
        self.tables: JobTables | None = None
        #: Row gradients each worker staged (PushRows) for its next push.
        self.pending_rows: dict[str, StagedRows] = {}
        self.total_steps = 0
        self.progress: dict[str, WorkerProgress] = {}
        self.metrics: dict[str, float] = {}
        self.error = ""
        self.events: deque[JobEvent] = deque(maxlen=MAX_EVENTS)
        self._next_event = next_event
        self.history: deque[HistoryRow] = deque(maxlen=MAX_HISTORY)
        self._round_records: list[UpdateRecord] = []
        self._applied: list[UpdateRecord] = []
        #: Per worker, the push being received now: its cancel (see receiving()).
        self._receivers: dict[str, _Receiver] = {}
        self.staging: dict[str, torch.Tensor] = {}
        self.snapshots: dict[str, torch.Tensor] = {}
        #: Its parameters could not move into shared memory (psgrid.shm.SharedStore): not tried again.
        self.unshareable = False
        #: Per worker: where its encoded pushes land (wire_buffer), its 16-bit pulls are built.
        self.wire: dict[str, torch.Tensor] = {}
        self.pulls16: dict[str, torch.Tensor] = {}
        self.traffic = Traffic()
        if next_event == 0:
            with self.cond:
                self.emit("submitted")

    # --- snapshots and events ---------------------------------------------

    def info(self) -> JobInfo:
        live = [p for p in self.progress.values() if not math.isnan(p.loss)]
        return JobInfo(
            job_id=self.job_id, spec=self.spec, state=self.state,
            step=self.steps.global_step if self.steps else 0,
            total_steps=self.total_steps,
            version=self.store.version if self.store else 0,
            loss=sum(p.loss for p in live) / len(live) if live else math.nan,
            samples_per_sec=sum(p.samples_per_sec for p in self.progress.values() if not p.finished),
            metrics=dict(self.metrics), error=self.error, worker_ids=tuple(self.workers),
            created_unix=self.created, updated_unix=self.updated, shards=self.shards,
            waiting=self.waiting if self.state is JobState.PENDING else "",
            **dataclasses.asdict(self.traffic), rows_held=self.tables.touched if self.tables else 0,
        )

    def set_waiting(self, reason: str) -> None:
        """Say why this PENDING job has not started (an event when it changes)."""
        if reason != self.waiting:
            self.waiting = reason
            self.emit("waiting")

    def emit(self, kind: str) -> None:
        self.updated = self._clock()
        self.events.append(JobEvent(self._next_event, self.updated, kind, self.info()))
        self._next_event += 1
        self.cond.notify_all()

    @property
    def next_event(self) -> int:
        return self._next_event

    def events_from(self, seq: int) -> list[JobEvent]:
        return [e for e in self.events if e.seq >= seq]

    # --- state machine ------------------------------------------------------

    def set_state(self, state: JobState, error: str = "") -> bool:
        """Move to ``state``; a terminal state never changes. Return True if moved."""
        if self.state.terminal or self.state is state:
            return False
        self.state = state
        if error:
            self.error = error
        if state.terminal:
            self.pending_rows.clear()  # no push will take them now
            if self.store is not None:
                self.store.unshare()  # /dev/shm is often small: a finished job's weights leave it
        self.emit("state")
        return True

    def open_away(self, names: list[str]) -> None:
        """Start with every rank away: workers take their ranks back by name (a
        restored job, or a shard's part of a sharded job). Until then the barrier
        waits for them; one that does not come back in time is declared lost."""
        self.worker_names = list(names)
        self.workers = [AWAY + n for n in names]
        self.lost = set()
        self.away_since = self._clock()
        self.steps = StepClock.restored(self.spec.staleness, {w: 0 for w in self.workers}, 0)
        self.progress = {w: WorkerProgress() for w in self.workers}

    def start(self, workers: list[str], names: list[str]) -> None:
        self.workers = list(workers)
        self.worker_names = list(names)
        self.steps = StepClock(self.spec.staleness, self.workers)
        self.progress = {w: WorkerProgress() for w in self.workers}
        self.set_state(JobState.RUNNING)

    def replace_worker(self, old: str, new: str) -> None:
        """A new incarnation ``new`` of worker ``old`` takes its rank, clock and data shard."""
        rank = self.rank_of(old)
        if old in self.lost:
            self._reset_round()  # the round's coverage changes: everyone computes it again
        self.workers[rank] = new
        self.lost.discard(old)
        self.steps.rejoin(new, replaces=old)
        self.progress[new] = self.progress.pop(old)
        for buffers in (self.staging, self.snapshots, self.wire, self.pulls16, self.pending_rows):
            buffers.pop(old, None)
        if self.evaluator in (old, None):
            self._designate_evaluator()
        self.emit("worker")

    def worker_lost(self, worker_id: str) -> None:
        """The worker missed its heartbeats: stop waiting for it at the barrier."""
        if worker_id in self.lost or self.state.terminal:
            return
        self.lost.add(worker_id)
        # BSP: the round is not applied with whatever arrived (that would leave the
        # lost worker's data out): it starts again, the others covering its rank.
        self._reset_round()
        self.steps.leave(worker_id)
        if self.evaluator == worker_id:
            self._designate_evaluator()
        self.emit("worker")
        self._maybe_done_training()

    def overdue(self, now: float, timeout_s: float) -> list[str]:
        """Stand-ins of ranks whose workers did not come back within ``timeout_s``."""
        if self.state.terminal or now - self.away_since <= timeout_s:
            return []
        return [w for w in self.workers if w.startswith(AWAY) and w not in self.lost]

    def worker_back(self, worker_id: str) -> None:
        """A lost worker answered again: it rejoins at the current global step."""
        if worker_id not in self.lost:
            return
        self.lost.discard(worker_id)
        self._reset_round()  # its rank is no longer covered by the others: the round starts again
        self.steps.rejoin(worker_id)
        if self.evaluator is None:
            self._designate_evaluator()
        self.emit("worker")

    def coverage(self, worker_id: str) -> list[int]:
        """The data shards (ranks) this worker computes on: its own, plus a fair
        share of the ranks whose workers are gone, so no data is left out."""
        rank = self.rank_of(worker_id)
        live = [r for r, w in enumerate(self.workers) if w not in self.lost]
        gone = [r for r, w in enumerate(self.workers) if w in self.lost]
        if not gone or rank not in live:
            return [rank]
        return [rank, *(g for i, g in enumerate(gone) if live[i % len(live)] == rank)]

    def rank_of(self, worker_id: str) -> int:
        try:
            return self.workers.index(worker_id)
        except ValueError:
            raise NotAssigned(f"worker {worker_id} is not part of job {self.job_id}") from None

    def require_running(self) -> None:
        if self.state is not JobState.RUNNING:
            raise JobNotRunning(f"job {self.job_id} is {self.state.value}, not RUNNING")

    # --- parameters -----------------------------------------------------------

    def initialize(self, layout: Layout, payload: torch.Tensor, tables: dict[str, TableSpec] | None = None) -> bool:
        """Install the initial parameters and create the job's ``tables``; False when
        they already exist (InvalidArgument when the tables differ from those)."""
        tables = tables or {}
        if self.store is not None:
            held = self.tables.specs() if self.tables is not None else {}
            if held != tables:
                raise InvalidArgument(f"job {self.job_id} has the tables {sorted(held)}; this init declares "
                                      f"{sorted(tables)} (or differs in a table's shape or optimizer)")
            return False
        self.store = ParameterStore(layout, payload, self.spec.optimizer)
        self.tables = JobTables(tables, self.spec.seed) if tables else None
        if self.spec.synchronous:
            self.accumulator = GradientAccumulator(layout)
        self._maybe_aligned()
        self.cond.notify_all()
        return True

    @property
    def sharded(self) -> bool:
        """Whether the job's parameters are spread over several servers."""
        return bool(self.shards) or self.partition

    def _maybe_aligned(self) -> None:
        if self.on_aligned is not None and self.steps.global_step % self.aligned_every == 0:
            self.on_aligned(self)

    def roll_back(self, store: ParameterStore, clocks: dict[str, int], global_step: int,
                  finished: set[str], lineage: str, tables: JobTables | None = None) -> None:
        """Put the running job back to an earlier step in place: the parameters and
        optimizer of ``store`` and the embedding ``tables``, each worker's clock (by
        id) and whether it had finished (by name). Waiting pulls wake up and see the
        older step."""
        self.store = store
        self.tables = tables
        self.lineage = lineage
        self.accumulator = GradientAccumulator(store.layout) if self.spec.synchronous else None
        self.steps = StepClock.restored(self.spec.staleness, clocks, global_step)
        for worker in self.lost:
            self.steps.leave(worker)
        self._round_records.clear()
        self.snapshots.clear()
        self.pending_rows.clear()
        for rank, worker in enumerate(self.workers):
            p = self.progress[worker]
            p.finished = self.worker_names[rank] in finished
            p.step = min(p.step, global_step)
        kept = [row for row in self.history if row.step <= global_step]
        self.history.clear()
        self.history.extend(kept)
        self.timeline += 1
        if self.state is JobState.EVALUATING:  # training is not over after all
            self.evaluator = None
            self.set_state(JobState.RUNNING)
        self.emit("rolled back")

    def require_tables(self) -> JobTables:
        if self.tables is None:
            raise FailedPrecondition(f"job {self.job_id} has no embedding tables")
        return self.tables

    @property
    def threads(self) -> int:
        """Threads for this job's tensor work (psgrid.device.use_threads): one for a
        model of small tensors, torch's own count for large ones or embedding tables."""
        return self.store.threads if self.store is not None and self.tables is None else 0

    def require_store(self) -> ParameterStore:
        if self.store is None:
            raise FailedPrecondition(f"job {self.job_id} has no parameters yet")
        return self.store

    def ready_for(self, worker_id: str, clock: int, final: bool) -> bool:
        """True when a pull may be served (or must end because the job is over)."""
        if self.state.terminal:
            return True
        if self.store is None:
            return False
        if final:  # the evaluator once it may evaluate; training again after a roll-back or a
            # restore lost its last steps; the others wait for the end (answered at once then)
            return (self.state is JobState.EVALUATING and worker_id == self.evaluator) or (
                self.state is JobState.RUNNING and not self.progress[worker_id].finished)
        # The step served is the one this server expects the worker to compute
        # next, whatever it asked for: behind after a restore lost its last pushes,
        # ahead after it rejoined the barrier. The reply's clock says which.
        return self.state is JobState.RUNNING and self.steps.may_compute(worker_id, self.steps.clocks[worker_id])

    @contextlib.contextmanager
    def receiving(self, worker_id: str, cancel: Callable[[], object] | None) -> Iterator[torch.Tensor]:
        """This worker's reusable receive buffer (the size of the job's parameters), held
        while one push of it is received and applied. Caller holds no lock, and checked
        the push's layout against the job's.

        A worker has one push in flight per server; one still holding the buffer is
        stalled (abandoned after a timeout) or a stranger's. It is cancelled (its
        ``cancel``) and given HANDOVER_S to let go; Overloaded if it does not.
        """
        with self.cond:
            previous = self._receivers.get(worker_id)
            if previous is not None:
                if previous.cancel is not None:
                    previous.cancel()
                if not self._handover.wait_for(lambda: worker_id not in self._receivers, HANDOVER_S):
                    raise Overloaded(f"a push of {worker_id} is still being received; try again")
            mine = self._receivers[worker_id] = _Receiver(cancel)
            nbytes = self.require_store().layout.total_bytes
            buf = self.staging.get(worker_id)
            if buf is None or buf.numel() != nbytes:
                buf = self.staging[worker_id] = torch.empty(nbytes, dtype=torch.uint8)
        try:
            yield buf
        finally:
            with self.cond:
                if self._receivers.get(worker_id) is mine:
                    del self._receivers[worker_id]
                    self._handover.notify_all()

    def is_receiving(self, worker_id: str) -> bool:
        return worker_id in self._receivers

    def wire_buffer(self, worker_id: str, nbytes: int) -> torch.Tensor:
        """This worker's buffer for an encoded push, ``nbytes`` long; used only inside
        :meth:`receiving` (one push of a worker at a time), like its staging buffer."""
        with self.cond:
            buf = self.wire.get(worker_id)
            if buf is None or buf.numel() != nbytes:
                buf = self.wire[worker_id] = torch.empty(nbytes, dtype=torch.uint8)
            return buf

    def pull_buffer(self, worker_id: str, nbytes: int) -> torch.Tensor:
        """This worker's buffer for a 16-bit pull (caller holds ``cond``): rewritten only by
        its next pull, which it sends once it has read this one."""
        buf = self.pulls16.get(worker_id)
        if buf is None or buf.numel() != nbytes:
            buf = self.pulls16[worker_id] = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    # --- progress ---------------------------------------------------------------

    def report(self, worker_id: str, step: int, total_steps: int, loss: float,
               samples: int, seconds: float, metrics: dict[str, float] | None = None) -> None:
        p = self.progress[worker_id]
        p.step = step
        if not math.isnan(loss):
            p.loss = loss
        if seconds > 0:
            p.samples_per_sec = samples / seconds
        self.total_steps = max(self.total_steps, total_steps)
        self.emit("progress")
        info = self.events[-1].job
        self.history.append(HistoryRow(info.step, self.updated, info.loss, info.samples_per_sec,
                                       dict(metrics or {}), self.traffic.bytes_pushed, self.traffic.bytes_pulled))

    def worker_finished(self, worker_id: str) -> None:
        """The worker pushed its last step; ignored when that step was undone since (a reset or
        a roll-back between its push and this report): its final pull tells it to train again."""
        if self.steps.clocks.get(worker_id, 0) < self.total_steps:
            return
        self.progress[worker_id].finished = True
        self._maybe_done_training()

    def _maybe_done_training(self) -> None:
        """Training ends when every worker that is still around has finished."""
        done = all(p.finished or w in self.lost for w, p in self.progress.items())
        if done and len(self.lost) < len(self.workers) and self.state is JobState.RUNNING:
            self._designate_evaluator()
            self.set_state(JobState.EVALUATING)

    def _designate_evaluator(self) -> None:
        """Once training is over, the lowest-ranked worker still there evaluates."""
        live = [w for w in self.workers if w not in self.lost]
        self.evaluator = live[0] if live else None
        self.cond.notify_all()

    def evaluated(self, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)
        self.history.append(HistoryRow(self.steps.global_step if self.steps else 0, self._clock(),
                                       metrics=dict(metrics)))
        self.emit("metrics")
        self.set_state(JobState.SUCCEEDED)
