"""`psgrid k8s render`: the manifests validate, refer to each other correctly, and deploy/ is in step.

Every variant (default and GPU, 1/2/4 shards, 2/8 workers) is checked against
the Kubernetes API schema of K8S_VERSION (kubernetes-validate, strict: no
unknown fields), then for what a schema cannot see: Service selectors match
pod labels, probes ask container ports, every mount has its volume, every
Secret and ConfigMap is one the pods may count on, and the coordinator's shard
list names every shard's DNS name. `kubectl kustomize` checks the overlay where
it is installed.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from psgrid import __version__
from psgrid.cli import main
from psgrid.cli.k8s import cmd_probe
from psgrid.cli.k8s_manifests import (SECRET_KEYS, K8sOptions, files, options_for, render, secret_commands,
                                      secrets)
from psgrid.cli.k8s_yaml import dump, dump_all
from psgrid.guard import LIVENESS
from psgrid.spec import tomllib
from psgrid.supervisor.cluster import ClusterConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"
VARIANTS = [(gpu, shards, workers) for gpu in (False, True) for shards in (1, 2, 4) for workers in (2, 8)]


def config() -> ClusterConfig:
    return ClusterConfig.load(DEPLOY / "cluster.toml")


def objects(gpu: bool = False, shards: int = 1, workers: int = 2) -> list[dict]:
    options = options_for(config(), shards=shards, workers=workers, gpu=gpu)
    return [o for group in render(config(), options).values() for o in group]


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


# --- deploy/ and the YAML writer ----------------------------------------------------------


def test_deploy_is_what_render_writes_for_its_cluster_file(tmp_path):
    options = options_for(config(), image=f"psgrid:{__version__}")
    expected = files(config(), options, "cluster.toml")
    present = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml")}
    assert present == set(expected), "stale or missing files: render again (docs/kubernetes.md)"
    for path, text in expected.items():
        assert (DEPLOY / path).read_text() == text, f"deploy/{path} is out of step: " \
            "psgrid k8s render deploy/cluster.toml -o deploy"


def test_the_command_writes_the_same_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["k8s", "render", str(DEPLOY / "cluster.toml"), "-o", str(tmp_path)])
    assert exit_.value.code == 0
    for path in files(config(), options_for(config()), "cluster.toml"):
        assert (tmp_path / path).read_text() == (DEPLOY / path).read_text()
    assert "create secret generic psgrid-tls" in capsys.readouterr().out


@pytest.mark.parametrize("gpu, shards, workers", [(False, 1, 2), (True, 4, 8)])
def test_the_yaml_reads_back_as_the_objects(gpu, shards, workers):
    objs = objects(gpu, shards, workers)
    assert list(yaml.safe_load_all(dump_all(objs))) == objs


@settings(max_examples=150, deadline=None)
@example({"k" * 1100: {"a": [1, {"b": None}]}})  # past YAML's 1024-character implicit key
@example([{"k" * 1100: [1, 2]}])
@given(st.recursive(st.text() | st.integers() | st.booleans() | st.none(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                    max_leaves=8))
def test_any_plain_data_reads_back(value):
    document = {"v": value}
    assert yaml.safe_load(dump(document)) == document


# --- the Kubernetes API schema -------------------------------------------------------------


@pytest.fixture(scope="module")
def validate():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate import utils

    original = utils.schema_contents
    utils.schema_contents = functools.cache(original)  # one read of each schema file, not one per object
    yield lambda obj: kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    utils.schema_contents = original


@pytest.mark.parametrize("gpu, shards, workers", VARIANTS)
def test_every_object_validates_against_the_api_schema(validate, gpu, shards, workers):
    for obj in objects(gpu, shards, workers):
        validate(obj)


def test_the_schema_check_sees_an_unknown_field(validate):
    from kubernetes_validate import ValidationError

    bad = by_kind(objects(), "StatefulSet")["psgrid-worker"]
    bad["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(ValidationError):
        validate(bad)


# --- cross-references ----------------------------------------------------------------------


def pods(objs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(pod name, labels, pod spec) of every pod the workloads make, as their controllers name them."""
    out = []
    for sts in by_kind(objs, "StatefulSet").values():
        template = sts["spec"]["template"]
        for i in range(sts["spec"]["replicas"]):
            name = f"{sts['metadata']['name']}-{i}"
            labels = {**template["metadata"]["labels"], "statefulset.kubernetes.io/pod-name": name}
            out.append((name, labels, template["spec"] | {"claims": sts["spec"].get("volumeClaimTemplates", [])}))
    for deployment in by_kind(objs, "Deployment").values():
        template = deployment["spec"]["template"]
        out.append((deployment["metadata"]["name"], template["metadata"]["labels"], template["spec"]))
    return out


