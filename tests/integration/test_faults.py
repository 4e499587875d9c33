"""Let it crash: kill -9 workers and the parameter server under `psgrid up` mid-job.

The job still finishes, its accuracy matches a fault-free run with the same
seed (within 1 point), and the server's update log shows no update applied
twice. Real processes, real signals, deadlines via wait_until.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from psgrid.client import Client
from psgrid.examples import spec_path
from psgrid.spec import JobSpec, JobState

from helpers.up import Up
from helpers.wait import wait_step, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLUSTER = """
[supervisor]
max_restarts = 20
period_s = 120
check_interval_s = 0.1
[server]
checkpoint_dir = "checkpoints"
liveness_timeout_s = 10
backoff_initial_s = 0.1
backoff_max_s = 0.5
args = ["--update-log", "updates.jsonl", "--checkpoint-interval", "1"]
[workers]
count = 2
liveness_timeout_s = 5
backoff_initial_s = 0.1
backoff_max_s = 0.5
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    cluster = Up(tmp_path_factory.mktemp("faults"), cluster=CLUSTER)
    try:
        nodes = cluster.wait_running(60)
        cluster.server_address = nodes["server"].address
        yield cluster
    finally:
        cluster.close()


def digits(epochs: int = 30) -> JobSpec:
    return JobSpec.from_toml(spec_path("digits")).replace(epochs=epochs, seed=7)


