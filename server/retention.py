"""Which finished jobs a server keeps in memory, and the summary it keeps of the others.

A job that ended (SUCCEEDED, FAILED or CANCELLED) stays whole in memory (its
parameters, history and events) while it is one of the newest
``keep_finished_jobs`` finished jobs and younger than ``finished_job_ttl_s``,
and never less than a grace (the heartbeat timeout) after it ended, so that
its workers are done with it. Then it is *released*: the server drops the job
and keeps a :class:`ReleasedJob`, its final :class:`~psgrid.spec.JobInfo`, so
that ``get``, ``list`` and ``watch`` still answer. Its parameters and history
are read back from its last checkpoint when the server has a checkpoint
directory (docs/operations.md, "Finished jobs").

:func:`expired` is the policy, pure; :class:`ReleasedJobs` holds the summaries.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping

from psgrid.spec import JobInfo

#: Summaries of released jobs kept; beyond that the oldest are forgotten (NOT_FOUND).
MAX_RELEASED = 10_000


@dataclasses.dataclass(frozen=True)
class Ended:
    """When a finished job was first seen over (server clock), and when it was submitted."""

    ended: float
    created: float


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """How many finished jobs stay in memory, for how long, and for at least how long."""

    keep: int
    ttl_s: float | None = None
    #: No job is released sooner than this after it ended.
    grace_s: float = 0.0

    def __post_init__(self) -> None:
        if self.keep < 0 or (self.ttl_s is not None and self.ttl_s < 0) or self.grace_s < 0:
            raise ValueError(f"keep, ttl_s and grace_s must be >= 0, got {self}")


def expired(finished: Mapping[str, Ended], policy: RetentionPolicy, now: float) -> list[str]:
    """Ids of the finished jobs to release now, oldest first.

    A job goes once it is past the grace and either not among the newest
    ``policy.keep`` (by end, then by submission) or older than ``policy.ttl_s``.
    """
    newest_first = sorted(finished, key=lambda j: (finished[j].ended, finished[j].created), reverse=True)
    out = []
    for rank, job_id in enumerate(newest_first):
        age = now - finished[job_id].ended
        if age < policy.grace_s:
            continue
        if rank >= policy.keep or (policy.ttl_s is not None and age >= policy.ttl_s):
            out.append(job_id)
    return out[::-1]


@dataclasses.dataclass(frozen=True)
class ReleasedJob:
    """What a server keeps of a released job."""

    info: JobInfo
    #: Sequence number of the job's last event (its terminal state).
    last_event: int
    released_unix: float


class ReleasedJobs:
    """The summaries of released jobs, the newest ``limit``. Callers serialise
    changes (the server lock); reads need no lock."""

    def __init__(self, limit: int = MAX_RELEASED):
        self.limit = limit
        self._jobs: OrderedDict[str, ReleasedJob] = OrderedDict()

    def add(self, job: ReleasedJob) -> None:
        """Keep ``job``'s summary, forgetting the oldest beyond the limit."""
        self._jobs[job.info.job_id] = job
        while len(self._jobs) > self.limit:
            self._jobs.popitem(last=False)

    def get(self, job_id: str) -> ReleasedJob | None:
        """The summary of released job ``job_id``, or None."""
        return self._jobs.get(job_id)

    def all(self) -> list[ReleasedJob]:
        """Every summary, in the order the jobs were released."""
        return list(self._jobs.values())

    def __len__(self) -> int:
        return len(self._jobs)
