"""Recovery and realignment: what lets jobs outlive a crash of this server or of another shard.

:class:`Durability` restores every job from its newest valid checkpoint when
the server starts, checkpoints the jobs that changed, and puts this server's
part of a sharded BSP job back to a step-aligned snapshot (a restore point)
when the job's shards have drifted apart. How a job becomes a checkpoint and back is
:mod:`psgrid.server.recovery`; when snapshots are taken is
:mod:`psgrid.server.snapshots`.
"""
from __future__ import annotations

import dataclasses

import logging
import time

from psgrid.errors import PermissionDenied
from psgrid.server import recovery
from psgrid.server.checkpoint import JobCheckpoint
from psgrid.server.jobs import Job
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
            found = self._restore_job(job_id)
            if found is None:
                continue
            job, ckpt = found
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

    def _restore_job(self, job_id: str) -> tuple[Job, JobCheckpoint] | None:
        """``job_id`` rebuilt from its newest checkpoint that verifies and restores, and that
        checkpoint; None when there is none, or when its spec is outside the allow-list.

        A checkpoint that fails in any way is bad: it is logged and the one before tried.
        """
        allowed = self.state.config.allowed_modules
        for ckpt in self.state.checkpoints.verified(job_id):
            try:
                job = recovery.restore(ckpt)
            except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is unusable
                logger.warning("[ps] job %s checkpoint %d skipped: cannot restore the job from it: %s: %s",
                               job_id, ckpt.seq, type(exc).__name__, str(exc)[:500])
                continue
            try:
                job.spec.check_modules(allowed)
            except PermissionDenied as exc:  # the operator narrowed --allow-modules since
                logger.warning("[ps] job %s not restored: %s", job_id, exc)
                return None
            return job, ckpt
        logger.warning("[ps] job %s not restored: none of its checkpoints is usable", job_id)
        return None

    def checkpoint(self) -> int:
        """Checkpoint every job that changed since its last checkpoint (see
        :class:`~psgrid.server.snapshots.Snapshots`); return how many."""
        return self.state.snapshots.checkpoint_all(list(self.state.jobs.values()))

    def restore_points(self, job_id: str, worker_id: str) -> RestorePoints:
        """Where a sharded BSP job is here, and the step-aligned snapshots it can go back to."""
        job, _ = self.state.member(job_id, worker_id)
        at = self.state.snapshots.restore_points(job)
        with job.cond:
            return dataclasses.replace(at, clock=job.steps.clocks[worker_id])

    def roll_back(self, job_id: str, worker_id: str, step: int, lineage: str,
                  expect_timeline: int) -> tuple[int, bool]:
        """Put this server's part of a sharded BSP job back to its snapshot of (step, lineage)."""
        job, _ = self.state.member(job_id, worker_id)
        return self.state.snapshots.roll_back(job, (step, lineage), expect_timeline)
