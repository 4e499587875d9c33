"""Read-only views of a server for the JobService: jobs, their events and history, workers, weights.

:class:`Views` reads each job under its lock and changes nothing. A finished
job released from memory (:mod:`psgrid.server.retention`) answers from its
summary, and its weights and history from its newest usable checkpoint when the server
has a checkpoint directory.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from psgrid.codec import Layout
from psgrid.errors import FailedPrecondition, UnknownJob
from psgrid.server import recovery
from psgrid.server.state import ServerState
from psgrid.server.steps import PullResult
from psgrid.spec import HistoryRow, JobEvent, JobInfo, JobState, WorkerStatus


class Views:
    """What clients read of the jobs and workers of one server."""

    def __init__(self, state: ServerState):
        self.state = state

    def get(self, job_id: str) -> JobInfo:
        """The job's current info (a released job's final info)."""
        job = self.state.jobs.get(job_id)
        if job is None:
            return self.state.released_job(job_id).info
        with job.cond:
            return job.info()

    def list_jobs(self) -> list[JobInfo]:
        """Every job's info, released ones included, oldest first."""
        out = {}
        for job in list(self.state.jobs.values()):
            with job.cond:
                out[job.job_id] = job.info()
        # After the jobs: a job released meanwhile has its summary in by then.
        for released in self.state.released.all():
            out.setdefault(released.info.job_id, released.info)
        return sorted(out.values(), key=lambda info: info.created_unix)

    def watch(self, job_id: str, from_seq: int, is_active: Callable[[], bool],
              poll_s: float = 1.0) -> Iterator[JobEvent]:
        """Yield the job's events from ``from_seq``; end once a terminal state is sent
        (a released job sends that one event only)."""
        job = self.state.jobs.get(job_id)
        if job is None:
            released = self.state.released_job(job_id)
            info = released.info
            yield JobEvent(released.last_event, info.updated_unix, "state", info)
            return
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
        """The job's training curve so far (a released job's from its newest usable checkpoint)."""
        job = self.state.jobs.get(job_id)
        if job is None:
            self.state.released_job(job_id)  # UnknownJob for a job never held here
            store = self.state.checkpoints
            found = store.manifests(job_id) if store is not None else []
            usable = [meta for seq, meta in found if recovery.usable_meta(job_id, seq, meta)]
            if not usable:
                raise self._gone(job_id, "history")
            return [HistoryRow(*row) for row in usable[-1].get("history", ())]
        with job.cond:
            return list(job.history)

    def list_workers(self) -> list[WorkerStatus]:
        """Every registered worker, what it runs and how fast."""
        now, out = self.state.clock(), []
        for w in sorted(self.state.workers.values(), key=lambda w: w.name):
            status = WorkerStatus(w.worker_id, w.name, w.host, w.pid, w.device,
                                  last_seen_s=max(0.0, now - w.last_seen))
            job = self.state.jobs.get(w.job_id) if w.job_id else None
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
        """A consistent copy of the job's current parameters (a released job's from its
        newest usable checkpoint)."""
        job = self.state.jobs.get(job_id)
        if job is None:
            self.state.released_job(job_id)
            store = self.state.checkpoints
            found = store.verified(job_id) if store is not None else ()
            ckpt = next((c for c in found if recovery.usable_meta(job_id, c.seq, c.meta)), None)
            if ckpt is None:
                raise self._gone(job_id, "parameters")
            if not ckpt.params:
                raise FailedPrecondition(f"job {job_id} has no parameters: it ended before they were set")
            layout, meta = Layout.of_tensors(ckpt.params.items()), ckpt.meta
            return PullResult(JobState(meta["state"]), meta["version"], meta["global_step"], layout,
                              layout.pack(ckpt.params))
        with job.cond:
            store = job.require_store()
            payload = store.snapshot_into(None)
            return PullResult(job.state, store.version, job.steps.global_step, store.layout, payload)

    @staticmethod
    def _gone(job_id: str, what: str) -> UnknownJob:
        return UnknownJob(f"job {job_id} ended and was released from this server's memory, and its {what} "
                          "with it: there is no usable checkpoint of it here (see --keep-finished-jobs)")
