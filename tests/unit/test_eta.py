"""`psgrid status`'s ETA from a job's history: forward progress over time, through roll-backs."""
from __future__ import annotations

import pytest

from psgrid.spec import HistoryRow, JobInfo, JobSpec, JobState
from psgrid.client.status import eta_seconds


def info(step: int, total: int = 1000, state: JobState = JobState.RUNNING) -> JobInfo:
    return JobInfo("j", JobSpec("m:f", "d:f", steps=total), state, step=step, total_steps=total)


def rows(*points: tuple[int, float]) -> list[HistoryRow]:
    return [HistoryRow(step, t) for step, t in points]


def test_steady_rate():
    assert eta_seconds(info(100), rows((50, 0.0), (100, 5.0))) == pytest.approx(90.0)


def test_a_roll_back_in_the_window_still_gives_an_estimate():
    # 60 steps forward, a roll-back to 40, 20 forward again: 80 steps gained in 8 s.
    history = rows((20, 0.0), (80, 4.0), (40, 6.0), (60, 8.0))
    assert eta_seconds(info(60), history) == pytest.approx(940 / 10.0)


def test_a_stall_slows_the_estimate():
    history = rows((10, 0.0), (20, 1.0), (20, 9.0))
    assert eta_seconds(info(20), history) == pytest.approx(980 / (10 / 9.0))


@pytest.mark.parametrize("history", [[], rows((5, 1.0)), rows((5, 1.0), (5, 2.0)), rows((9, 1.0), (4, 2.0)),
                                     rows((0, 0.0), (0, 1.0))])
def test_no_forward_progress_no_estimate(history):
    assert eta_seconds(info(5), history) is None


def test_a_finished_job_has_none():
    assert eta_seconds(info(1000, state=JobState.SUCCEEDED), rows((1, 0.0), (2, 1.0))) is None
