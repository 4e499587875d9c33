"""The rendered Kubernetes cluster runs: each pod started from the manifests as a kubelet would.

`psgrid k8s render` writes the manifests (2 shards, 2 workers); the test reads
them back and plays the controllers and the kubelet as far as one machine
allows: a network namespace per pod on one bridge, the pods' and Services'
DNS names in each namespace's hosts file (`ip netns exec` mounts
/etc/netns/NS/hosts over /etc/hosts), the container's command, args and
environment exactly as rendered (`$(VAR)` expanded, downward-API values
filled in), the Secrets, the ConfigMap and the volumes as directories. The one
liberty: a mount path is a directory under the test's temporary folder
(`/etc/psgrid/tls` -> `TMP/pods/POD/etc/psgrid/tls`), substituted wherever the
manifests name it. A client in its own namespace trains digits through the
client Service with the cluster's token and TLS; a worker pod is SIGKILLed and
started again under the same name and command, as the StatefulSet controller
would; the job completes. Every probe passes on every pod, and SIGTERM stops
the servers within their grace period, after a final checkpoint.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from contextlib import ExitStack

import pytest
import yaml

from psgrid.cli import main
from psgrid.cli.certs import make_node
from psgrid.cli.k8s_manifests import K8sOptions, tls_hosts

from helpers.netns import Network, unavailable_reason
from helpers.wait import wait_until

REASON = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(150),
              pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}")]

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
#: The image's environment: psgrid on the PATH (and iproute2 for `ip netns exec` itself).
IMAGE_ENV = {"PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: Short enough for 2 cores; one CPU thread per worker as on the other multi-process tests.
CLUSTER = """
[server]
port = 7070
shutdown_s = 60
args = ["--heartbeat-timeout", "3", "--checkpoint-interval", "2"]
[workers]
liveness_timeout_s = 30
args = ["--threads", "1"]
"""
CLIENT = """
import json, sys, time
from psgrid.client import Client
from psgrid.examples import spec_path
from psgrid.security import Security
from psgrid.spec import JobSpec
address, token, ca, cert, key, epochs = sys.argv[1:]
security = Security.from_files(token_file=token, ca=ca, cert=cert, key=key)
with Client(address, security=security) as client:
    job = client.submit(JobSpec.from_toml(spec_path("digits")).replace(epochs=int(epochs), seed=3))
    print("job", job.job_id, flush=True)
    while (info := job.status()).state.value not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        print("step", info.step, info.total_steps, flush=True)
        time.sleep(0.1)
    workers = sorted(w.name for w in client.workers())
    print("done", json.dumps({"state": info.state.value, "metrics": info.metrics, "workers": workers}), flush=True)
