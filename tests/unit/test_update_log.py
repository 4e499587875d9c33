"""`psgrid up` gives each parameter-server shard its own update log, and tells it its name."""
from __future__ import annotations

import dataclasses

import pytest

from psgrid.supervisor.cluster import ClusterConfig
from psgrid.supervisor.sections import shard_path


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``name`` in ``argv`` (either form), or None."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def argv_by_node(config: ClusterConfig, host: str | None = None) -> dict[str, list[str]]:
    return {n.name: config.server_argv(n, n.port, f"run/{n.name}.port")
            for n in config.nodes(host) if n.name == "server" or n.name.startswith("shard-")}


@pytest.mark.parametrize("args", [["--update-log", "run/updates.jsonl"], ["--update-log=run/updates.jsonl"]])
def test_each_shard_gets_its_own_update_log_and_its_name(args):
    config = ClusterConfig.load(servers=3)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, args=tuple(args)))
    argv = argv_by_node(config, "local")
    assert {name: flag(a, "--update-log") for name, a in argv.items()} == {
        "server": "run/updates.jsonl", "shard-1": "run/updates.shard-1.jsonl",
        "shard-2": "run/updates.shard-2.jsonl"}
    assert {name: flag(a, "--shard-name") for name, a in argv.items()} == {
        "server": None, "shard-1": "shard-1", "shard-2": "shard-2"}  # the coordinator's is the default


def test_a_single_server_keeps_its_update_log_as_given():
    config = ClusterConfig.from_dict({"server": {"args": ["--update-log", "u.jsonl", "--heartbeat-timeout", "5"]}})
    (argv,) = argv_by_node(config).values()
    assert argv[-4:] == ["--update-log", "u.jsonl", "--heartbeat-timeout", "5"] and "--shard-name" not in argv


def test_the_shard_name_is_the_supervisors_to_set():
    with pytest.raises(ValueError, match="--shard-name"):
        ClusterConfig.from_dict({"server": {"args": ["--shard-name", "x"]}})


@pytest.mark.parametrize("path, expected", [
    ("updates.jsonl", "updates.shard-1.jsonl"),
    ("run/updates.jsonl", "run/updates.shard-1.jsonl"),
    ("/var/log/psgrid/u.log.jsonl", "/var/log/psgrid/u.log.shard-1.jsonl"),
    ("run.d/updates", "run.d/updates.shard-1"),
])
def test_shard_path_puts_the_name_before_the_suffix(path, expected):
    assert shard_path(path, "shard-1") == expected
