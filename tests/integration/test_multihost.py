"""Three hosts on one machine (Linux network namespaces on a private bridge).

Two parameter-server shards on host `ps`, one worker on each of `gpu1` and
`gpu2`, each host supervised by its own `psgrid up FILE --host NAME`. Training
converges as on loopback; then every process of `gpu2` is killed at once and
the job still finishes (the other worker takes over its data shard). Traffic
goes only to the namespaces this test makes; it is skipped where they cannot
be made.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from psgrid.examples import spec_path
from psgrid.spec import JobSpec

from helpers.netns import Network, unavailable_reason
from helpers.wait import wait_until

REASON = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240),
              pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}")]

HOSTS = ["ps", "gpu1", "gpu2"]
PORT = 7070


def cluster_file(net: Network) -> str:
    a = net.addresses
    return f"""
[supervisor]
max_restarts = 10
check_interval_s = 0.2
[server]
checkpoint_dir = ""
args = ["--heartbeat-timeout", "3"]
[workers]
liveness_timeout_s = 20
args = ["--threads", "1"]
[hosts.ps]
address = "{a['ps']}"
servers = 2
server_port = {PORT}
[hosts.gpu1]
address = "{a['gpu1']}"
workers = 1
[hosts.gpu2]
address = "{a['gpu2']}"
workers = 1
"""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    with Network(HOSTS) as net:
        (root / "cluster.toml").write_text(cluster_file(net))
        ups = {}

        def start_host(host: str) -> None:
            with open(root / f"{host}.up.log", "ab") as log:
                ups[host] = net.popen(host, [sys.executable, "-m", "psgrid", "up", str(root / "cluster.toml"),
                                             "--host", host, "--run-dir", str(root / host)],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root)

        for host in HOSTS:
            start_host(host)
        net.root, net.ups, net.start_host = root, ups, start_host
        net.server = f"{net.addresses['ps']}:{PORT}"
        yield net
        for proc in ups.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in ups.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def psgrid(net: Network, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the CLI on host `ps`, dialing the coordinator's address on the bridge."""
    return net.run("ps", [sys.executable, "-m", "psgrid", *args, "--server", net.server],
                   capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def job_info(net: Network, job_id: str) -> dict:
    out = psgrid(net, "job", job_id, "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def submit(net: Network, epochs: int) -> str:
    out = psgrid(net, "submit", "--example", "digits", "--epochs", str(epochs), "--seed", "3", timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[0]


def wait_done(net: Network, job_id: str, timeout: float = 180) -> dict:
    return wait_until(lambda: (i := job_info(net, job_id))["state"] in ("SUCCEEDED", "FAILED") and i,
                      timeout, interval=0.5, message=f"job {job_id} to end")


#: Length of the digits jobs across the hosts (the fault-free one and the one that loses a host).
EPOCHS = 12


@pytest.fixture(scope="module")
def fault_free(hosts) -> dict:
    """A digits job across the hosts without faults: what both tests compare with."""
    wait_until(lambda: len(json.loads(psgrid(hosts, "status", "--json").stdout or "{}").get("nodes", [])) >= 3,
               90, interval=0.5, message="both workers registered")
    return wait_done(hosts, submit(hosts, epochs=EPOCHS))


def test_training_converges_across_hosts_as_on_loopback(fault_free, client):
    info = fault_free
    assert info["state"] == "SUCCEEDED" and len(info["shards"]) == 1
    assert info["metrics"]["test_accuracy"] >= 0.95
    # the same job on the loopback cluster of the integration tier (one server)
    spec = JobSpec.from_toml(spec_path("digits")).replace(epochs=EPOCHS, seed=3)
    loopback = client.submit(spec).wait(timeout=180, progress=False)
    assert abs(info["metrics"]["test_accuracy"] - loopback.metrics["test_accuracy"]) <= 1 / 360


def workers(net: Network) -> dict:
    """The coordinator's registered workers by name (those it still hears from)."""
    out = psgrid(net, "status", "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    return {n["name"]: n for n in json.loads(out.stdout)["nodes"] if n.get("role") == "worker"}


def test_a_whole_worker_host_dies_and_the_job_still_finishes_then_the_host_rejoins(hosts, fault_free):
    assert fault_free["state"] == "SUCCEEDED", fault_free
    job_id = submit(hosts, epochs=EPOCHS)
    wait_until(lambda: (i := job_info(hosts, job_id))["total_steps"] and i["step"] >= 0.3 * i["total_steps"],
               120, interval=0.2, message="30% of the job")
    killed = hosts.kill_host("gpu2")  # its supervisor, its worker: everything at once
    assert killed
    started = time.monotonic()
    info = wait_done(hosts, job_id)
    assert info["state"] == "SUCCEEDED", info
    assert abs(info["metrics"]["test_accuracy"] - fault_free["metrics"]["test_accuracy"]) <= 0.01
    assert time.monotonic() - started < 120

    # the host comes back: its worker registers again under its name and takes part in the next job
    hosts.start_host("gpu2")
    wait_until(lambda: "gpu2-worker-0" in workers(hosts) and workers(hosts)["gpu2-worker-0"]["pid"] not in killed,
               90, interval=0.5, message="gpu2's worker to register again")
    after = wait_done(hosts, submit(hosts, epochs=4))
    assert after["state"] == "SUCCEEDED", after
    names = {w["worker_id"]: name for name, w in workers(hosts).items() if w.get("worker_id")}
    assert sorted(names.get(w, w) for w in after["worker_ids"]) == ["gpu1-worker-0", "gpu2-worker-0"]
