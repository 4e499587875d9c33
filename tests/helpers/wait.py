"""Wait on a condition with a deadline: the only way tests synchronise."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.02,
               message: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def wait_step(job, fraction: float, timeout: float = 120) -> int:
    """Wait until a running job (a ``psgrid.client.Job``) has done ``fraction`` of its
    steps; fail at once if it ends or fails instead. Returns the step reached."""
    from psgrid.spec import JobState

    def reached():
        info = job.status()
        assert info.state in (JobState.RUNNING, JobState.PENDING), info
        return info.total_steps and info.step >= fraction * info.total_steps
    wait_until(reached, timeout, interval=0.05, message=f"{fraction:.0%} of the job")
    return job.status().step
