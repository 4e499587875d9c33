"""What the parts of a parameter server share: its workers, jobs and queue, their lock, the update log.

:class:`ServerState` is the one object the scheduler, the step path, recovery
and the read-only views behind :class:`~psgrid.server.core.ParameterServerCore`
all work on; it also holds the lookups and small helpers they have in common.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable

from psgrid.errors import UnknownJob, UnknownWorker
from psgrid.limits import check_id
from psgrid.metrics import ServerMetrics
from psgrid.server.checkpoint import CheckpointStore
from psgrid.server.config import ServerConfig
from psgrid.server.jobs import Job
from psgrid.server.retention import Ended, ReleasedJob, ReleasedJobs
from psgrid.server.snapshots import Snapshots

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


class ServerState:
    """The workers, jobs and pending queue of one server process, and what guards them."""

    def __init__(self, config: ServerConfig, clock: Callable[[], float],
                 checkpoints: CheckpointStore | None):
        self.config = config
        self.clock = clock
        self.checkpoints = checkpoints
        #: Taken to change ``jobs``, ``workers``, ``pending`` or a worker's job;
        #: taken before a ``job.cond``, never while holding one.
        self.lock = threading.Lock()
        #: Ids in ``jobs`` and ``workers`` follow the id rule (psgrid.limits.check_id):
        #: made here or checked where they come in, so only a lookup that misses checks one.
        self.jobs: dict[str, Job] = {}
        self.workers: dict[str, WorkerRecord] = {}
        #: Ids of the jobs waiting for workers, oldest first.
        self.pending: list[str] = []
        #: Finished jobs still in ``jobs``: when each was first seen over (see retention).
        self.ended: dict[str, Ended] = {}
        #: What is left of the finished jobs released from memory.
        self.released = ReleasedJobs()
        self.metrics = ServerMetrics()
        self.metrics.jobs.labels("ALL").set_function(lambda: len(self.jobs))
        self.metrics.workers.set_function(lambda: len(self.workers))
        self._update_log = open(config.update_log, "a", buffering=1) if config.update_log else None
        self.snapshots = Snapshots(checkpoints, config.checkpoint_every_steps, self.log_line)

    def close(self) -> None:
        """Stop the snapshot writer and close the update log."""
        self.snapshots.close()
        if self._update_log:
            self._update_log.close()

    # --- lookups ---------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """The job ``job_id``, in memory; UnknownJob when there is none, saying so
        when it ended and was released."""
        job = self.jobs.get(job_id)
        if job is None:
            self.released_job(job_id)
            raise UnknownJob(f"job {job_id} ended and was released from this server's memory")
        return job

    def released_job(self, job_id: str) -> ReleasedJob:
        """What is left of the released job ``job_id``; UnknownJob when there is none
        (InvalidId when ``job_id`` could name none: a lookup that misses checks the id)."""
        released = self.released.get(job_id)
        if released is None:
            check_id(job_id)
            raise UnknownJob(f"no job {job_id!r}")
        return released

    def worker(self, worker_id: str) -> WorkerRecord:
        """The registered worker ``worker_id``; UnknownWorker when there is none
        (InvalidId when ``worker_id`` could name none)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            check_id(worker_id, "worker id")
            raise UnknownWorker(f"no worker {worker_id!r}")
        return worker

    def member(self, job_id: str, worker_id: str) -> tuple[Job, WorkerRecord]:
        """The job and the worker, which must hold a rank in it."""
        worker = self.worker(worker_id)
        job = self.job(job_id)
        job.rank_of(worker_id)
        return job, worker

    # --- liveness --------------------------------------------------------------

    def alive(self, worker: WorkerRecord, now: float) -> bool:
        """Whether the worker was heard from within the heartbeat timeout."""
        return now - worker.last_seen <= self.config.heartbeat_timeout_s

    def mark_back(self, worker: WorkerRecord) -> None:
        """Let a worker dropped from its job's barrier rejoin it."""
        job = self.jobs.get(worker.job_id) if worker.job_id else None
        if job is not None and worker.worker_id in job.lost:
            with job.cond:
                job.worker_back(worker.worker_id)
            logger.info("[ps] worker %s is back: it rejoins job %s", worker.worker_id, job.job_id)

    # --- update log ------------------------------------------------------------

    def log_applied(self, job: Job) -> None:
        """Write the job's newly applied updates to the update log (under its lock, in
        order); the job keeps none of them."""
        applied = job.take_applied()
        if self._update_log:
            for record in applied:
                self.log_line({"event": "update", **vars(record)})  # flat: no asdict deep copy

    def log_line(self, entry: dict) -> None:
        """Append one JSON line to the update log, when there is one, marked with this
        server's ``shard_name`` (docs/operations.md, "The update log")."""
        if self._update_log:
            line = {"event": entry["event"], "shard": self.config.shard_name, **entry}
            self._update_log.write(json.dumps(line) + "\n")