"""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables only, ``$$`` escapes."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class Pod:
    """One pod of a rendered workload, as its kubelet would run its (only) container."""

    def __init__(self, name: str, spec: dict, claims: list[dict], objects: dict, root: pathlib.Path, env: dict):
        self.name, self.spec = name, spec
        self.container = spec["containers"][0]
        self.dir = root / "pods" / name
        self.mounts = {m["mountPath"]: self._volume(m["name"], spec, claims, objects, root)
                       for m in self.container["volumeMounts"]}
        self.env = dict(IMAGE_ENV)
        for var in self.container["env"]:
            self.env[var["name"]] = self._value(var, env)
        self.argv = [self.path(expand(a, self.env)) for a in self.container["command"] + self.container["args"]]
        self.cwd = self.path(self.container["workingDir"])
        self.grace = spec["terminationGracePeriodSeconds"]
        self.proc: subprocess.Popen | None = None
        self.terminating = False

    def _volume(self, name: str, spec: dict, claims: list[dict], objects: dict, root: pathlib.Path) -> pathlib.Path:
        volume = next((v for v in spec["volumes"] if v["name"] == name), None)
        if volume is None:  # a volumeClaimTemplate: the StatefulSet's claim NAME-POD
            assert name in [c["metadata"]["name"] for c in claims]
            path = root / "volumes" / f"{name}-{self.name}"
        elif "secret" in volume:
            path = root / "secrets" / volume["secret"]["secretName"]
            assert path.is_dir(), f"Secret {volume['secret']['secretName']} was never created"
        elif "configMap" in volume:
            path = root / "configmaps" / volume["configMap"]["name"]
            data = objects[("ConfigMap", volume["configMap"]["name"])]["data"]
            path.mkdir(parents=True, exist_ok=True)
            for key, text in data.items():
                (path / key).write_text(text)
        else:
            assert "emptyDir" in volume
            path = self.dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _value(self, var: dict, env: dict) -> str:
        if "value" in var:
            return self.path(var["value"])
        source = var["valueFrom"]
        if "fieldRef" in source:
            return {"metadata.name": self.name, "metadata.namespace": env["namespace"]}[source["fieldRef"]["fieldPath"]]
        limit = self.container["resources"]["limits"][source["resourceFieldRef"]["resource"].split(".", 1)[1]]
        return str(math.ceil(float(limit)))

    def path(self, text: str) -> str:
        """``text`` with a mount path at its start replaced by the directory standing in for it."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if text == mount or text.startswith(mount.rstrip("/") + "/"):
                return str(self.mounts[mount]) + text[len(mount):]
        return text

    def start(self, net: Network) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.terminating = False
        with open(self.dir / "log", "ab") as log:
            self.proc = net.popen(self.name, self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def probe(self, net: Network, kind: str) -> subprocess.CompletedProcess:
        spec = self.container[kind]
        if "grpc" in spec:  # as the kubelet asks: a plaintext grpc.health.v1 Check of the service
            target = [f"127.0.0.1:{spec['grpc']['port']}", spec["grpc"].get("service", "")]
            return net.run(self.name, [sys.executable, "-c", GRPC_PROBE, *target], capture_output=True, text=True,
                           timeout=spec["timeoutSeconds"] * 4)
        command = [self.path(a) for a in spec["exec"]["command"]]
        return net.run(self.name, command, env=self.env, cwd=self.cwd, capture_output=True, text=True,
                       timeout=spec["timeoutSeconds"] * 4)

    def ready(self, net: Network, logged: str) -> bool:
        """Whether the readiness probe passes, asked once the log says ``logged`` (a probe is a
        Python process: polling with it would take the cores the pods are starting on)."""
        return logged in self.log() and self.probe(net, "readinessProbe").returncode == 0

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text() if path.exists() else ""

    def terminate(self) -> None:
        """The kubelet's SIGTERM when the pod is deleted (once: Python's exit restores the default handler)."""
        if self.proc is not None and self.proc.poll() is None and not self.terminating:
            self.proc.send_signal(signal.SIGTERM)
            self.terminating = True

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL when the grace period is over; the exit code (None: killed)."""
        self.terminate()
        return self.wait(self.grace)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def rendered(root: pathlib.Path) -> tuple[K8sOptions, dict]:
    (root / "cluster.toml").write_text(CLUSTER)
    with pytest.raises(SystemExit) as exit_:
        main(["k8s", "render", str(root / "cluster.toml"), "-o", str(root / "manifests"), "--shards", "2"])
    assert exit_.value.code == 0
    documents = [d for f in sorted((root / "manifests" / "base").glob("*.yaml")) if f.name != "kustomization.yaml"
                 for d in yaml.safe_load_all(f.read_text())]
    return K8sOptions(shards=2), {(d["kind"], d["metadata"]["name"]): d for d in documents}


def make_secrets(root: pathlib.Path, options: K8sOptions) -> None:
    """What docs/kubernetes.md's `psgrid certs` and `kubectl create secret` commands make."""
    cert, key = make_node(root / "pki", "node", tls_hosts(options))
    tls, token = root / "secrets" / f"{options.name}-tls", root / "secrets" / f"{options.name}-token"
    tls.mkdir(parents=True)
    token.mkdir(parents=True)
    shutil.copy(root / "pki" / "ca.pem", tls / "ca.pem")
    shutil.copy(cert, tls / "tls.pem")
    shutil.copy(key, tls / "tls.key")
    (token / "token").write_text("k8s-test-token\n")


def make_pods(root: pathlib.Path, options: K8sOptions, objects: dict) -> dict[str, Pod]:
    """Every pod the StatefulSets and the Deployment would make, and their labels."""
    pods, env = {}, {"namespace": options.namespace}
    for (kind, name), obj in objects.items():
        if kind not in ("StatefulSet", "Deployment"):
            continue
        count = obj["spec"]["replicas"] if kind == "StatefulSet" else 1  # serve: scaled to 1 with its job
        for i in range(count):
            pod_name = f"{name}-{i}" if kind == "StatefulSet" else name
            template = obj["spec"]["template"]
            pod = Pod(pod_name, template["spec"], obj["spec"].get("volumeClaimTemplates", []), objects, root, env)
            pod.labels = {**template["metadata"]["labels"], "statefulset.kubernetes.io/pod-name": pod_name}
            pod.subdomain = obj["spec"].get("serviceName")
            pods[pod_name] = pod
    return pods


def hosts_file(net: Network, options: K8sOptions, objects: dict, pods: dict[str, Pod]) -> str:
    """Cluster DNS as a hosts file: each StatefulSet pod, and each ClusterIP Service at the pod it selects."""
    lines = ["127.0.0.1 localhost"]
    for name, pod in pods.items():
        if pod.subdomain:
            lines.append(f"{net.addresses[name]} {name}.{pod.subdomain}.{options.namespace}.svc")
    for (kind, name), service in objects.items():
        if kind == "Service" and service["spec"].get("clusterIP") != "None":
            selected = [p for p, pod in pods.items() if service["spec"]["selector"].items() <= pod.labels.items()]
            assert len(selected) == 1, f"Service {name} selects {selected}"
            lines.append(f"{net.addresses[selected[0]]} {name}.{options.namespace}.svc")
    return "\n".join(lines) + "\n"


def remove_empty(folder: pathlib.Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # another test's namespaces still use it
        pass


GRPC_PROBE = """
import sys, grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
reply = g.HealthStub(grpc.insecure_channel(sys.argv[1])).Check(h.HealthCheckRequest(service=sys.argv[2]), timeout=5)
name = h.HealthCheckResponse.ServingStatus.Name(reply.status)
print(name)
sys.exit(0 if name == "SERVING" else 1)
"""


def probe_kinds(pod: Pod) -> list[str]:
    """The pod's probes, one of each distinct target (startup and liveness often ask the same)."""
    kinds: dict[str, str] = {}
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        spec = pod.container[kind]
        kinds.setdefault(json.dumps(spec.get("grpc") or spec["exec"]["command"], sort_keys=True), kind)
    return list(kinds.values())


@pytest.fixture
def cluster(tmp_path):
    options, objects = rendered(tmp_path)
    make_secrets(tmp_path, options)
    pods = make_pods(tmp_path, options, objects)
    with ExitStack() as stack:
        net = stack.enter_context(Network([*pods, "client"]))
        hosts = hosts_file(net, options, objects, pods)
        if not pathlib.Path("/etc/netns").exists():
            stack.callback(remove_empty, pathlib.Path("/etc/netns"))
        for ns in net.namespaces.values():
            folder = pathlib.Path("/etc/netns") / ns
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
            folder.mkdir(parents=True)
            (folder / "hosts").write_text(hosts)
        stack.callback(lambda: [pod.kill() for pod in pods.values()])
        yield net, options, pods, tmp_path


def test_the_rendered_cluster_trains_survives_a_worker_pod_kill_and_stops_cleanly(cluster):
    net, options, pods, root = cluster
    ps, workers = [pods["psgrid-ps-0"], pods["psgrid-ps-1"]], [pods["psgrid-worker-0"], pods["psgrid-worker-1"]]
    serve = pods["psgrid-serve"]
    for pod in (*ps, *workers):
        pod.start(net)
    wait_until(lambda: all(pod.ready(net, "[ps] serving on") for pod in ps), 60, interval=0.2,
               message="the shards to be ready")

    secret = root / "secrets"
    client = net.popen("client", [sys.executable, "-c", CLIENT, f"{options.client_host}:{options.port}",
                                  str(secret / "psgrid-token" / "token"), str(secret / "psgrid-tls" / "ca.pem"),
                                  str(secret / "psgrid-tls" / "tls.pem"), str(secret / "psgrid-tls" / "tls.key"), "12"],
                       env=IMAGE_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = client.stdout.readline().split()[-1]
        assert job_id.startswith("job-"), client.stderr.read()
        serve.env["PSGRID_JOB"] = job_id  # kubectl set env deployment/psgrid-serve PSGRID_JOB=...; scale to 1
        serve.argv = [serve.path(expand(a, serve.env)) for a in serve.container["command"] + serve.container["args"]]
        serve.start(net)
        killed = False
        for line in client.stdout:
            word, *rest = line.split(maxsplit=1)
            if word == "step" and not killed and (step := [int(v) for v in rest[0].split()])[1] \
                    and step[0] >= 0.3 * step[1]:
                workers[0].kill()  # the pod dies; the StatefulSet makes it again, same name
                shutil.rmtree(workers[0].dir / "tmp")  # a new pod: a fresh emptyDir
                workers[0].mounts["/tmp"].mkdir()
                workers[0].start(net)
                killed = True
            elif word == "done":
                result = json.loads(rest[0])
                break
        else:
            pytest.fail(f"the client ended early: {client.stderr.read()}")
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()
    assert killed and result["state"] == "SUCCEEDED", result
    assert result["metrics"]["test_accuracy"] >= 0.95
    assert result["workers"] == ["psgrid-worker-0", "psgrid-worker-1"]  # the new pod took its name back

    wait_until(lambda: serve.ready(net, "now serving version"), 60, interval=0.2,
               message="psgrid serve to load the model")
    for pod in (*ps, *workers, serve):
        for kind in probe_kinds(pod):
            out = pod.probe(net, kind)
            assert out.returncode == 0, f"{pod.name} {kind}: {out.stderr}"
            assert "grpc" not in pod.container[kind] or out.stdout.strip() == "SERVING"

    # Deletion: SIGTERM to every pod at once; each ends within its grace period, the servers
    # after a final checkpoint.
    for pod in (serve, *workers, *ps):
        pod.terminate()
    for pod in (serve, *workers, *ps):
        assert (code := pod.stop()) == 0, f"{pod.name} exited {code}: {pod.log()[-1500:]}"
    for pod in ps:
        assert "final checkpoint" in pod.log()
        assert any(pod.mounts["/var/lib/psgrid"].rglob("*")), f"{pod.name} wrote no checkpoint"
