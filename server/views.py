"""Read-only views of a server for the JobService: jobs, their events and history, workers, weights.

:class:`Views` reads each job under its lock and changes nothing.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from psgrid.server.state import ServerState
from psgrid.server.steps import PullResult
from psgrid.spec import HistoryRow, JobEvent, JobInfo, WorkerStatus


class Views:
    """What clients read of the jobs and workers of one server."""

    def __init__(self, state: ServerState):
        self.state = state

    def get(self, job_id: str) -> JobInfo:
        """The job's current info."""
        job = self.state.job(job_id)
        with job.cond:
            return job.info()

    def list_jobs(self) -> list[JobInfo]:
        """Every job's info, oldest first."""
        jobs = sorted(self.state.jobs.values(), key=lambda j: j.created)
        out = []
        for job in jobs:
            with job.cond:
                out.append(job.info())
        return out

    def watch(self, job_id: str, from_seq: int, is_active: Callable[[], bool],
              poll_s: float = 1.0) -> Iterator[JobEvent]:
        """Yield the job's events from ``from_seq``; end once a terminal state is sent."""
        job = self.state.job(job_id)
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
        """The job's training curve so far."""
        job = self.state.job(job_id)
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
        """A consistent copy of the job's current parameters."""
        job = self.state.job(job_id)
        with job.cond:
            store = job.require_store()
            payload = store.snapshot_into(None)
            return PullResult(job.state, store.version, job.steps.global_step, store.layout, payload)
