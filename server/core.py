"""The parameter server's core: workers, jobs, scheduling, push and pull.

Knows nothing of gRPC: the adapters in :mod:`psgrid.server.service` decode a
request, call one method here and encode the reply. Domain errors from
:mod:`psgrid.errors` say what went wrong.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator

import torch

from psgrid.codec import Layout, PayloadAssembler
from psgrid.errors import InvalidArgument, NotReady, PsgridError, UnknownJob, UnknownWorker
from psgrid.metrics import ServerMetrics
from psgrid.server import recovery
from psgrid.server.checkpoint import CheckpointStore
from psgrid.server.config import ServerConfig
from psgrid.server.jobs import Job
from psgrid.server.snapshots import Snapshots
from psgrid.server.store import check_finite
from psgrid.spec import (Assignment, HistoryRow, JobEvent, JobInfo, JobSpec, JobState, RestorePoints,
                         WorkerStatus)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerRecord:
    """What the server knows of one registered worker."""

    worker_id: str
    name: str
    host: str
    pid: int
    device: str
    registered_unix: float
    last_seen: float
    job_id: str | None = None


@dataclasses.dataclass(frozen=True)
class PushHeader:
    job_id: str
    worker_id: str
    seq: int
    base_version: int
    base_step: int
    init: bool
    layout: Layout
    #: Examples the gradient averages over (BSP weight).
    samples: int = 1


@dataclasses.dataclass(frozen=True)
class PullResult:
    """What a pull streams: the payload is None when the job is over."""

    state: JobState
    version: int
    step: int
    layout: Layout | None
    payload: torch.Tensor | None
    #: The step the server expects this worker to compute next.
    clock: int = 0
    #: The data shards (ranks) the worker computes this step on.
    ranks: tuple[int, ...] = ()
    #: BSP: digest of who contributed to each round so far (see Job.lineage).
    lineage: str = ""


class ParameterServerCore:
    """All jobs and workers of one parameter-server process. Thread-safe."""

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.time,
                 checkpoints: CheckpointStore | None = None):
        self.config = config
        self._clock = clock
        self.checkpoints = checkpoints
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._workers: dict[str, WorkerRecord] = {}
        self._pending: list[str] = []
        self.metrics = ServerMetrics()
        self.metrics.jobs.labels("ALL").set_function(lambda: len(self._jobs))
        self.metrics.workers.set_function(lambda: len(self._workers))
        self._update_log = open(config.update_log, "a", buffering=1) if config.update_log else None
        self.snapshots = Snapshots(checkpoints, config.checkpoint_every_steps, self._log_line)

    def close(self) -> None:
        self.snapshots.close()
        if self._update_log:
            self._update_log.close()

    # --- lookups ---------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id!r}")
        return job

    def worker(self, worker_id: str) -> WorkerRecord:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise UnknownWorker(f"no worker {worker_id!r}")
        return worker

    def _member(self, job_id: str, worker_id: str) -> tuple[Job, WorkerRecord]:
        worker = self.worker(worker_id)
        job = self.job(job_id)
        job.rank_of(worker_id)
        return job, worker

    # --- workers and scheduling ----------------------------------------------------

    def register_worker(self, name: str, host: str, pid: int, device: str) -> WorkerRecord:
        """Register a worker. A worker registering under the name of an earlier one
        is its new incarnation: it replaces the old id and takes back its job and rank."""
        now = self._clock()
        record = WorkerRecord(f"w-{uuid.uuid4().hex[:10]}", name, host, pid, device, now, now)
        with self._lock:
            for old in [w for w in self._workers.values() if w.name == name]:
                del self._workers[old.worker_id]
            self._workers[record.worker_id] = record
            for job in sorted(self._jobs.values(), key=lambda j: j.created, reverse=True):
                if self._take_over(job, record):
                    break
        logger.info("[ps] worker %s registered (%s, pid %d, %s)", record.worker_id, name, pid, device)
        self._schedule()
        return record

    def _take_over(self, job: Job, new: WorkerRecord) -> bool:
        """Give ``new`` the rank in ``job`` that a gone worker of the same name held."""
        with job.cond:
            if job.state.terminal:
                return False
            for rank, name in enumerate(job.worker_names):
                old = job.workers[rank]
                if name == new.name and old not in self._workers:
                    job.replace_worker(old, new.worker_id)
                    new.job_id = job.job_id
                    logger.info("[ps] worker %s (%s) takes back rank %d of job %s at step %d",
                                new.worker_id, name, rank, job.job_id, job.steps.clocks[new.worker_id])
                    return True
        return False

    def reap(self) -> list[str]:
        """Drop workers that missed their heartbeats from their jobs' barriers."""
        now, lost = self._clock(), []
        for worker in list(self._workers.values()):
            job = self._jobs.get(worker.job_id) if worker.job_id else None
            if job is None or self._alive(worker, now):
                continue
            with job.cond:
                if worker.worker_id in job.workers and worker.worker_id not in job.lost:
                    job.worker_lost(worker.worker_id)
                    lost.append(worker.worker_id)
                    self._log_applied(job)
        for job in list(self._jobs.values()):
            with job.cond:
                for stand_in in job.overdue(now, self.config.heartbeat_timeout_s):
                    job.worker_lost(stand_in)
                    lost.append(stand_in)
                    self._log_applied(job)
        for worker_id in lost:
            logger.warning("[ps] worker %s missed its heartbeats: it leaves the barrier", worker_id)
        return lost

    def heartbeat(self, worker_id: str, job_id: str) -> tuple[Assignment | None, JobState | None]:
        """Note the worker alive; hand it a job when it is idle and one waits."""
        worker = self.worker(worker_id)
        worker.last_seen = self._clock()
        self._mark_back(worker)
        self._schedule()
        state = None
        if job_id:
            job = self.job(job_id)
            state = job.state
        assignment = None
        current = worker.job_id
        if current and current != job_id:
            job = self._jobs[current]
            with job.cond:
                assignment = Assignment(current, job.rank_of(worker_id), len(job.workers), job.spec,
                                        job.steps.clocks[worker_id], job.shards, tuple(job.worker_names))
        return assignment, state

    def _mark_back(self, worker: WorkerRecord) -> None:
        job = self._jobs.get(worker.job_id) if worker.job_id else None
        if job is not None and worker.worker_id in job.lost:
            with job.cond:
                job.worker_back(worker.worker_id)
            logger.info("[ps] worker %s is back: it rejoins job %s", worker.worker_id, job.job_id)

    def _alive(self, worker: WorkerRecord, now: float) -> bool:
        return now - worker.last_seen <= self.config.heartbeat_timeout_s

    def _schedule(self) -> None:
        """Start pending jobs, oldest first, on idle live workers."""
        with self._lock:
            now = self._clock()
            for job_id in list(self._pending):
                job = self._jobs[job_id]
                if job.state is not JobState.PENDING:
                    self._pending.remove(job_id)
                    continue
                idle = [w for w in self._workers.values() if w.job_id is None and self._alive(w, now)]
                if len(idle) < job.spec.num_workers:
                    break
                chosen = idle[: job.spec.num_workers]
                for w in chosen:
                    w.job_id = job_id
                self._pending.remove(job_id)
                with job.cond:
                    job.start([w.worker_id for w in chosen], [w.name for w in chosen])
                logger.info("[ps] job %s started on %s", job_id, ", ".join(job.workers))

    def _release(self, job: Job) -> None:
        """Return a finished job's workers to the idle pool, once its end is on disk:
        a server restarted a moment later must not bring the job back as running."""
        self.snapshots.save_end(job)
        with self._lock:
            for w in self._workers.values():
                if w.job_id == job.job_id:
                    w.job_id = None
        self._schedule()

    # --- checkpoints ---------------------------------------------------------------------

    def restore(self) -> list[str]:
        """Load the newest valid checkpoint of every job found; return their ids."""
        checkpoints = self.checkpoints
        restored, job_ids = [], checkpoints.job_ids()
        if job_ids:
            logger.info("[ps] restoring %d job(s) from %s", len(job_ids), checkpoints.directory)
        for index, job_id in enumerate(job_ids, start=1):
            started = time.monotonic()
            ckpt = checkpoints.load_latest(job_id)
            if ckpt is None:
                continue
            job = recovery.restore(ckpt)
            self.snapshots.restored(job, ckpt)
            with self._lock:
                self._jobs[job_id] = job
                if job.state is JobState.PENDING:
                    self._pending.append(job_id)
            self._log_line({"event": "restore", "job_id": job_id, "checkpoint": ckpt.seq,
                            "version": job.store.version if job.store else 0})
            logger.info("[ps] restored %d/%d: job %s from checkpoint %d (%s, version %d, %.1f MB in %.2fs)",
                        index, len(job_ids), job_id, ckpt.seq, job.state.value,
                        job.store.version if job.store else 0,
                        (job.store.nbytes if job.store else 0) / 1e6, time.monotonic() - started)
            restored.append(job_id)
        self._schedule()
        return restored

    def checkpoint(self) -> int:
        """Checkpoint every job that changed since its last checkpoint (see
        :class:`~psgrid.server.snapshots.Snapshots`); return how many."""
        return self.snapshots.checkpoint_all(list(self._jobs.values()))

    def restore_points(self, job_id: str, worker_id: str) -> RestorePoints:
        """Where a sharded BSP job is here, and the step-aligned snapshots it can go back to."""
        job, _ = self._member(job_id, worker_id)
        return self.snapshots.restore_points(job)

    def roll_back(self, job_id: str, worker_id: str, step: int, lineage: str,
                  expect_timeline: int) -> tuple[int, bool]:
        """Put this server's part of a sharded BSP job back to its snapshot of (step, lineage)."""
        job, _ = self._member(job_id, worker_id)
        return self.snapshots.roll_back(job, (step, lineage), expect_timeline)

    # --- jobs --------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobInfo:
        """Queue a job; PermissionDenied when it names modules outside the allow-list."""
        spec.check_modules(self.config.allowed_modules)
        job = Job(f"job-{uuid.uuid4().hex[:10]}", spec, clock=self._clock, shards=self.config.shards)
        self.snapshots.align(job)
        with self._lock:
            self._jobs[job.job_id] = job
            self._pending.append(job.job_id)
        logger.info("[ps] job %s submitted: %s on %s, %d workers, staleness %s",
                    job.job_id, spec.model, spec.dataset, spec.num_workers, spec.staleness)
        self._schedule()
        with job.cond:
            return job.info()

    def open_partition(self, job_id: str, spec: JobSpec, names: list[str]) -> None:
        """Hold one shard of a sharded job here (idempotent).

        The job's workers take their ranks by name, as after a restore: the
        ones registered already now, the others when they register.
        """
        spec.check_modules(self.config.allowed_modules)
        with self._lock:
            if job_id in self._jobs:
                return
            job = Job(job_id, spec, clock=self._clock, partition=True)
            self.snapshots.align(job)
            with job.cond:
                job.open_away(names)
                job.set_state(JobState.RUNNING)
            self._jobs[job_id] = job
            now = self._clock()
            for worker in self._workers.values():
                # Only a live registration: a stale one (the worker has not talked
                # to this shard since its last job) would be dropped from the
                # barrier at once, while the coordinator still counts it.
                if worker.name in names and worker.job_id is None and self._alive(worker, now):
                    self._take_over(job, worker)
        logger.info("[ps] holding a shard of job %s for %d workers", job_id, len(names))

    def close_partition(self, job_id: str, worker_id: str, state: JobState) -> None:
        """End this shard's part of a job that ended on its coordinator."""
        job, _ = self._member(job_id, worker_id)
        if not state.terminal:
            raise InvalidArgument(f"a partition closes with a terminal state, not {state.value}")
        with job.cond:
            moved = job.set_state(state)
        if moved:
            self._release(job)

    def get(self, job_id: str) -> JobInfo:
        job = self.job(job_id)
        with job.cond:
            return job.info()

    def list_jobs(self) -> list[JobInfo]:
        jobs = sorted(self._jobs.values(), key=lambda j: j.created)
        out = []
        for job in jobs:
            with job.cond:
                out.append(job.info())
        return out

    def cancel(self, job_id: str) -> JobInfo:
        job = self.job(job_id)
        with job.cond:
            moved = job.set_state(JobState.CANCELLED)
            info = job.info()
        if moved:
            logger.info("[ps] job %s cancelled", job_id)
            self._release(job)
        return info

    def watch(self, job_id: str, from_seq: int, is_active: Callable[[], bool],
              poll_s: float = 1.0) -> Iterator[JobEvent]:
        """Yield the job's events from ``from_seq``; end once a terminal state is sent."""
        job = self.job(job_id)
        with job.cond:
            # A watcher ahead of the log is back from before a restart: the
            # events after the checkpoint were lost, so start from what is new.
            seq = min(from_seq, job.next_event)
        while is_active():
            with job.cond:
                events = job.events_from(seq)
                if not events:
                    job.cond.wait(poll_s)
                    continue
            for event in events:
                yield event
                seq = event.seq + 1
                if event.job.state.terminal and event.kind == "state":
                    return

    def history(self, job_id: str) -> list[HistoryRow]:
        job = self.job(job_id)
        with job.cond:
            return list(job.history)

    def list_workers(self) -> list[WorkerStatus]:
        """Every registered worker, what it runs and how fast."""
        now, out = self._clock(), []
        for w in sorted(self._workers.values(), key=lambda w: w.name):
            status = WorkerStatus(w.worker_id, w.name, w.host, w.pid, w.device,
                                  last_seen_s=max(0.0, now - w.last_seen))
            job = self._jobs.get(w.job_id) if w.job_id else None
            if job is not None:
                with job.cond:
                    if w.worker_id in job.workers:
                        p = job.progress[w.worker_id]
                        status = dataclasses.replace(
                            status, job_id=job.job_id, rank=job.rank_of(w.worker_id), step=p.step,
                            samples_per_sec=0.0 if p.finished else p.samples_per_sec,
                            lost=w.worker_id in job.lost)
            out.append(status)
        return out

    def fetch(self, job_id: str) -> PullResult:
        """A consistent copy of the job's current parameters."""
        job = self.job(job_id)
        with job.cond:
            store = job.require_store()
            payload = store.snapshot_into(None)
            return PullResult(job.state, store.version, job.steps.global_step, store.layout, payload)

    # --- pull and push -----------------------------------------------------------------

    def pull(self, job_id: str, worker_id: str, clock: int, final: bool, timeout_s: float) -> PullResult:
        """Wait until the worker may compute step ``clock``, then hand it the weights."""
        job, worker = self._member(job_id, worker_id)
        worker.last_seen = self._clock()
        self._mark_back(worker)
        with job.cond:
            if not job.cond.wait_for(lambda: job.ready_for(worker_id, clock, final), timeout_s):
                raise NotReady(f"step {clock} of {worker_id} is not ready yet")
            step = job.steps.global_step
            clock = job.steps.clocks[worker_id]  # the truth: ahead after a rejoin, behind after a restore
            if job.state.terminal or (final and (job.state is not JobState.EVALUATING
                                                 or worker_id != job.evaluator)):
                # Over, evaluated by another worker, or (final while RUNNING) this
                # worker has steps to compute again: no weights in this reply.
                return PullResult(job.state, job.store.version if job.store else 0, step, None, None, clock)
            store = job.store
            if job.spec.synchronous or final:
                # Nothing writes the parameters until this worker pushes again.
                payload = store.flat
            else:
                payload = job.snapshots[worker_id] = store.snapshot_into(job.snapshots.get(worker_id))
            self.metrics.pulls.labels(job_id).inc()
            self.metrics.bytes_out.inc(store.layout.total_bytes)
            return PullResult(job.state, store.version, step, store.layout, payload, clock,
                              tuple(job.coverage(worker_id)), job.lineage)

    def push(self, header: PushHeader, payload: Iterable[memoryview]) -> tuple[int, bool]:
        """Receive, validate and apply one push; return (version, duplicate).

        Nothing changes unless the whole payload arrived and passed every check.
        """
        try:
            version, duplicate = self._push(header, payload)
        except PsgridError as exc:
            self.metrics.rejected.labels(type(exc).__name__).inc()
            raise
        self.metrics.bytes_in.inc(header.layout.total_bytes)
        if not header.init:
            (self.metrics.duplicates if duplicate else self.metrics.pushes).labels(header.job_id).inc()
        return version, duplicate

    def _push(self, header: PushHeader, payload: Iterable[memoryview]) -> tuple[int, bool]:
        job, worker = self._member(header.job_id, header.worker_id)
        # A worker dropped from the barrier rejoins before its push counts: a late
        # gradient for a round applied without it is then a duplicate, not a
        # contribution to the next round.
        worker.last_seen = self._clock()
        self._mark_back(worker)
        with job.push_locks[header.worker_id]:
            if header.init:
                return self._push_init(job, header, payload)
            with job.cond:
                job.require_running()
                job.require_store().layout.check_matches(header.layout)
                duplicate = job.steps.is_duplicate(header.worker_id, header.seq)
                if not duplicate:
                    job.steps.check_push(header.worker_id, header.seq)
            buffer = job.staging_for(header.worker_id, header.layout.total_bytes)
            self._receive(header.layout, buffer, payload)
            if duplicate:
                return job.store.version, True
            grads = header.layout.views(buffer)
            check_finite(grads)
            started = time.perf_counter()
            with job.cond:
                job.require_running()
                record = job.accept_gradient(
                    header.worker_id, header.seq, header.base_version, header.base_step, grads,
                    header.samples,
                )
                self._log_applied(job)
            self.metrics.apply_seconds.observe(time.perf_counter() - started)
            self.metrics.staleness.observe(record.staleness)
            return record.version, False

    def _push_init(self, job: Job, header: PushHeader, payload: Iterable[memoryview]) -> tuple[int, bool]:
        with job.cond:
            job.require_running()
            if job.store is not None:
                job.store.layout.check_matches(header.layout)
        buffer = torch.empty(header.layout.total_bytes, dtype=torch.uint8)
        self._receive(header.layout, buffer, payload)
        with job.cond:
            created = job.initialize(header.layout, buffer)
            version = job.store.version
        if created:
            logger.info("[ps] job %s initialised: %d tensors, %d bytes",
                        job.job_id, len(header.layout.tensors), header.layout.total_bytes)
        return version, not created

    @staticmethod
    def _receive(layout: Layout, buffer: torch.Tensor, payload: Iterable[memoryview]) -> None:
        assembler = PayloadAssembler(layout, buffer)
        for piece in payload:
            assembler.feed(piece)
        assembler.finish()

    def _log_applied(self, job: Job) -> None:
        """Write the job's newly applied updates to the update log (under its lock, in order)."""
        for record in job.take_applied():
            self._log_line({"event": "update", **dataclasses.asdict(record)})

    def _log_line(self, entry: dict) -> None:
        if self._update_log:
            self._update_log.write(json.dumps(entry) + "\n")

    # --- worker reports ------------------------------------------------------------------

    def report(self, worker_id: str, job_id: str, phase: str, step: int, total_steps: int,
               loss: float, samples: int, seconds: float, metrics: dict[str, float],
               error: str) -> JobState:
        """Record a worker's progress; move the job on when it finished or failed."""
        job, _ = self._member(job_id, worker_id)
        ended = False
        with job.cond:
            if phase == "FAILED":
                ended = job.set_state(JobState.FAILED, f"worker {worker_id}: {error}")
            elif not job.state.terminal:
                job.report(worker_id, step, total_steps, loss, samples, seconds,
                           metrics if phase == "TRAINING" else None)
                if phase == "FINISHED":
                    job.worker_finished(worker_id)
                elif phase == "EVALUATED":
                    if worker_id != job.evaluator or job.state is not JobState.EVALUATING:
                        raise InvalidArgument("only the designated evaluator reports evaluation, after training")
                    job.evaluated(metrics)
                    ended = True
            state = job.state
        if ended:
            logger.info("[ps] job %s %s", job_id, state.value)
            self._release(job)
        return state
