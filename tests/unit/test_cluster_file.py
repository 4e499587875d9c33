"""The cluster file of `psgrid up`, single- and multi-host: parsing, validation, the nodes and argv it builds."""
from __future__ import annotations

import pytest

from psgrid.cli import build_parser
from psgrid.server.config import ServerConfig
from psgrid.supervisor.cluster import (ChildSecurity, ClusterConfig, ServerSection, SupervisorSection,
                                       WorkersSection, format_address)
from psgrid.supervisor.process import ProcessSupervisor
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


# ---- the multi-host form --------------------------------------------------------------

MULTI = """
[supervisor]
strategy = "rest_for_one"

[hosts.ps]
address = "10.0.0.5"
bind = "0.0.0.0"
servers = 3
server_port = 7070

[hosts.gpu1]
address = "10.0.0.6"
workers = 2
device = "cuda"

[hosts.gpu2]
address = "10.0.0.7"
workers = 1

[server]
checkpoint_dir = "ckpt"
args = ["--heartbeat-timeout", "5"]

[workers]
device = "cpu"
args = ["--threads", "1"]
liveness_timeout_s = 20
"""


@pytest.fixture
def multi(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(MULTI)
    return ClusterConfig.load(path)


def test_host_tables_are_parsed_with_their_defaults(multi):
    assert multi.multi_host and not ClusterConfig().multi_host
    assert [h.name for h in multi.hosts] == ["ps", "gpu1", "gpu2"]
    ps, gpu1, gpu2 = multi.hosts
    assert (ps.address, ps.bind, ps.servers, ps.server_port, ps.workers) == ("10.0.0.5", "0.0.0.0", 3, 7070, 0)
    assert (gpu1.bind, gpu1.servers, gpu1.workers, gpu1.device) == ("10.0.0.6", 0, 2, "cuda")
    assert gpu2.device == "" and multi.server_host is ps
    assert multi.coordinator_address() == "10.0.0.5:7070"
    assert multi.shard_addresses() == ("10.0.0.5:7071", "10.0.0.5:7072")


def test_each_host_runs_its_own_nodes_shards_before_the_coordinator(multi):
    ps = multi.nodes("ps")
    assert [(n.name, n.role, n.index, n.bind, n.port, n.advertise_host) for n in ps] == [
        ("shard-1", NodeRole.SERVER, 1, "0.0.0.0", 7071, "10.0.0.5"),
        ("shard-2", NodeRole.SERVER, 2, "0.0.0.0", 7072, "10.0.0.5"),
        ("server", NodeRole.SERVER, 0, "0.0.0.0", 7070, "10.0.0.5")]
    gpu1, gpu2 = multi.nodes("gpu1"), multi.nodes("gpu2")
    assert [(n.name, n.role, n.index, n.device, n.local_workers) for n in gpu1] == [
        ("gpu1-worker-0", NodeRole.WORKER, 0, "cuda", 2), ("gpu1-worker-1", NodeRole.WORKER, 1, "cuda", 2)]
    assert [(n.name, n.device, n.local_workers) for n in gpu2] == [("gpu2-worker-0", "cpu", 1)]
    assert all(n.child.liveness_timeout_s == 20 for n in (*gpu1, *gpu2))
    spec = multi.supervisor_spec("ps")
    assert spec.names == ("shard-1", "shard-2", "server") and spec.strategy is Strategy.REST_FOR_ONE
    names = [n.name for n in multi.all_nodes()]
    assert len(names) == len(set(names)) == 6


def test_the_coordinator_is_told_the_other_shards_and_every_server_its_advertised_address(multi):
    ps = {n.name: n for n in multi.nodes("ps")}
    security = ("--token-file", "/s/token")
    assert multi.server_argv(ps["server"], 7070, "run/server.port", advertise="10.0.0.5:7070",
                             extra=security) == [
        "server", "--host", "0.0.0.0", "--port", "7070", "--port-file", "run/server.port",
        "--advertise", "10.0.0.5:7070", "--shards", "10.0.0.5:7071,10.0.0.5:7072",
        "--checkpoint-dir", "ckpt/server", "--token-file", "/s/token", "--heartbeat-timeout", "5"]
    shard = multi.server_argv(ps["shard-2"], 7072, "p", advertise="10.0.0.5:7072")
    assert shard[:9] == ["server", "--host", "0.0.0.0", "--port", "7072", "--port-file", "p",
                         "--advertise", "10.0.0.5:7072"]
    assert "--shards" not in shard and shard[shard.index("--checkpoint-dir") + 1] == "ckpt/shard-2"


def test_workers_on_every_host_dial_the_coordinator_under_cluster_unique_names(multi):
    worker = multi.nodes("gpu1")[1]
    assert multi.worker_argv(worker, multi.coordinator_address(), "run/gpu1-worker-1.alive",
                             extra=("--tls-ca", "/c/ca.pem")) == [
        "worker", "--server", "10.0.0.5:7070", "--name", "gpu1-worker-1", "--local-workers", "2",
        "--device", "cuda", "--liveness-file", "run/gpu1-worker-1.alive", "--tls-ca", "/c/ca.pem",
        "--threads", "1"]


def test_host_selection(multi):
    with pytest.raises(ValueError, match="give --host NAME, one of: ps, gpu1, gpu2"):
        multi.nodes()
    with pytest.raises(ValueError, match="no host named 'gpu9'.*hosts: ps, gpu1, gpu2"):
        multi.supervisor_spec("gpu9")
    with pytest.raises(ValueError, match="no \\[hosts.NAME\\] tables"):
        ClusterConfig().nodes("ps")
    ClusterConfig().check_host(None)
    multi.check_host("gpu2")


def test_shards_may_spread_over_several_hosts_numbered_in_file_order():
    config = ClusterConfig.from_dict(_multi(
        ps__servers=2, gpu1__servers=2, gpu1__server_port=8080, gpu2__address="10.0.0.7", gpu2__workers=1))
    assert config.coordinator_address() == "10.0.0.5:7070"
    assert config.shard_addresses() == ("10.0.0.5:7071", "10.0.0.6:8080", "10.0.0.6:8081")
    ps, gpu1 = config.nodes("ps"), config.nodes("gpu1")
    assert [(n.name, n.index, n.port, n.advertise_host) for n in ps] == [
        ("shard-1", 1, 7071, "10.0.0.5"), ("server", 0, 7070, "10.0.0.5")]
    assert [n.name for n in gpu1] == ["shard-2", "shard-3", "gpu1-worker-0"]
    assert [(n.role, n.index, n.port, n.advertise_host) for n in gpu1[:2]] == [
        (NodeRole.SERVER, 2, 8080, "10.0.0.6"), (NodeRole.SERVER, 3, 8081, "10.0.0.6")]
    server = {n.name: n for n in ps}["server"]
    argv = config.server_argv(server, 7070, "p", advertise="10.0.0.5:7070")
    assert argv[argv.index("--shards") + 1] == "10.0.0.5:7071,10.0.0.6:8080,10.0.0.6:8081"
    assert "--shards" not in config.server_argv(gpu1[0], 8080, "p", advertise="10.0.0.6:8080")


def test_the_single_host_form_is_unchanged_by_the_multi_host_one():
    assert ClusterConfig().coordinator_address() is None and ClusterConfig().shard_addresses() == ()
    config = ClusterConfig.from_dict({"server": {"host": "0.0.0.0", "port": 7070}})
    assert config.coordinator_address() == "127.0.0.1:7070"
    server = config.nodes()[0]
    assert (server.name, server.bind, server.port, server.advertise_host) == ("server", "0.0.0.0", 7070, "127.0.0.1")
    argv = config.server_argv(server, 7070, "p", advertise="127.0.0.1:7070", extra=("--token-file", "/t"))
    assert argv == ["server", "--host", "0.0.0.0", "--port", "7070", "--port-file", "p",
                    "--advertise", "127.0.0.1:7070", "--checkpoint-dir", ".psgrid/checkpoints",
                    "--token-file", "/t"]
    worker = config.nodes()[2]
    assert config.worker_argv(worker, "127.0.0.1:7070", "a") == WorkersSection().argv(1, "127.0.0.1:7070", "a")


def _multi(**changes) -> dict:
    data = {"hosts": {"ps": {"address": "10.0.0.5", "servers": 1, "server_port": 7070},
                      "gpu1": {"address": "10.0.0.6", "workers": 1}}}
    for key, value in changes.items():
        table, _, field = key.partition("__")
        if table in ("ps", "gpu1", "gpu2"):
            data["hosts"].setdefault(table, {})[field] = value
        else:
            data.setdefault(table, {})[field] = value
    return data


@pytest.mark.parametrize("data, named", [
    (_multi(ps__servers=0, ps__server_port=0, ps__workers=1), "no host runs servers"),
    (_multi(ps__server_port=0), "hosts.ps.server_port must be a fixed port"),
    (_multi(ps__servers=2, ps__server_port=65535), "65535"),
    (_multi(ps__address="0.0.0.0"), "'0.0.0.0'"),
    (_multi(gpu2__workers=1), "hosts.gpu2.address"),
    (_multi(gpu1__workers=0), "hosts.gpu1 runs nothing"),
    (_multi(gpu1__server_port=7070), "hosts.gpu1.server_port is 7070"),
    (_multi(gpu1__servers=-1), "-1"),
    (_multi(gpu1__workers=1.5), "1.5"),
    (_multi(gpu1__wokers=2), "wokers"),
    (_multi(gpu1__name="x"), "name"),
    (_multi(gpu1__device=3), "3"),
    (_multi(ps__bind=0), "hosts.ps.bind"),
    (_multi(server__port=7070), "server.port is not used in the multi-host form"),
    (_multi(server__host="0.0.0.0"), "server.host is not used in the multi-host form"),
    (_multi(workers__count=4), "workers.count is not used in the multi-host form"),
    (_multi(server__args=["--shards", "a:1"]), "--shards"),
    (_multi(server__args=["--advertise=a:1"]), "--advertise"),
    ({"hosts": 3}, "[hosts]"),
    ({"hosts": {}}, "[hosts]"),
    ({"hosts": {"ps": 3}}, "3"),
    ({"hosts": {"gpu 1": {"address": "a", "workers": 1}}}, "'gpu 1'"),
])
def test_bad_multi_host_files_are_refused_naming_the_problem(data, named):
    with pytest.raises(ValueError) as info:
        ClusterConfig.from_dict(data)
    assert named in str(info.value)


def test_workers_shorthand_is_refused_for_a_multi_host_file(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(MULTI)
    with pytest.raises(ValueError, match="--workers applies to the single-host form"):
        ClusterConfig.load(path, workers=2)


def test_security_files_are_passed_on_as_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = ChildSecurity(token_file="token", tls_ca="certs/ca.pem", tls_cert="/abs/n.pem", tls_key="k")
    assert files.argv() == ("--token-file", str(tmp_path / "token"), "--tls-ca", str(tmp_path / "certs/ca.pem"),
                            "--tls-cert", "/abs/n.pem", "--tls-key", str(tmp_path / "k"))
    assert ChildSecurity().argv() == () and ChildSecurity(token_file="t").argv()[0] == "--token-file"


def test_a_host_supervisor_reports_advertised_addresses_before_anything_starts(tmp_path):
    # Fixed ports: every address is known from the file alone (no process is started here).
    config = ClusterConfig.from_dict(_multi(ps__servers=2, ps__bind="0.0.0.0"))
    ps = ProcessSupervisor(config, tmp_path / "ps", host="ps", security=ChildSecurity(tls_ca=None))
    assert ps.server_address == "10.0.0.5:7070"
    assert [(n.name, n.role, n.address) for n in ps.nodes()] == [
        ("shard-1", NodeRole.SERVER, "10.0.0.5:7071"), ("server", NodeRole.SERVER, "10.0.0.5:7070")]
    gpu1 = ProcessSupervisor(config, tmp_path / "gpu1", host="gpu1")
    assert gpu1.server_address == "10.0.0.5:7070"
    assert [(n.name, n.address) for n in gpu1.nodes()] == [("gpu1-worker-0", "")]
    with pytest.raises(ValueError, match="give --host"):
        ProcessSupervisor(config, tmp_path / "x")
    single = ProcessSupervisor(ClusterConfig(), tmp_path / "single")
    assert single.server_address is None  # port 0: known once the server reports it


def test_psgrid_up_refuses_a_multi_host_file_without_host_before_starting_anything(tmp_path, capsys):
    path = tmp_path / "cluster.toml"
    path.write_text(MULTI)
    args = build_parser().parse_args(["up", str(path), "--run-dir", str(tmp_path / "run")])
    assert args.func(args) == 2
    assert "give --host NAME, one of: ps, gpu1, gpu2" in capsys.readouterr().err
    args = build_parser().parse_args(["up", str(path), "--host", "nope", "--run-dir", str(tmp_path / "run")])
    assert args.func(args) == 2 and "hosts: ps, gpu1, gpu2" in capsys.readouterr().err
    args = build_parser().parse_args(["up", "--host", "ps", "--run-dir", str(tmp_path / "run")])
    assert args.func(args) == 2 and "no [hosts.NAME] tables" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["10.0.0.5:7070", "[::1]:1", "ps.example:65535"])
def test_a_server_may_advertise_an_address(value):
    assert ServerConfig(advertise=value).advertise == value
    args = build_parser().parse_args(["server", "--advertise", value])
    assert args.advertise == value


@pytest.mark.parametrize("value", ["10.0.0.5", ":7070", "h:0", "h:70000", "h:x", ""])
def test_a_bad_advertised_address_is_refused(value):
    with pytest.raises(ValueError, match="advertise"):
        ServerConfig(advertise=value)


def test_servers_shorthand_makes_one_local_host_with_shards():
    config = ClusterConfig.load(None, workers=3, servers=2)
    config.check_host("local")
    host = config.server_host
    assert (host.name, host.servers, host.server_port, host.workers) == ("local", 2, 7070, 3)
    assert config.shard_addresses() == ("127.0.0.1:7071",)
    assert ClusterConfig.load(None, servers=1).hosts == ()
