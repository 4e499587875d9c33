"""Registration and scheduling: workers register, beat and fall silent; jobs queue, start and end.

:class:`Scheduler` keeps the worker pool and the pending queue of a
:class:`~psgrid.server.state.ServerState`: it registers workers (one that
registers again under its name takes back its rank), drops the silent ones from
their barriers, starts pending jobs on idle workers, opens and closes the shards
of sharded jobs, returns a job's workers to the pool when the job ends, and
releases finished jobs from memory as :mod:`psgrid.server.retention` says.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import uuid

from psgrid.errors import FailedPrecondition, InvalidArgument
from psgrid.server import retention
from psgrid.server.jobs import Job
from psgrid.server.state import ServerState, WorkerRecord
from psgrid.spec import Assignment, JobInfo, JobSpec, JobState

logger = logging.getLogger(__name__)


def waiting_reason(need: int, live: int, idle: int) -> str:
    """Why a job needing ``need`` workers cannot start with ``live`` alive, ``idle`` of them free."""
    workers = "worker" if need == 1 else "workers"
    if need > live:
        alive = "none is alive" if live == 0 else f"{live} {'is' if live == 1 else 'are'} alive"
        return f"needs {need} {workers}, {alive}"
    return f"needs {need} {workers}, {idle} of the {live} alive {'is' if idle == 1 else 'are'} free"


class Scheduler:
    """Registers workers and matches them with jobs."""

    def __init__(self, state: ServerState):
        self.state = state
        #: Notified whenever a job starts: idle workers' heartbeats wait on it (long poll).
        self.started = threading.Condition()
        config = state.config
        self.retention = retention.RetentionPolicy(config.keep_finished_jobs, config.finished_job_ttl_s,
                                                   grace_s=config.heartbeat_timeout_s)

    # --- workers ------------------------------------------------------------------

    def register_worker(self, name: str, host: str, pid: int, device: str) -> WorkerRecord:
        """Register a worker. A worker registering under the name of an earlier one
        is its new incarnation: it replaces the old id and takes back its job and rank."""
        state = self.state
        now = state.clock()
        record = WorkerRecord(f"w-{uuid.uuid4().hex[:10]}", name, host, pid, device, now, now)
        with state.lock:
            for old in [w for w in state.workers.values() if w.name == name]:
                del state.workers[old.worker_id]
            state.workers[record.worker_id] = record
            for job in sorted(state.jobs.values(), key=lambda j: j.created, reverse=True):
                if self._take_over(job, record):
                    break
        logger.info("[ps] worker %s registered (%s, pid %d, %s)", record.worker_id, name, pid, device)
        self.schedule()
        return record

    def _take_over(self, job: Job, new: WorkerRecord) -> bool:
        """Give ``new`` the rank in ``job`` that a gone worker of the same name held."""
        with job.cond:
            if job.state.terminal:
                return False
            for rank, name in enumerate(job.worker_names):
                old = job.workers[rank]
                if name == new.name and old not in self.state.workers:
                    job.replace_worker(old, new.worker_id)
                    new.job_id = job.job_id
                    logger.info("[ps] worker %s (%s) takes back rank %d of job %s at step %d",
                                new.worker_id, name, rank, job.job_id, job.steps.clocks[new.worker_id])
                    return True
        return False

    def reap(self) -> list[str]:
        """Drop workers that missed their heartbeats from their jobs' barriers."""
        state = self.state
        now, lost = state.clock(), []
        for worker in list(state.workers.values()):
            job = state.jobs.get(worker.job_id) if worker.job_id else None
            if job is None or state.alive(worker, now):
                continue
            with job.cond:
                if worker.worker_id in job.workers and worker.worker_id not in job.lost:
                    job.worker_lost(worker.worker_id)
                    lost.append(worker.worker_id)
                    state.log_applied(job)
        for job in list(state.jobs.values()):
            with job.cond:
                for stand_in in job.overdue(now, state.config.heartbeat_timeout_s):
                    job.worker_lost(stand_in)
                    lost.append(stand_in)
                    state.log_applied(job)
        for worker_id in lost:
            logger.warning("[ps] worker %s missed its heartbeats: it leaves the barrier", worker_id)
        self.schedule()  # live workers changed, or a pending job's wait passed reserve_after_s
        return lost

    def heartbeat(self, worker_id: str, job_id: str,
                  wait_s: float = 0.0) -> tuple[Assignment | None, JobState | None]:
        """Note the worker alive; hand it a job when it is idle and one waits. An idle
        worker's beat waits up to ``wait_s`` for a job to be assigned to it."""
        state = self.state
        worker = state.worker(worker_id)
        worker.last_seen = state.clock()
        state.mark_back(worker)
        self.schedule()
        if wait_s > 0 and not job_id and worker.job_id is None:
            with self.started:
                self.started.wait_for(lambda: worker.job_id is not None or worker.worker_id not in state.workers,
                                      wait_s)
        job_state = None
        if job_id:
            job = state.jobs.get(job_id)
            job_state = job.state if job is not None else state.released_job(job_id).info.state
        assignment = None
        current = worker.job_id
        job = state.jobs.get(current) if current else None
        if job is not None and current != job_id:
            with job.cond:
                if job.state.terminal:  # ended, its workers not released yet (release is saving it)
                    return None, job_state
                assignment = Assignment(current, job.rank_of(worker_id), len(job.workers), job.spec,
                                        job.steps.clocks[worker_id], job.shards, tuple(job.worker_names))
        return assignment, job_state

    # --- jobs ---------------------------------------------------------------------

    def schedule(self) -> None:
        """Start pending jobs on idle live workers, oldest first, with backfill.

        A job that does not fit now does not hold up the younger ones that do:
        they start on the idle workers meanwhile. Once it has waited
        ``reserve_after_s`` and the live workers could hold it, it reserves them:
        no younger job starts until it has, so a stream of small jobs cannot
        starve a big one. A job asking for more workers than are alive never
        reserves (it could wait forever); each pending job says why it waits.
        """
        state = self.state
        with state.lock:
            now = state.clock()
            live = [w for w in state.workers.values() if state.alive(w, now)]
            idle = [w for w in live if w.job_id is None]
            reserved: Job | None = None
            for job_id in list(state.pending):
                job = state.jobs[job_id]
                if job.state is not JobState.PENDING:
                    state.pending.remove(job_id)
                    continue
                need = job.spec.num_workers
                if reserved is not None:
                    with job.cond:
                        job.set_waiting(f"waits behind {reserved.job_id}, older, which has the next "
                                        f"{reserved.spec.num_workers} free worker(s)")
                    continue
                if len(idle) < need:
                    with job.cond:
                        job.set_waiting(waiting_reason(need, len(live), len(idle)))
                    if need <= len(live) and now - job.created >= state.config.reserve_after_s:
                        reserved = job
                    continue
                chosen, idle = idle[:need], idle[need:]
                for w in chosen:
                    w.job_id = job_id
                state.pending.remove(job_id)
                with job.cond:
                    job.start([w.worker_id for w in chosen], [w.name for w in chosen])
                logger.info("[ps] job %s started on %s", job_id, ", ".join(job.workers))
                with self.started:
                    self.started.notify_all()

    def release(self, job: Job) -> None:
        """Return a finished job's workers to the idle pool, once its end is on disk:
        a server restarted a moment later must not bring the job back as running."""
        state = self.state
        state.snapshots.save_end(job)
        with job.cond:  # the workers' receive buffers and copies: no push or pull needs them now
            job.staging.clear()
            job.snapshots.clear()
        with state.lock:
            for w in state.workers.values():
                if w.job_id == job.job_id:
                    w.job_id = None
        self.schedule()
        self.retire()

    def retire(self) -> list[str]:
        """Release from memory the finished jobs the retention policy no longer keeps
        (keeping a summary of each); return their ids, oldest first."""
        state = self.state
        with state.lock:
            now = state.clock()
            for job in state.jobs.values():
                if job.state.terminal and job.job_id not in state.ended:
                    state.ended[job.job_id] = retention.Ended(now, job.created)
            doomed = retention.expired(state.ended, self.retention, now)
            for job_id in doomed:
                self._forget(state.jobs[job_id], now)
        for job_id in doomed:
            for counter in (state.metrics.pushes, state.metrics.pulls, state.metrics.duplicates):
                with contextlib.suppress(KeyError):
                    counter.remove(job_id)
            logger.info("[ps] job %s released from memory (finished jobs kept: %d)",
                        job_id, self.retention.keep)
        return doomed

    def _forget(self, job: Job, now: float) -> None:
        """Replace ``job`` by its summary; call with the server lock held. The summary
        goes in first, so that readers, who take no lock, always find one or the other."""
        state = self.state
        with job.cond:
            state.released.add(retention.ReleasedJob(job.info(), job.next_event - 1, now))
        del state.jobs[job.job_id]
        del state.ended[job.job_id]
        if job.job_id in state.pending:
            state.pending.remove(job.job_id)
        for w in state.workers.values():
            if w.job_id == job.job_id:
                w.job_id = None

    def submit(self, spec: JobSpec) -> JobInfo:
        """Queue a job; PermissionDenied when it names modules outside the allow-list,
        FailedPrecondition on a shard that is not its cluster's coordinator."""
        state = self.state
        config = state.config
        if config.shard_name.startswith("shard-") and not config.shards:  # psgrid up's name for a non-coordinator
            raise FailedPrecondition(f"this server is {config.shard_name}, one shard of a sharded cluster: "
                                     "submit jobs to its coordinator (the server started with --shards)")
        spec.check_modules(config.allowed_modules)
        job = Job(f"job-{uuid.uuid4().hex[:10]}", spec, clock=state.clock, shards=config.shards)
        state.snapshots.align(job)
        with state.lock:
            state.jobs[job.job_id] = job
            state.pending.append(job.job_id)
        logger.info("[ps] job %s submitted: %s on %s, %d workers, staleness %s",
                    job.job_id, spec.model, spec.dataset, spec.num_workers, spec.staleness)
        self.schedule()
        with job.cond:
            return job.info()

    def open_partition(self, job_id: str, spec: JobSpec, names: list[str]) -> None:
        """Hold one shard of a sharded job here (idempotent).

        The job's workers take their ranks by name, as after a restore: the
        ones registered already now, the others when they register.
        """
        state = self.state
        spec.check_modules(state.config.allowed_modules)
        with state.lock:
            if job_id in state.jobs or state.released.get(job_id) is not None:
                return
            job = Job(job_id, spec, clock=state.clock, partition=True)
            state.snapshots.align(job)
            with job.cond:
                job.open_away(names)
                job.set_state(JobState.RUNNING)
            state.jobs[job_id] = job
            now = state.clock()
            for worker in state.workers.values():
                # Only a live registration: a stale one (the worker has not talked
                # to this shard since its last job) would be dropped from the
                # barrier at once, while the coordinator still counts it.
                if worker.name in names and worker.job_id is None and state.alive(worker, now):
                    self._take_over(job, worker)
        logger.info("[ps] holding a shard of job %s for %d workers", job_id, len(names))

    def close_partition(self, job_id: str, worker_id: str, state: JobState) -> None:
        """End this shard's part of a job that ended on its coordinator."""
        job, _ = self.state.member(job_id, worker_id)
        if not state.terminal:
            raise InvalidArgument(f"a partition closes with a terminal state, not {state.value}")
        with job.cond:
            moved = job.set_state(state)
        if moved:
            self.release(job)

    def cancel(self, job_id: str) -> JobInfo:
        """Cancel a job; a job already over stays as it was."""
        if job_id not in self.state.jobs:
            return self.state.released_job(job_id).info
        job = self.state.job(job_id)
        with job.cond:
            moved = job.set_state(JobState.CANCELLED)
            info = job.info()
        if moved:
            logger.info("[ps] job %s cancelled", job_id)
            self.release(job)
        return info
