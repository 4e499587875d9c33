"""Chaos, in the suite: a sharded synchronous job through seven mixed faults ends with the fault-free weights.

Runs ``scripts/chaos.py`` (the same driver as the long chaos runs) as a real
process: `psgrid up` with two parameter-server shards and two workers, a
fault-free digits job, then the same job while six SIGKILLs of random nodes
(shards, the coordinator, workers) and one SIGSTOP of a worker land at spread
points of it. The script compares the weights and reads every shard's update log.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "chaos.py"


def test_seven_mixed_faults_leave_the_weights_of_the_fault_free_run(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--kills", "6", "--stops", "1", "--epochs", "50",
                          "--seed", "3", "--liveness", "3", "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=560)
    assert run.stdout.strip(), run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["events"] == 7 and summary["stops"] == 1, run.stdout
    assert summary["state"] == "SUCCEEDED" and summary["fault_free_state"] == "SUCCEEDED", run.stdout
    assert summary["max_abs_diff"] <= 1e-5, run.stdout
    assert summary["accuracy"] == summary["fault_free_accuracy"]
    assert summary["pushes_applied"] > 0 and summary["pushes_on_another_step"] == 0
    assert summary["up_exit"] == 0 and run.returncode == 0, run.stdout + run.stderr[-3000:]
