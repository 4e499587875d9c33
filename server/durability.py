"""Recovery and realignment: what lets jobs outlive a crash of this server or of another shard.

:class:`Durability` restores every job from its newest valid checkpoint when
the server starts, checkpoints the jobs that changed, and puts this server's
part of a sharded BSP job back to a step-aligned snapshot (a restore point)
when the job's shards have drifted apart. How a job becomes a checkpoint and back is
:mod:`psgrid.server.recovery`; when snapshots are taken is
:mod:`psgrid.server.snapshots`.
"""
from __future__ import annotations

import logging
import time

from psgrid.server import recovery
from psgrid.server.scheduler import Scheduler
from psgrid.server.state import ServerState
from psgrid.spec import JobState, RestorePoints

logger = logging.getLogger(__name__)


class Durability:
    """Restores, checkpoints and rolls back the jobs of one server."""

    def __init__(self, state: ServerState, scheduler: Scheduler):
        self.state = state
        self.scheduler = scheduler

    def restore(self) -> list[str]:
        """Load the newest valid checkpoint of every job found; return their ids."""
        state = self.state
        checkpoints = state.checkpoints
        restored, job_ids = [], checkpoints.job_ids()
        if job_ids:
            logger.info("[ps] restoring %d job(s) from %s", len(job_ids), checkpoints.directory)
        for index, job_id in enumerate(job_ids, start=1):
            started = time.monotonic()
            ckpt = checkpoints.load_latest(job_id)
            if ckpt is None:
                continue
            job = recovery.restore(ckpt)
            state.snapshots.restored(job, ckpt)
            with state.lock:
                state.jobs[job_id] = job
                if job.state is JobState.PENDING:
                    state.pending.append(job_id)
            state.log_line({"event": "restore", "job_id": job_id, "checkpoint": ckpt.seq,
                            "version": job.store.version if job.store else 0})
            logger.info("[ps] restored %d/%d: job %s from checkpoint %d (%s, version %d, %.1f MB in %.2fs)",
                        index, len(job_ids), job_id, ckpt.seq, job.state.value,
                        job.store.version if job.store else 0,
                        (job.store.nbytes if job.store else 0) / 1e6, time.monotonic() - started)
            restored.append(job_id)
        self.scheduler.schedule()
        return restored

    def checkpoint(self) -> int:
        """Checkpoint every job that changed since its last checkpoint (see
        :class:`~psgrid.server.snapshots.Snapshots`); return how many."""
        return self.state.snapshots.checkpoint_all(list(self.state.jobs.values()))

    def restore_points(self, job_id: str, worker_id: str) -> RestorePoints:
        """Where a sharded BSP job is here, and the step-aligned snapshots it can go back to."""
        job, _ = self.state.member(job_id, worker_id)
        return self.state.snapshots.restore_points(job)

    def roll_back(self, job_id: str, worker_id: str, step: int, lineage: str,
                  expect_timeline: int) -> tuple[int, bool]:
        """Put this server's part of a sharded BSP job back to its snapshot of (step, lineage)."""
        job, _ = self.state.member(job_id, worker_id)
        return self.state.snapshots.roll_back(job, (step, lineage), expect_timeline)
