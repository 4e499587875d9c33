"""When jobs are checkpointed, and how a sharded job's shard goes back in step.

Two policies share one writer:

* **By time.** Every job whose version or state changed is checkpointed every
  ``checkpoint_interval_s`` (the app's timer calls :meth:`Snapshots.checkpoint_all`),
  once more on shutdown, and at once when it ends (:meth:`Snapshots.save_end`).
* **By step.** A running sharded synchronous job is checkpointed only every
  ``checkpoint_every_steps`` steps, the same steps on every shard, at the round
  boundary (:meth:`Snapshots.align`): the newest two such snapshots stay in
  memory too. They are the *restore points* from which the shards of a job that
  drifted apart are all put back to one step (:meth:`Snapshots.roll_back`;
  docs/design.md, "putting the shards back in step").

Every snapshot is stamped when taken, under the job's lock, and a snapshot
older than one already written, or taken before a roll-back (another
*timeline*), is never written. Lock order: ``_save_lock``, then ``job.cond``,
then ``_unsaved_lock``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from psgrid.errors import FailedPrecondition, JobNotRunning, UnknownCheckpoint
from psgrid.server import recovery
from psgrid.server.checkpoint import CheckpointStore, JobCheckpoint
from psgrid.server.jobs import Job
from psgrid.spec import JobState, RestorePoints

logger = logging.getLogger(__name__)

Point = tuple[int, str]


def point_of(meta: dict) -> Point:
    """The (step, lineage) a checkpoint's meta describes."""
    return meta["global_step"], meta.get("lineage", "")


