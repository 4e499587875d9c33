"""The cluster file of `psgrid up`: parsing, defaults, validation, shorthand, the nodes it builds."""
from __future__ import annotations

import pytest

from psgrid.supervisor.cluster import (ClusterConfig, ServerSection, SupervisorSection, WorkersSection,
                                       format_address)
from psgrid.supervisor.nodes import NodeRole
from psgrid.supervisor.policy import RestartType, Strategy

EXAMPLE = """
[supervisor]
strategy = "rest_for_one"
max_restarts = 7
period_s = 30
port = 0

[server]
host = "0.0.0.0"
port = 7070
checkpoint_dir = "ckpt"
args = ["--heartbeat-timeout", "5"]
liveness_timeout_s = 3

[workers]
count = 3
device = "cpu"
args = ["--threads", "1"]
restart = "transient"
backoff_initial_s = 0.1
"""


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(EXAMPLE)
    return path


def test_a_full_file_is_parsed_into_sections(example):
    config = ClusterConfig.load(example)
    assert config.supervisor == SupervisorSection(Strategy.REST_FOR_ONE, max_restarts=7, period_s=30.0)
    assert config.server.host == "0.0.0.0" and config.server.port == 7070
    assert config.server.checkpoint_dir == "ckpt" and config.server.args == ("--heartbeat-timeout", "5")
    assert config.server.liveness_timeout_s == 3
    assert config.workers.count == 3 and config.workers.device == "cpu"
    assert config.workers.restart is RestartType.TRANSIENT and config.workers.backoff_initial_s == 0.1
    spec = config.supervisor_spec()
    assert spec.strategy is Strategy.REST_FOR_ONE and spec.max_restarts == 7 and spec.period_s == 30.0
    assert spec.names == ("server", "worker-0", "worker-1", "worker-2")
    assert spec.child("worker-2").restart is RestartType.TRANSIENT
    assert spec.child("server").restart is RestartType.PERMANENT


def test_defaults_supervise_a_server_and_two_permanent_workers():
    config = ClusterConfig()
    assert config.supervisor.strategy is Strategy.ONE_FOR_ONE
    assert (config.supervisor.max_restarts, config.supervisor.period_s, config.supervisor.port) == (5, 60.0, 0)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 0)
    assert config.server.checkpoint_dir == ".psgrid/checkpoints"
    assert (config.workers.count, config.workers.device, config.workers.args) == (2, "auto", ())
    nodes = config.nodes()
    assert [(n.name, n.role, n.index) for n in nodes] == [
        ("server", NodeRole.SERVER, 0), ("worker-0", NodeRole.WORKER, 0), ("worker-1", NodeRole.WORKER, 1)]
    server, worker = nodes[0].child, nodes[1].child
    assert server.restart is worker.restart is RestartType.PERMANENT
    assert 1 <= server.liveness_timeout_s <= 10  # a few seconds of failed health checks
    # A worker outlasts the 10 s deadline of one heartbeat RPC to a slow server.
    assert worker.liveness_timeout_s > 10


def test_the_workers_shorthand_equals_a_file_with_only_a_count(tmp_path):
    assert ClusterConfig.load(workers=2) == ClusterConfig()
    path = tmp_path / "cluster.toml"
    path.write_text("[workers]\ncount = 4\n")
    assert ClusterConfig.load(workers=4) == ClusterConfig.load(path)
    assert ClusterConfig.load(workers=0).supervisor_spec().names == ("server",)


def test_flags_override_the_file(example):
    config = ClusterConfig.load(example, workers=1)
    assert config.workers.count == 1 and config.workers.device == "cpu"  # the rest of the table stays


@pytest.mark.parametrize("data, named", [
    ({"supervisor": {"strategy": "one_for_some"}}, "one_for_some"),
    ({"supervisor": {"max_restarts": -1}}, "-1"),
    ({"supervisor": {"max_restarts": 2.5}}, "2.5"),
    ({"supervisor": {"period_s": 0}}, "period_s"),
    ({"supervisor": {"port": 65536}}, "65536"),
    ({"supervisor": {"check_interval_s": -0.5}}, "-0.5"),
    ({"server": {"port": -1}}, "-1"),
    ({"server": {"port": "7070"}}, "'7070'"),
    ({"server": {"host": 5}}, "5"),
    ({"server": {"args": "--update-log x"}}, "--update-log x"),
    ({"server": {"args": ["--port", "1"]}}, "--port"),
    ({"server": {"args": ["--port-file=p"]}}, "--port-file=p"),
    ({"server": {"liveness_timeout_s": 0}}, "liveness_timeout_s"),
    ({"server": {"start_timeout_s": float("inf")}}, "inf"),
    ({"workers": {"count": -2}}, "-2"),
    ({"workers": {"count": True}}, "True"),
    ({"workers": {"device": ""}}, "''"),
    ({"workers": {"restart": "sometimes"}}, "sometimes"),
    ({"workers": {"args": ["--name", "w"]}}, "--name"),
    ({"workers": {"args": [1]}}, "[1]"),
    ({"workers": {"backoff_initial_s": 9, "backoff_max_s": 8}}, "9"),
    ({"workers": {"shutdown_s": -3}}, "-3"),
    ({"workers": {"cuont": 2}}, "cuont"),
    ({"server": {"hots": "x"}}, "hots"),
    ({"worker": {"count": 2}}, "worker"),
    ({"server": 3}, "3"),
])
def test_bad_values_are_refused_naming_the_value(data, named):
    with pytest.raises(ValueError) as info:
        ClusterConfig.from_dict(data)
    assert named in str(info.value)


def test_a_file_with_bad_toml_is_refused(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text("[workers\ncount = 2\n")
    with pytest.raises(ValueError):
        ClusterConfig.load(path)


def test_the_server_command_binds_the_given_port_and_reports_it():
    server = ServerSection(port=0, checkpoint_dir="ckpt", args=("--update-log", "u.jsonl"))
    assert server.argv(0, "run/server.port") == [
        "server", "--host", "127.0.0.1", "--port", "0", "--port-file", "run/server.port",
        "--checkpoint-dir", "ckpt", "--update-log", "u.jsonl"]
    restart = ServerSection(checkpoint_dir="").argv(41234, "p")  # a restart names the bound port
    assert restart[restart.index("--port") + 1] == "41234" and "--checkpoint-dir" not in restart


def test_the_worker_command_names_the_worker_and_its_server():
    workers = WorkersSection(count=3, device="cpu", args=("--threads", "2"))
    assert workers.argv(2, "127.0.0.1:7070", "run/worker-2.alive") == [
        "worker", "--server", "127.0.0.1:7070", "--name", "worker-2", "--local-workers", "3",
        "--device", "cpu", "--liveness-file", "run/worker-2.alive", "--threads", "2"]


@pytest.mark.parametrize("host, dialled", [
    ("127.0.0.1", "127.0.0.1:7070"), ("0.0.0.0", "127.0.0.1:7070"), ("::", "127.0.0.1:7070"),
    ("::1", "[::1]:7070"), ("10.0.0.5", "10.0.0.5:7070"),
])
def test_workers_dial_an_address_they_can_reach(host, dialled):
    assert ServerSection(host=host).address(7070) == dialled


def test_format_address_brackets_ipv6_once():
    assert format_address("::1", 1) == "[::1]:1" and format_address("[::1]", 1) == "[::1]:1"