def effective_updates(root: pathlib.Path, job_id: str) -> list[dict]:
    """Applied updates of a job, without those a restore rolled back."""
    kept: list[dict] = []
    for line in (root / "updates.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("job_id") != job_id:
            continue
        if entry["event"] == "restore":
            kept = [e for e in kept if e["version"] <= entry["version"]]
        else:
            kept.append(entry)
    return kept


def assert_each_update_once(root: pathlib.Path, job_id: str, total_steps: int) -> None:
    applied = effective_updates(root, job_id)
    keys = [(e["worker_name"], e["seq"]) for e in applied]
    assert len(keys) == len(set(keys)), "an update was applied twice"
    assert sorted(keys) == sorted((w, s) for w in ("worker-0", "worker-1") for s in range(total_steps))


def run_in_background(job):
    box: dict = {}

    def wait():
        try:
            box["info"] = job.wait(timeout=240, progress=False)
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            box["error"] = exc

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, box


@pytest.fixture(scope="module")
def fault_free(up):
    with Client(up.server_address) as client:
        info = client.submit(digits()).wait(timeout=240, progress=False)
    assert info.state is JobState.SUCCEEDED
    return info


def test_workers_killed_five_times_come_back_and_the_job_matches(up, fault_free):
    rng = random.Random(2026)
    with Client(up.server_address) as client:
        job = client.submit(digits())
        waiter, box = run_in_background(job)
        for fraction in sorted(rng.uniform(0.1, 0.8) for _ in range(5)):
            step = wait_step(job, fraction)
            name = rng.choice(["worker-0", "worker-1"])
            old = up.nodes()[name]
            killed = time.monotonic()
            os.kill(old.pid, signal.SIGKILL)
            new = up.wait_new_pid(name, old.pid, timeout=3.0)
            assert time.monotonic() - killed <= 3.0
            assert new.restarts == old.restarts + 1
            # back in the job: training moves on past the step it was killed at
            wait_until(lambda: job.status().step > step + 2, 60, message=f"{name} to rejoin")
        waiter.join(240)
    assert "error" not in box, box.get("error")
    info = box["info"]
    assert info.state is JobState.SUCCEEDED
    assert abs(info.metrics["test_accuracy"] - fault_free.metrics["test_accuracy"]) <= 0.01
    assert_each_update_once(up.root, job.job_id, info.total_steps)


def test_server_killed_twice_restores_its_checkpoint_and_the_job_matches(up, fault_free):
    with Client(up.server_address) as client:
        job = client.submit(digits())
        waiter, box = run_in_background(job)
        for fraction in (0.3, 0.6):
            wait_step(job, fraction)
            old = up.nodes()["server"]
            os.kill(old.pid, signal.SIGKILL)
            up.wait_new_pid("server", old.pid, timeout=5.0)
        waiter.join(240)
    assert "error" not in box, box.get("error")  # Job.wait() rode through both outages
    info = box["info"]
    assert info.state is JobState.SUCCEEDED
    assert abs(info.metrics["test_accuracy"] - fault_free.metrics["test_accuracy"]) <= 0.01
    entries = [json.loads(line) for line in (up.root / "updates.jsonl").read_text().splitlines()]
    restores = [e for e in entries if e["event"] == "restore" and e["job_id"] == job.job_id]
    assert len(restores) == 2 and all(r["version"] > 0 for r in restores)
    assert_each_update_once(up.root, job.job_id, info.total_steps)


def test_sigterm_stops_everything_and_writes_the_final_checkpoint(tmp_path):
    from psgrid.server.checkpoint import CheckpointStore

    cluster = Up(tmp_path, cluster=CLUSTER.replace('"--checkpoint-interval", "1"', '"--checkpoint-interval", "60"'))
    try:
        nodes = cluster.wait_running(60)
        with Client(nodes["server"].address) as client:
            job = client.submit(digits(epochs=200))
            wait_step(job, 0.02)
        pids = [n.pid for n in nodes.values()]
        cluster.proc.send_signal(signal.SIGTERM)
        assert cluster.wait_exit(60) == 0
        assert not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids)
        applied = effective_updates(tmp_path, job.job_id)
        ckpt = CheckpointStore(tmp_path / "checkpoints").load_latest(job.job_id)
        # no periodic checkpoint ran (interval 60 s): this one is the final one, taken
        # after the workers stopped, and it holds every update the server applied
        assert ckpt is not None and ckpt.meta["state"] == "RUNNING"
        assert ckpt.meta["version"] == max(e["version"] for e in applied) > 0
    finally:
        cluster.close()


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_status_json_lists_every_node_and_job_with_restarts(up):
    with Client(up.server_address) as client:
        job = client.submit(digits(epochs=400))
        wait_step(job, 0.01)
        old = up.nodes()["worker-1"]
        os.kill(old.pid, signal.SIGKILL)
        up.wait_new_pid("worker-1", old.pid, timeout=3.0)
        wait_until(lambda: job.status().step > 5 and all(w.job_id for w in client.workers()), 60,
                   message="both workers back on the job")
        out = subprocess.run([sys.executable, "-m", "psgrid", "status", "--json", "--server", up.server_address,
                              "--supervisor", up.address], capture_output=True, text=True, timeout=60)
        job.cancel()
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    nodes = {n["name"]: n for n in status["nodes"]}
    assert set(nodes) == {"server", "worker-0", "worker-1"}
    for n in nodes.values():
        assert {"role", "host", "pid", "state", "restarts", "uptime_s"} <= set(n) and n["pid"]
    assert nodes["worker-1"]["restarts"] >= old.restarts + 1
    for name in ("worker-0", "worker-1"):
        assert nodes[name]["job_id"] == job.job_id and nodes[name]["step"] is not None
        assert nodes[name]["samples_per_sec"] is not None
    running = {j["job_id"]: j for j in status["jobs"]}[job.job_id]
    assert running["state"] == "RUNNING" and running["total_steps"] > running["step"] > 0
    assert running["loss"] is not None and running["eta_s"] is not None and running["eta_s"] > 0


def test_no_shared_memory_segment_outlives_the_kills(up):
    """The kills above hit workers and the server while their step streams moved tensors
    through shared memory (worker and server share this host): the workers took that
    path, and no segment is left in /dev/shm, of a killed process or of a live one."""
    from psgrid import shm

    logs = "".join(p.read_text() for p in (up.root / "run").glob("worker-*.log"))
    assert "tensors move through shared memory" in logs
    wait_until(lambda: not any(j.state is JobState.RUNNING for j in Client(up.server_address).list_jobs()), 60,
               message="the cluster to be idle")
    left = [p.name for p in shm.ROOT.iterdir() if shm._NAME.match(p.name)
            and (not shm._alive(int(p.name.split("-")[1])) or int(p.name.split("-")[1]) in {n.pid for n in up.nodes().values()})]
    assert left == []
