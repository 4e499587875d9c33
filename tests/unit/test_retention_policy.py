"""Which finished jobs a server releases from memory, and the server flags that say so."""
from __future__ import annotations

import pytest

from psgrid.server.config import ServerConfig
from psgrid.server.retention import Ended, ReleasedJob, ReleasedJobs, RetentionPolicy, expired
from psgrid.spec import JobInfo, JobSpec, JobState

SPEC = JobSpec(model="psgrid.examples.models:linear", dataset="psgrid.examples.datasets:linear_regression",
               steps=1)


def finished(*ends: float) -> dict[str, Ended]:
    """Jobs j0, j1, ... submitted in that order, ended at ``ends``."""
    return {f"j{i}": Ended(end, float(i)) for i, end in enumerate(ends)}


def test_the_newest_by_end_are_kept_the_rest_released_oldest_first():
    jobs = finished(10.0, 30.0, 20.0, 40.0)
    assert expired(jobs, RetentionPolicy(keep=2), now=100.0) == ["j0", "j2"]
    assert expired(jobs, RetentionPolicy(keep=4), now=100.0) == []
    assert expired(jobs, RetentionPolicy(keep=0), now=100.0) == ["j0", "j2", "j1", "j3"]


def test_jobs_that_ended_together_are_ranked_by_submission():
    # a server restarted from checkpoints sees all its finished jobs end at once
    assert expired(finished(5.0, 5.0, 5.0), RetentionPolicy(keep=1), now=9.0) == ["j0", "j1"]


def test_a_time_limit_releases_old_jobs_however_few():
    policy = RetentionPolicy(keep=10, ttl_s=50.0)
    assert expired(finished(10.0, 60.0, 95.0), policy, now=100.0) == ["j0"]


def test_nothing_is_released_within_the_grace():
    policy = RetentionPolicy(keep=0, ttl_s=0.0, grace_s=10.0)
    assert expired(finished(85.0, 95.0), policy, now=100.0) == ["j0"]


def test_released_summaries_are_bounded():
    released = ReleasedJobs(limit=2)
    for i in range(3):
        released.add(ReleasedJob(JobInfo(f"j{i}", SPEC, JobState.SUCCEEDED), 7, 0.0))
    assert [r.info.job_id for r in released.all()] == ["j1", "j2"] and released.get("j0") is None


@pytest.mark.parametrize("changes, named", [
    ({"keep_finished_jobs": -1}, "-1"),
    ({"keep_finished_jobs": 2.5}, "2.5"),
    ({"finished_job_ttl_s": -1.0}, "-1.0"),
    ({"finished_job_ttl_s": float("nan")}, "nan"),
    ({"shard_name": ""}, "''"),
])
def test_bad_retention_and_name_settings_are_refused(changes, named):
    with pytest.raises(ValueError, match=named):
        ServerConfig(**changes)


def test_the_retention_flags_load_from_toml(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("[server]\nkeep_finished_jobs = 5\nfinished_job_ttl_s = 600.0\nshard_name = \"shard-3\"\n")
    config = ServerConfig.load(path, keep_finished_jobs=7)
    assert (config.keep_finished_jobs, config.finished_job_ttl_s, config.shard_name) == (7, 600.0, "shard-3")
    assert ServerConfig().keep_finished_jobs == 20 and ServerConfig().finished_job_ttl_s is None
