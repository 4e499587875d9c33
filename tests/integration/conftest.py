"""One real cluster (a server process and two worker processes) shared by the integration tier."""
from __future__ import annotations

import pytest

from psgrid.client import Client
from psgrid.local import LocalCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cluster")
    allow = ("--allow-modules", "psgrid.examples,helpers")  # helpers.models: test-only models
    c = LocalCluster(run_dir, workers=0, threads=1, worker_args=allow,
                     server_args=("--update-log", str(run_dir / "updates.jsonl"), *allow,
                                  "--metrics-port", "0", "--metrics-port-file", str(run_dir / "metrics.port")))
    c.start()
    c.start_worker()
    c.start_worker(env={"PSGRID_TEST_SLOW": "1"})  # lags only jobs using slow_mlp
    yield c
    c.stop()
    assert all(p.returncode == 0 for p in c.processes()), "SIGTERM must stop every process cleanly"


@pytest.fixture(scope="session")
def client(cluster):
    with Client(cluster.address) as c:
        yield c