class Snapshots:
    """The checkpoint policies of one parameter server (``store`` None: in memory only)."""

    def __init__(self, store: CheckpointStore | None, every_steps: int,
                 log_line: Callable[[dict], None] = lambda entry: None):
        self.store = store
        self.every_steps = every_steps
        self._log_line = log_line
        #: One checkpoint write at a time (by time, by step, at the end, on shutdown).
        self._save_lock = threading.Lock()
        #: Writes the step-aligned checkpoints off the push path.
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="ps-aligned") if store else None
        #: The newest aligned snapshot of each job waiting for the saver.
        self._unsaved: dict[str, tuple] = {}
        self._unsaved_lock = threading.Lock()
        #: The stamp of the newest snapshot written, per job.
        self._saved_stamp: dict[str, int] = {}
        #: (version, state) of each job's newest checkpoint: unchanged jobs are skipped.
        self._checkpointed: dict[str, tuple[int, JobState]] = {}

    def close(self) -> None:
        """Finish the writes under way (after the final :meth:`checkpoint_all`)."""
        if self._saver is not None:
            self._saver.shutdown(wait=True)

    # --- by time -------------------------------------------------------------------

    def restored(self, job: Job, ckpt: JobCheckpoint) -> None:
        """``job`` was just rebuilt from ``ckpt``: follow it from there."""
        self.align(job)
        if job.on_aligned is not None and ckpt.meta.get("aligned"):
            job.aligned.append(ckpt)
        self._checkpointed[job.job_id] = (job.store.version if job.store else 0, job.state)

    def checkpoint_all(self, jobs: Iterable[Job]) -> int:
        """Checkpoint every job whose version or state changed since its last one,
        except running sharded synchronous jobs (checkpointed by step); return how many."""
        saved = 0
        for job in jobs:
            with job.cond:
                key = (job.store.version if job.store else 0, job.state)
                if self._checkpointed.get(job.job_id) == key:
                    continue
                if job.on_aligned is not None and job.state is JobState.RUNNING:
                    continue
                taken = self._snapshot(job)
            if self._save(job, *taken):
                saved += 1
        return saved

    def save_end(self, job: Job) -> None:
        """Checkpoint a job that just ended, now: a server restarted a moment later
        must not bring it back as running."""
        if self.store is None:
            return
        with job.cond:
            taken = self._snapshot(job)
        try:
            self._save(job, *taken)
        except Exception:  # noqa: BLE001 - the periodic checkpoint tries again
            logger.exception("[ps] job %s: could not checkpoint its end", job.job_id)

    @staticmethod
    def _snapshot(job: Job, aligned: bool = False) -> tuple[JobCheckpoint, int, int]:
        """A checkpoint of ``job`` now, its timeline and its stamp; call under ``job.cond``."""
        job.snapshot_stamp += 1
        return recovery.snapshot(job, 0, aligned=aligned), job.timeline, job.snapshot_stamp

    def _save(self, job: Job, ckpt: JobCheckpoint, timeline: int, stamp: int) -> bool:
        """Write ``ckpt`` as the job's newest checkpoint, unless it is stale: taken
        before a roll-back, or before a snapshot already written."""
        with self._save_lock:
            return self._write(job, ckpt, timeline, stamp)

    def _write(self, job: Job, ckpt: JobCheckpoint, timeline: int, stamp: int) -> bool:
        """:meth:`_save` with ``_save_lock`` held."""
        if job.timeline != timeline or stamp <= self._saved_stamp.get(job.job_id, 0):
            return False
        ckpt = dataclasses.replace(ckpt, seq=self.store.next_seq(job.job_id))
        self.store.save(ckpt)
        self._saved_stamp[job.job_id] = stamp
        self._checkpointed[job.job_id] = (ckpt.meta["version"], JobState(ckpt.meta["state"]))
        return True

    # --- by step -------------------------------------------------------------------

    def align(self, job: Job) -> None:
        """Snapshot ``job`` by step if it is a sharded synchronous job (see the module doc)."""
        if not (job.sharded and job.spec.synchronous):
            return
        job.aligned_every = self.every_steps
        job.on_aligned = self._aligned

    def _aligned(self, job: Job) -> None:
        # Under job.cond, at a round boundary: copy now, write in the background
        # (only the newest snapshot waiting for the disk is kept).
        taken = self._snapshot(job, aligned=True)
        job.aligned.append(taken[0])
        if self._saver is None:
            return
        with self._unsaved_lock:
            fresh = job.job_id not in self._unsaved
            self._unsaved[job.job_id] = (job, *taken)
        if fresh:
            try:
                self._saver.submit(self._write_unsaved, job.job_id)
            except RuntimeError:  # shutting down: nothing more is written
                pass

    def _write_unsaved(self, job_id: str) -> None:
        with self._unsaved_lock:
            entry = self._unsaved.pop(job_id, None)
        if entry is None:
            return
        try:
            self._save(*entry)
        except Exception:  # noqa: BLE001 - the next aligned step tries again
            logger.exception("[ps] job %s: step-aligned checkpoint failed", job_id)

    def _on_disk(self, job_id: str) -> list[tuple[int, dict]]:
        """(seq, meta) of the job's checkpoints whose meta is usable (the others are
        bad: logged and left out); call under ``_save_lock``."""
        found = self.store.manifests(job_id) if self.store else []
        return [(seq, meta) for seq, meta in found if recovery.usable_meta(job_id, seq, meta)]

    def _aligned_on_disk(self, job_id: str) -> list[tuple[int, dict]]:
        """(seq, meta) of the job's usable step-aligned checkpoints; call under ``_save_lock``."""
        return [(seq, meta) for seq, meta in self._on_disk(job_id) if meta.get("aligned")]

    # --- going back ----------------------------------------------------------------

    def restore_points(self, job: Job) -> RestorePoints:
        """Where the job is, and the step-aligned snapshots it can go back to."""
        with job.cond:
            now = RestorePoints(job.steps.global_step, job.lineage, job.timeline)
            held = {point_of(c.meta) for c in job.aligned}
        with self._save_lock:
            held |= {point_of(meta) for _, meta in self._aligned_on_disk(job.job_id)}
        return dataclasses.replace(now, points=tuple(sorted(held)))

    def roll_back(self, job: Job, point: Point, expect_timeline: int) -> tuple[int, bool]:
        """Put ``job`` back to its snapshot ``point`` (step, lineage); return (step, moved).

        Compare-and-set on the job's timeline: nothing happens if someone rolled it
        back since the caller listed its restore points (workers realigning at
        once move each shard once). Checkpoints of later steps, or of that step in
        another lineage, are deleted: they belong to a history that no longer is.
        """
        step = point[0]
        requeue = None
        with self._save_lock:
            with job.cond:
                _check_roll_back(job)
                if job.timeline != expect_timeline:
                    return job.steps.global_step, False
                ckpt = next((c for c in reversed(job.aligned) if point_of(c.meta) == point), None)
            on_disk = self._aligned_on_disk(job.job_id)
            if ckpt is None:
                ckpt = self._load_point(job.job_id, on_disk, point)
            with job.cond:
                _check_roll_back(job)
                if job.timeline != expect_timeline:
                    return job.steps.global_step, False
                before = job.steps.global_step
                recovery.roll_back(job, ckpt)
                kept = [c for c in job.aligned if c.meta["global_step"] < step and c is not ckpt]
                job.aligned.clear()
                job.aligned.extend([*kept, ckpt])
                version = job.store.version
                if self.store is not None and not any(point_of(meta) == point for _, meta in on_disk):
                    # its pending save (if any) is of the old timeline now: write it anew
                    job.snapshot_stamp += 1
                    requeue = (job, ckpt, job.timeline, job.snapshot_stamp)
            if self.store is not None:
                self.store.discard(job.job_id, [
                    seq for seq, meta in self._on_disk(job.job_id)
                    if meta["global_step"] > step or (meta["global_step"] == step and point_of(meta) != point)])
                if requeue is not None:
                    self._write(*requeue)
            self._checkpointed[job.job_id] = (version, JobState.RUNNING)
        self._log_line({"event": "restore", "job_id": job.job_id, "checkpoint": ckpt.seq, "version": version})
        logger.warning("[ps] job %s put back from step %d to step %d, in step with its other shards",
                       job.job_id, before, step)
        return step, True

    def _load_point(self, job_id: str, on_disk: list[tuple[int, dict]], point: Point) -> JobCheckpoint:
        """The newest checkpoint of ``point`` on disk; UnknownCheckpoint if there is
        none (a corrupt one is deleted, so that it is not listed again). Its meta is
        checked as loaded: that is what the job is put back to."""
        seqs = [seq for seq, meta in on_disk if point_of(meta) == point]
        if not seqs:
            raise UnknownCheckpoint(f"job {job_id} has no snapshot of step {point[0]} here")
        try:
            ckpt = self.store.load(job_id, seqs[-1])
            recovery.check_meta(ckpt.meta)
            return ckpt
        except ValueError as exc:
            self.store.discard(job_id, [seqs[-1]])
            raise UnknownCheckpoint(str(exc)) from None


def _check_roll_back(job: Job) -> None:
    if job.state not in (JobState.RUNNING, JobState.EVALUATING):
        raise JobNotRunning(f"job {job.job_id} is {job.state.value}: nothing to roll back")
    if not job.spec.synchronous:
        raise FailedPrecondition(f"job {job.job_id} is not synchronous: its shards need no alignment")
