"""One real cluster (`psgrid up`: a server and two workers) shared by the integration tier."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest

from helpers.up import Up
from psgrid.client import Client


@dataclasses.dataclass
class Cluster:
    """The shared cluster as tests see it: the server's address and its run directory."""

    up: Up
    address: str
    run_dir: pathlib.Path


def _toml_list(items) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    run_dir = root / "files"
    run_dir.mkdir()
    allow = ("--allow-modules", "psgrid.examples,helpers")  # helpers.models: test-only models
    server_args = ("--update-log", str(run_dir / "updates.jsonl"), *allow,
                   "--metrics-port", "0", "--metrics-port-file", str(run_dir / "metrics.port"))
    cluster_file = (f"[server]\nargs = {_toml_list(server_args)}\n"
                    f"[workers]\ncount = 2\nargs = {_toml_list(('--threads', '1', *allow))}\n")
    # worker-1 lags the jobs that use helpers.models:slow_mlp
    up = Up(root, cluster=cluster_file, env={"PSGRID_TEST_SLOW": "worker-1"})
    try:
        up.wait_running(60)
        yield Cluster(up, up.server_addresses()[0], run_dir)
        assert up.stop() == 0, "SIGTERM must stop every process cleanly: " + up.log.read_text()[-2000:]
    finally:
        up.close()


@pytest.fixture(scope="session")
def client(cluster):
    with Client(cluster.address) as c:
        yield c
