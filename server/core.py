"""The parameter server's core: one facade over its parts, none of which knows gRPC.

The adapters in :mod:`psgrid.server.service` decode a request, call one method
here and encode the reply. Domain errors from :mod:`psgrid.errors` say what
went wrong. The work is done by collaborators sharing one
:class:`~psgrid.server.state.ServerState` (workers, jobs, their lock):

* :mod:`psgrid.server.scheduler`: registration, heartbeats, scheduling, submitting
  and cancelling jobs, the shards of sharded jobs;
* :mod:`psgrid.server.steps`: the step path, pull, push and worker reports;
* :mod:`psgrid.server.durability`: restore at start, checkpoints, rolling a
  sharded job back to a restore point;
* :mod:`psgrid.server.views`: read-only views of jobs, workers and weights.

What a caller sends is checked against :mod:`psgrid.limits` before any part
acts on it: plain arguments here, a push's header when it is built
(:class:`~psgrid.server.steps.PushHeader`), job specs when they are
(:class:`~psgrid.spec.JobSpec`), and ids where they are looked up
(:class:`~psgrid.server.state.ServerState`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from psgrid import limits
from psgrid.errors import InvalidArgument
from psgrid.server.checkpoint import CheckpointStore
from psgrid.server.config import ServerConfig
from psgrid.server.durability import Durability
from psgrid.server.jobs import Job
from psgrid.server.scheduler import Scheduler
from psgrid.server.state import ServerState, WorkerRecord
from psgrid.server.steps import PullResult, PushHeader, StepPath, in_place
from psgrid.server.views import Views
from psgrid.shm import SharedStore, Unavailable
from psgrid.sparse import TableSpec
from psgrid.spec import Assignment, HistoryRow, JobEvent, JobInfo, JobSpec, JobState, RestorePoints, WorkerStatus

logger = logging.getLogger(__name__)


#: Longest an idle worker's heartbeat waits for a job (the rest of its wait_s is ignored).
HEARTBEAT_WAIT_S = 5.0


class ParameterServerCore:
    """All jobs and workers of one parameter-server process. Thread-safe."""

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.time,
                 checkpoints: CheckpointStore | None = None):
        self.state = ServerState(config, clock, checkpoints)
        self.config = config
        self.checkpoints = checkpoints
        self.metrics = self.state.metrics
        self.snapshots = self.state.snapshots
        # The registry itself, not a copy: tests check that a refused call registered no one.
        self._workers = self.state.workers
        self._scheduler = Scheduler(self.state)
        self._steps = StepPath(self.state, self._scheduler)
        self._durability = Durability(self.state, self._scheduler)
        self._views = Views(self.state)

    def close(self) -> None:
        """Stop the snapshot writer and close the update log."""
        self.state.close()

    def job(self, job_id: str) -> Job:
        """The job ``job_id``; UnknownJob when there is none."""
        return self.state.job(job_id)

    def worker(self, worker_id: str) -> WorkerRecord:
        """The registered worker ``worker_id``; UnknownWorker when there is none."""
        return self.state.worker(worker_id)

    # --- workers and scheduling ----------------------------------------------------

    def register_worker(self, name: str, host: str, pid: int, device: str) -> WorkerRecord:
        """Register a worker; one registering under an earlier one's name takes back its rank."""
        limits.check_text(name, "worker name", limits.MAX_NAME_CHARS, empty=False)
        limits.check_text(host, "host", limits.MAX_HOST_CHARS)
        limits.check_text(device, "device", limits.MAX_DEVICE_CHARS)
        limits.check_count(pid, "pid")
        return self._scheduler.register_worker(name, host, pid, device)

    def reap(self) -> list[str]:
        """Drop workers that missed their heartbeats from their jobs' barriers."""
        return self._scheduler.reap()

    def retire(self) -> list[str]:
        """Release the finished jobs the retention policy no longer keeps in memory."""
        return self._scheduler.retire()

    def heartbeat(self, worker_id: str, job_id: str,
                  wait_s: float = 0.0) -> tuple[Assignment | None, JobState | None]:
        """Note the worker alive; hand it a job when it is idle and one waits (an idle
        worker's beat waits up to ``wait_s``, at most HEARTBEAT_WAIT_S, for one)."""
        return self._scheduler.heartbeat(worker_id, job_id, min(max(wait_s, 0.0), HEARTBEAT_WAIT_S))

    def submit(self, spec: JobSpec) -> JobInfo:
        """Queue a job; PermissionDenied when it names modules outside the allow-list."""
        return self._scheduler.submit(spec)

    def open_partition(self, job_id: str, spec: JobSpec, names: list[str]) -> None:
        """Hold one shard of a sharded job here (idempotent)."""
        limits.check_id(job_id)
        if not 1 <= len(names) <= spec.num_workers or len(set(names)) != len(names):
            raise InvalidArgument(f"a partition needs 1 to {spec.num_workers} distinct worker names "
                                  f"(the spec's num_workers), got {len(names)}")
        for name in names:
            limits.check_text(name, "worker name", limits.MAX_NAME_CHARS, empty=False)
        self._scheduler.open_partition(job_id, spec, names)

    def close_partition(self, job_id: str, worker_id: str, state: JobState) -> None:
        """End this shard's part of a job that ended on its coordinator."""
        self._scheduler.close_partition(job_id, worker_id, state)

    def cancel(self, job_id: str) -> JobInfo:
        """Cancel a job; a job already over stays as it was."""
        return self._scheduler.cancel(job_id)

    # --- the step path ------------------------------------------------------------

    def pull(self, job_id: str, worker_id: str, clock: int, final: bool, timeout_s: float,
             into: torch.Tensor | None = None, mapped: SharedStore | None = None) -> PullResult:
        """Wait until the worker may compute step ``clock``, then hand it the weights
        (``into``: where a needed copy goes; ``mapped``: the parameters the worker maps
        in shared memory; see StepPath.pull)."""
        limits.check_count(clock, "clock")
        return self._steps.pull(job_id, worker_id, clock, final, timeout_s, into, mapped)

    def payload_bytes(self, job_id: str, worker_id: str) -> int:
        """Bytes of the job's parameters on this server, for one of its workers."""
        job, _ = self.state.member(job_id, worker_id)
        with job.cond:
            return job.require_store().layout.total_bytes

    def shared_store(self, job_id: str, worker_id: str) -> SharedStore | None:
        """A running job's parameters in shared memory (moved there on the first ask), for
        one of its workers on this host; None when they are not read there (see
        steps.in_place; or no room: said once per job)."""
        job, _ = self.state.member(job_id, worker_id)
        with job.cond:
            store = job.require_store()
            if not in_place(job, False) or job.state.terminal or store.nbytes == 0:
                return None
            if store.shared is None and not job.unshareable:
                try:
                    store.share()
                except (Unavailable, OSError) as exc:
                    job.unshareable = True
                    logger.info("[ps] job %s: its parameters stay in private memory, copied for each "
                                "pull of a worker on this host: %s", job_id, exc)
            return store.shared

    def push(self, header: PushHeader, payload: Iterable[memoryview] | torch.Tensor,
             cancel: Callable[[], object] | None = None) -> tuple[int, bool]:
        """Receive, validate and apply one push; return (version, duplicate). ``cancel``
        ends its receipt when a later push of the same worker arrives (StepPath.push)."""
        return self._steps.push(header, payload, cancel)

    def pull_rows(self, job_id: str, worker_id: str, table: str, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Rows of ``ids`` of an embedding table as this server holds them, and the version."""
        return self._steps.pull_rows(job_id, worker_id, table, ids)

    def push_rows(self, job_id: str, worker_id: str, seq: int,
                  rows: dict[str, tuple[torch.Tensor, torch.Tensor]], part: int = 0, parts: int = 1) -> None:
        """Stage (part of) a worker's row gradients of step ``seq`` for its push of ``seq``."""
        self._steps.push_rows(job_id, worker_id, seq, rows, part, parts)

    def lookup_rows(self, job_id: str, table: str, ids: torch.Tensor) -> tuple[TableSpec, torch.Tensor]:
        """A client's read of rows of an embedding table held here: (the table, the rows)."""
        job = self.job(job_id)
        with job.cond:
            t = job.require_tables().table(table)
            limits.check_rows_reply(ids.numel(), t.spec)
            return t.spec, t.lookup(ids)

    def table_spec(self, job_id: str, table: str) -> TableSpec:
        """An embedding table of a job held here (NotFound/FailedPrecondition/InvalidArgument)."""
        job = self.job(job_id)
        with job.cond:
            return job.require_tables().table(table).spec

    def report(self, worker_id: str, job_id: str, phase: str, step: int, total_steps: int,
               loss: float, samples: int, seconds: float, metrics: dict[str, float],
               error: str) -> JobState:
        """Record a worker's progress; move the job on when it finished or failed.

        ``loss`` NaN means none was measured; ``error`` is kept to MAX_ERROR_CHARS."""
        for value, field in ((step, "step"), (total_steps, "total_steps"), (samples, "samples")):
            limits.check_count(value, field)
        limits.check_real(loss, "loss", nan=True)
        limits.check_real(seconds, "seconds", minimum=0.0)
        metrics = limits.check_metrics(metrics)
        return self._steps.report(worker_id, job_id, phase, step, total_steps, loss, samples, seconds,
                                  metrics, error[:limits.MAX_ERROR_CHARS])

    # --- recovery and realignment -----------------------------------------------------

    def restore(self) -> list[str]:
        """Load the newest valid checkpoint of every job found; return their ids."""
        return self._durability.restore()

    def checkpoint(self) -> int:
        """Checkpoint every job that changed since its last checkpoint; return how many."""
        return self._durability.checkpoint()

    def restore_points(self, job_id: str, worker_id: str) -> RestorePoints:
        """Where a sharded BSP job is here, and the step-aligned snapshots it can go back to."""
        return self._durability.restore_points(job_id, worker_id)

    def roll_back(self, job_id: str, worker_id: str, step: int, lineage: str,
                  expect_timeline: int) -> tuple[int, bool]:
        """Put this server's part of a sharded BSP job back to its snapshot of (step, lineage)."""
        limits.check_count(step, "step")
        limits.check_count(expect_timeline, "expect_timeline")
        limits.check_text(lineage, "lineage", limits.MAX_LINEAGE_CHARS)
        return self._durability.roll_back(job_id, worker_id, step, lineage, expect_timeline)

    # --- read-only views ------------------------------------------------------------

    def get(self, job_id: str) -> JobInfo:
        """The job's current info."""
        return self._views.get(job_id)

    def list_jobs(self) -> list[JobInfo]:
        """Every job's info, oldest first."""
        return self._views.list_jobs()

    def watch(self, job_id: str, from_seq: int, is_active: Callable[[], bool],
              poll_s: float = 1.0) -> Iterator[JobEvent]:
        """Yield the job's events from ``from_seq``; end once a terminal state is sent."""
        return self._views.watch(job_id, from_seq, is_active, poll_s)

    def history(self, job_id: str) -> list[HistoryRow]:
        """The job's training curve so far."""
        return self._views.history(job_id)

    def list_workers(self) -> list[WorkerStatus]:
        """Every registered worker, what it runs and how fast."""
        return self._views.list_workers()

    def fetch(self, job_id: str) -> PullResult:
        """A consistent copy of the job's current parameters."""
        return self._views.fetch(job_id)
