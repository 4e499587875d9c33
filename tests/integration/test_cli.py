"""The psgrid command against a running cluster: submit, jobs, job, cancel, --help."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def psgrid(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psgrid", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_submit_wait_jobs_job(cluster):
    out = psgrid("submit", "--example", "linear", "--server", cluster.address, "--wait")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0]
    assert "succeeded" in out.stdout and "weight_error" in out.stdout
    shown = json.loads(psgrid("job", job_id, "--json", "--server", cluster.address).stdout)
    assert shown["state"] == "SUCCEEDED" and shown["metrics"]["weight_error"] < 0.05
    listed = json.loads(psgrid("jobs", "--json", "--server", cluster.address).stdout)
    assert job_id in [j["job_id"] for j in listed]
    table = psgrid("jobs", "--server", cluster.address).stdout
    assert job_id in table and "SUCCEEDED" in table


def test_cancel_a_pending_job_and_unknown_ids(cluster):
    out = psgrid("submit", "--example", "linear", "--workers", "9", "--server", cluster.address)
    job_id = out.stdout.strip()
    assert f"{job_id} needs 9 workers and 2 are alive" in out.stderr  # warned at once
    shown = psgrid("job", job_id, "--server", cluster.address).stdout
    assert "PENDING" in shown and "needs 9 workers, 2 are alive" in shown  # and `psgrid job` says why
    cancelled = psgrid("cancel", job_id, "--server", cluster.address)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    missing = psgrid("job", "job-doesnotexist", "--server", cluster.address)
    assert missing.returncode == 1 and "UnknownJob" in missing.stderr


def test_bad_spec_is_refused_with_a_clear_message(cluster):
    out = psgrid("submit", "--example", "linear", "--batch-size", "0", "--server", cluster.address)
    assert out.returncode == 1 and "batch_size" in out.stderr


@pytest.mark.parametrize("command", ["server", "worker", "submit", "jobs", "job", "cancel", "demo"])
def test_help(command):
    out = psgrid(command, "--help", timeout=60)
    assert out.returncode == 0 and "usage: psgrid" in out.stdout