@pytest.mark.parametrize("gpu, shards, workers", VARIANTS)
def test_selectors_ports_volumes_and_secrets_refer_to_what_exists(gpu, shards, workers):
    objs = objects(gpu, shards, workers)
    options = options_for(config(), shards=shards, workers=workers, gpu=gpu)
    made = pods(objs)
    for sts in [*by_kind(objs, "StatefulSet").values(), *by_kind(objs, "Deployment").values()]:
        assert sts["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    for service in by_kind(objs, "Service").values():
        selected = [(n, spec) for n, labels, spec in made if service["spec"]["selector"].items() <= labels.items()]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"].get("ports", []):
            for _, spec in selected:
                assert port["targetPort"] in [p["name"] for c in spec["containers"] for p in c.get("ports", [])]
    selector = by_kind(objs, "Service")["psgrid"]["spec"]["selector"]
    client = [n for n, labels, _ in made if selector.items() <= labels.items()]
    assert client == ["psgrid-ps-0"], "clients reach the coordinator only"
    for sts in by_kind(objs, "StatefulSet").values():
        assert by_kind(objs, "Service")[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    for name, _, spec in made:
        volumes = {v["name"]: v for v in spec["volumes"]} | {c["metadata"]["name"]: c for c in spec.get("claims", [])}
        for container in spec["containers"]:
            check_container(options, objs, name, container, volumes)


def check_container(options: K8sOptions, objs: list[dict], pod: str, container: dict, volumes: dict) -> None:
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values()), f"{pod}: a mount without its volume"
    for volume in volumes.values():
        if "secret" in volume:
            assert volume["secret"]["secretName"] in secrets(options)
            assert all(m["readOnly"] for m in mounts.values() if m["name"] == volume["name"])
        if "configMap" in volume:
            data = by_kind(objs, "ConfigMap")[volume["configMap"]["name"]]["data"]
            assert f"{pod}.toml" in data, f"{pod} has no [server] table"
    env = {e["name"]: e for e in container["env"]}
    for arg in container["args"]:
        assert set(re.findall(r"\$\((\w+)\)", arg)) <= set(env), f"{pod}: {arg} names an undefined variable"
    assert not any("token" in e["name"].lower() or "secretKeyRef" in e.get("valueFrom", {}) for e in env.values())
    secret_files = {f"{m}/{key}" for m in mounts for suffix, keys in SECRET_KEYS.items() for key in keys
                    if mounts[m]["name"] == suffix}
    for flag in ("--token-file", "--tls-ca", "--tls-cert", "--tls-key"):
        assert container["args"][container["args"].index(flag) + 1] in secret_files
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    args = container["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if "grpc" in container[probe]:  # native: the plaintext health port the container opens
            grpc = container[probe]["grpc"]
            assert grpc["port"] == ports["health"] == int(args[args.index("--health-port") + 1]), pod
            assert grpc.get("service", "") == ("" if probe == "readinessProbe" else LIVENESS), (pod, probe)
        else:  # a worker: its liveness file
            command = container[probe]["exec"]["command"]
            assert command[:4] == ["psgrid", "k8s", "probe", "--file"]
            assert command[command.index("--file") + 1] == args[args.index("--liveness-file") + 1]
    assert ("grpc" in ports) == ("health" in ports) == ("--health-port" in args), f"{pod}: a port, a health port"


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_the_coordinator_names_every_shard_by_its_dns_name(shards):
    objs = objects(shards=shards)
    sts, headless = by_kind(objs, "StatefulSet")["psgrid-ps"], by_kind(objs, "Service")["psgrid-ps"]
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    dns = [f"psgrid-ps-{i}.{headless['metadata']['name']}.{sts['metadata']['namespace']}.svc:7070"
           for i in range(sts["spec"]["replicas"])]
    tables = {k: tomllib.loads(v)["server"] for k, v in by_kind(objs, "ConfigMap")["psgrid-ps-shards"]["data"].items()}
    assert tables == {"psgrid-ps-0.toml": {"shards": dns[1:]} if shards > 1 else {},
                      **{f"psgrid-ps-{i}.toml": {"shard_name": f"shard-{i}"} for i in range(1, shards)}}
    worker = by_kind(objs, "StatefulSet")["psgrid-worker"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert worker[worker.index("--server") + 1] == dns[0]
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--advertise") + 1] == "$(POD_NAME).psgrid-ps.psgrid.svc:7070"


def test_the_gpu_variant_requests_a_gpu_and_the_default_cpus_only():
    for gpu in (False, True):
        container = by_kind(objects(gpu), "StatefulSet")["psgrid-worker"]["spec"]["template"]["spec"]["containers"][0]
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) is gpu
        assert container["resources"]["requests"]["cpu"]
        assert {"name": "PSGRID_DEVICE", "value": "cuda" if gpu else "cpu"} in container["env"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay, gpu", [("base", False), ("overlays/gpu", True)])
def test_kubectl_kustomize_builds_what_render_makes(overlay, gpu):
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    built = {(o["kind"], o["metadata"]["name"]): sorted_env(o) for o in yaml.safe_load_all(out)}
    expected = {(o["kind"], o["metadata"]["name"]): sorted_env(o) for o in objects(gpu)}
    assert built == expected


def sorted_env(obj: dict) -> dict:
    """``obj`` with its containers' variables by name: a strategic merge puts the patched ones first."""
    for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        container["env"].sort(key=lambda e: e["name"])
    return obj


# --- the cluster file, the flags, the docs -------------------------------------------------


def test_counts_and_port_come_from_a_multi_host_cluster_file(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('[hosts.ps]\naddress = "10.0.0.5"\nservers = 2\nserver_port = 7080\n'
                    '[hosts.gpu1]\naddress = "10.0.0.6"\nworkers = 3\n'
                    '[hosts.gpu2]\naddress = "10.0.0.7"\nworkers = 1\n')
    options = options_for(ClusterConfig.load(path))
    assert (options.shards, options.workers, options.port) == (2, 4, 7080)
    assert options_for(ClusterConfig.load(path), workers=8).workers == 8


@pytest.mark.parametrize("bad", ['[server]\nargs = ["--token-file", "t"]\n', '[workers]\nargs = ["--tls-ca=x"]\n',
                                 '[server]\nargs = ["--shards", "a:1"]\n', "[server\n"])
def test_a_cluster_file_that_sets_what_the_pods_set_is_refused(tmp_path, bad, capsys):
    (tmp_path / "c.toml").write_text(bad)
    with pytest.raises(SystemExit) as exit_:
        main(["k8s", "render", str(tmp_path / "c.toml"), "-o", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "cannot render" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("name", "Psgrid"), ("namespace", "a_b"), ("shards", 0),
                                          ("workers", -1), ("port", 0), ("image", "")])
def test_bad_options_name_the_value(field, value):
    with pytest.raises(ValueError, match=field):
        K8sOptions(**{field: value})


def test_the_docs_make_the_secrets_the_pods_mount():
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for command in secret_commands(K8sOptions()):
        assert command in docs


# --- psgrid k8s probe --file --------------------------------------------------------------


def probe(**args) -> int:
    import argparse

    return cmd_probe(argparse.Namespace(**{"file": None, "max_age": None, **args}))


def test_the_file_probe_passes_on_a_fresh_file_only(tmp_path):
    alive = tmp_path / "alive"
    assert probe(file=str(alive)) == 1
    alive.touch()
    assert probe(file=str(alive)) == 0 and probe(file=str(alive), max_age=30) == 0
    old = time.time() - 60
    os.utime(alive, (old, old))
    assert probe(file=str(alive), max_age=30) == 1 and probe(file=str(alive)) == 0
