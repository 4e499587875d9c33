"""A psgrid cluster file as Kubernetes objects: what ``psgrid k8s render`` writes.

One cluster file drives both ``psgrid up`` and Kubernetes. Its ``[server]``
and ``[workers]`` tables give the nodes' extra flags, grace periods, start and
liveness timeouts; the shard and worker counts come from the file (the
single-host ``[workers] count``, or the sums over ``[hosts.NAME]``) unless
:class:`K8sOptions` overrides them. Kubernetes takes the supervisor's place:
it restarts pods, keeps their names and volumes, and holds the credentials.

The objects, in apply order (``NAME`` is :attr:`K8sOptions.name`):

* ``Namespace``;
* parameter servers: a headless Service ``NAME-ps`` (pod DNS names
  ``NAME-ps-I.NAME-ps.NAMESPACE.svc``), a ConfigMap ``NAME-ps-shards`` with one
  ``[server]`` table per shard (the coordinator, pod 0, lists every other
  shard; the others get their ``shard_name``), the StatefulSet ``NAME-ps``
  with a checkpoint volume per shard, a PodDisruptionBudget, and the ClusterIP
  Service ``NAME`` that clients dial (pod 0 only);
* workers: a headless Service and the StatefulSet ``NAME-worker``; a pod's
  name is its ``--name``, so a restarted pod takes its rank back;
* ``psgrid serve``: a Deployment ``NAME-serve`` following a job, and its Service.

Every pod runs as a non-root user on a read-only root filesystem (``/tmp`` an
emptyDir), mounts the Secrets ``NAME-token`` and ``NAME-tls`` (see
:func:`secrets`) read-only and passes them as ``--token-file``/``--tls-*``.
Servers and ``psgrid serve`` are probed with Kubernetes' native gRPC probe on
their ``--health-port``: grpc.health.v1 alone, in plaintext (the kubelet's
probe speaks no TLS and sends no token; psgrid's own ports want both). Service
``psgrid.liveness`` answers the startup and liveness probes (the process is
alive), service "" the readiness probe (restored, or a model loaded). Workers
serve no port: an exec probe (``psgrid k8s probe --file``) checks that their
liveness file is fresh, as ``psgrid up`` does. docs/kubernetes.md explains the rest.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

from psgrid.guard import LIVENESS
from psgrid.supervisor.cluster import ClusterConfig

TOKEN_DIR = "/etc/psgrid/token"
TLS_DIR = "/etc/psgrid/tls"
SHARDS_DIR = "/etc/psgrid/shards"
DATA_DIR = "/var/lib/psgrid"
TMP_DIR = "/tmp"
LIVENESS_FILE = f"{TMP_DIR}/psgrid-alive"
#: Files of each Secret, by the Secret's name suffix.
SECRET_KEYS = {"token": ("token",), "tls": ("ca.pem", "tls.pem", "tls.key")}
SECURITY_ARGS = ("--token-file", f"{TOKEN_DIR}/token", "--tls-ca", f"{TLS_DIR}/ca.pem",
                 "--tls-cert", f"{TLS_DIR}/tls.pem", "--tls-key", f"{TLS_DIR}/tls.key")
#: Flags the rendered pods set themselves; the cluster file's ``args`` may not.
RESERVED = ("--config", "--shards", "--token-file", "--tls-ca", "--tls-cert", "--tls-key", "--health-port")
USER_ID = 10001
PROBE_PERIOD_S = 10
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")


@dataclasses.dataclass(frozen=True)
class K8sOptions:
    """What the cluster file does not say: names, image, sizes, and the GPU variant."""

    name: str = "psgrid"
    namespace: str = "psgrid"
    image: str = "psgrid:0.1.0"
    shards: int = 1
    workers: int = 2
    port: int = 7070
    serve_port: int = 7072
    #: The plaintext grpc.health.v1 port of the servers and serve pods (native gRPC probes).
    health_port: int = 7079
    #: Each shard's checkpoint volume.
    storage: str = "10Gi"
    #: The job ``psgrid serve`` follows; "" renders the Deployment with 0 replicas.
    serve_job: str = ""
    #: Workers request an ``nvidia.com/gpu`` and run the CUDA image (the GPU overlay).
    gpu: bool = False

    def __post_init__(self) -> None:
        for field, longest in (("name", 40), ("namespace", 63)):
            value = getattr(self, field)
            if not isinstance(value, str) or len(value) > longest or not _DNS_LABEL.match(value):
                raise ValueError(f"{field} must be a DNS label (a-z, 0-9, '-') of at most {longest} "
                                 f"characters, got {value!r}")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise ValueError(f"shards must be an int >= 1, got {self.shards!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")
        for field in ("port", "serve_port", "health_port"):
            if not isinstance(getattr(self, field), int) or not 0 < getattr(self, field) < 65536:
                raise ValueError(f"{field} must be a port in 1..65535, got {getattr(self, field)!r}")
        if self.health_port in (self.port, self.serve_port):
            raise ValueError(f"health_port {self.health_port} must differ from port and serve_port")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image must be a non-empty image reference, got {self.image!r}")

    @property
    def gpu_image(self) -> str:
        """The CUDA build of :attr:`image`: its tag with ``-cuda`` appended."""
        repo, _, tag = self.image.rpartition(":")
        return f"{self.image}-cuda" if repo and "/" not in tag else f"{self.image}:cuda"

    def shard_host(self, shard: int) -> str:
        """The DNS name of parameter-server pod ``shard`` (0: the coordinator)."""
        return f"{self.name}-ps-{shard}.{self.name}-ps.{self.namespace}.svc"

    @property
    def client_host(self) -> str:
        """The DNS name of the client Service (the coordinator)."""
        return f"{self.name}.{self.namespace}.svc"

    @property
    def serve_host(self) -> str:
        return f"{self.name}-serve.{self.namespace}.svc"


def options_for(config: ClusterConfig, **overrides) -> K8sOptions:
    """Options with the shard and worker counts and the port of ``config``; ``overrides`` not None win."""
    if config.multi_host:
        counts = {"shards": sum(h.servers for h in config.hosts), "workers": sum(h.workers for h in config.hosts),
                  "port": config.server_host.server_port}
    else:
        counts = {"shards": 1, "workers": config.workers.count, "port": config.server.port or 7070}
    return K8sOptions(**{**counts, **{k: v for k, v in overrides.items() if v is not None}})


def secrets(options: K8sOptions) -> dict[str, tuple[str, ...]]:
    """The Secrets the pods mount, by name, with the files each must hold."""
    return {f"{options.name}-{suffix}": keys for suffix, keys in SECRET_KEYS.items()}


# --- pieces every pod shares ------------------------------------------------------------------


def labels(options: K8sOptions, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "psgrid", "app.kubernetes.io/instance": options.name,
            "app.kubernetes.io/component": component}


def _meta(options: K8sOptions, name: str, component: str | None = None) -> dict:
    meta = {"name": name, "namespace": options.namespace}
    if component:
        meta["labels"] = labels(options, component)
    return meta


def _probe(command: list[str], period: int, failures: int) -> dict:
    return {"exec": {"command": command}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def grpc_probe(port: int, ready: bool, period: int, failures: int) -> dict:
    """Kubernetes' native gRPC probe of the health port: SERVING of "" (``ready``) or of
    psgrid.liveness (alive)."""
    grpc = {"port": port} if ready else {"port": port, "service": LIVENESS}
    return {"grpc": grpc, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures}


def health_probes(port: int, start_failures: int, live_failures: int) -> dict:
    return {"startupProbe": grpc_probe(port, False, 5, start_failures),
            "readinessProbe": grpc_probe(port, True, PROBE_PERIOD_S, 3),
            "livenessProbe": grpc_probe(port, False, PROBE_PERIOD_S, live_failures)}


def file_probe(max_age_s: float | None) -> list[str]:
    """``psgrid k8s probe`` of the worker's liveness file: there, and touched within ``max_age_s``."""
    age = ["--max-age", f"{max_age_s:g}"] if max_age_s is not None else []
    return ["psgrid", "k8s", "probe", "--file", LIVENESS_FILE, *age]


def _env(name: str, value: str | None = None, field: str | None = None, resource: str | None = None) -> dict:
    if field:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}}
    if resource:
        return {"name": name, "valueFrom": {"resourceFieldRef": {"resource": resource, "divisor": "1"}}}
    return {"name": name, "value": value}


def _container(name: str, image: str, args: list[str], env: list[dict], port: int | None,
               resources: dict, probes: dict, mounts: list[dict], health_port: int | None = None) -> dict:
    container = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "command": ["psgrid"],
                 "args": args, "env": [_env("POD_NAME", field="metadata.name"), _env("HOME", TMP_DIR), *env]}
    if port:
        container["ports"] = [{"name": "grpc", "containerPort": port, "protocol": "TCP"}]
        if health_port:
            container["ports"].append({"name": "health", "containerPort": health_port, "protocol": "TCP"})
    container.update(resources=resources, **probes)
    container["volumeMounts"] = [*mounts, {"name": "tmp", "mountPath": TMP_DIR},
                                 {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                                 {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}]
    container["securityContext"] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    return container


def _pod(options: K8sOptions, component: str, container: dict, grace_s: float, volumes: list[dict]) -> dict:
    secret_volumes = [{"name": suffix, "secret": {"secretName": f"{options.name}-{suffix}", "defaultMode": 0o440}}
                      for suffix in SECRET_KEYS]
    return {"metadata": {"labels": labels(options, component)}, "spec": {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no NAME_PORT=tcp://... variables beside psgrid's own PSGRID_*
        "terminationGracePeriodSeconds": max(1, math.ceil(grace_s)),
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                            "fsGroup": USER_ID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [*volumes, {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}, *secret_volumes]}}


def _service(options: K8sOptions, name: str, component: str, port: int | None, headless: bool,
             selector: dict | None = None) -> dict:
    spec: dict = {}
    if headless:
        spec.update(clusterIP="None", publishNotReadyAddresses=True)  # peers resolve before ready
    spec["selector"] = selector or labels(options, component)
    if port:
        spec["ports"] = [{"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP"}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(options, name, component), "spec": spec}


def _args(section: str, args: tuple[str, ...]) -> list[str]:
    for arg in args:
        if arg.split("=", 1)[0] in RESERVED:
            raise ValueError(f"{section}.args must not set {arg!r}: the rendered pods set it")
    return list(args)



# --- the parameter servers -------------------------------------------------------------------


def shard_configs(options: K8sOptions) -> dict[str, str]:
    """The ConfigMap's files: ``NAME-ps-I.toml``, a ``[server]`` table per shard."""
    others = [f"{options.shard_host(i)}:{options.port}" for i in range(1, options.shards)]
    files = {f"{options.name}-ps-0.toml": "[server]\n" + (f"shards = {json.dumps(others)}\n" if others else "")}
    for i in range(1, options.shards):
        files[f"{options.name}-ps-{i}.toml"] = f'[server]\nshard_name = "shard-{i}"\n'
    return files


def parameter_servers(config: ClusterConfig, options: K8sOptions) -> list[dict]:
    """Headless Service, shard ConfigMap, StatefulSet, PodDisruptionBudget, client Service."""
    name, server = f"{options.name}-ps", config.server
    args = ["server", "--config", f"{SHARDS_DIR}/$(POD_NAME).toml", "--host", "0.0.0.0",
            "--port", str(options.port), "--advertise", f"$(POD_NAME).{name}.{options.namespace}.svc:{options.port}",
            "--checkpoint-dir", f"{DATA_DIR}/checkpoints", "--health-port", str(options.health_port),
            *SECURITY_ARGS, *_args("server", server.args)]
    # Alive at once (the health port opens before the restore); ready once restored and serving.
    probes = health_probes(options.health_port, max(3, math.ceil(server.start_timeout_s / 5)),
                           max(3, math.ceil(server.liveness_timeout_s / PROBE_PERIOD_S)))
    resources = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    mounts = [{"name": "checkpoints", "mountPath": DATA_DIR},
              {"name": "shards", "mountPath": SHARDS_DIR, "readOnly": True}]
    container = _container("server", options.image, args, [], options.port, resources, probes, mounts,
                           options.health_port)
    container["workingDir"] = DATA_DIR  # relative paths in [server] args land on the volume
    # The final checkpoint is written after SIGTERM: at least 30 s however short the file's grace.
    pod = _pod(options, "parameter-server", container, max(30.0, server.shutdown_s),
               [{"name": "shards", "configMap": {"name": f"{name}-shards"}}])
    claim = {"metadata": {"name": "checkpoints"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": options.storage}}}}
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet",
                   "metadata": _meta(options, name, "parameter-server"), "spec": {
                       "serviceName": name, "replicas": options.shards, "podManagementPolicy": "Parallel",
                       "selector": {"matchLabels": labels(options, "parameter-server")},
                       "template": pod, "volumeClaimTemplates": [claim],
                       "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"}}}
    coordinator = {**labels(options, "parameter-server"), "statefulset.kubernetes.io/pod-name": f"{name}-0"}
    return [
        _service(options, name, "parameter-server", options.port, headless=True),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(options, f"{name}-shards", "parameter-server"),
         "data": shard_configs(options)},
        statefulset,
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
         "metadata": _meta(options, name, "parameter-server"),
         "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(options, "parameter-server")}}},
        _service(options, options.name, "parameter-server", options.port, headless=False, selector=coordinator),
    ]


# --- the workers ------------------------------------------------------------------------------


def worker_settings(options: K8sOptions) -> dict:
    """What the GPU overlay changes in the worker container: image, device, resources."""
    if options.gpu:
        gpu = {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}
        return {"image": options.gpu_image, "env": [_env("PSGRID_DEVICE", "cuda")],
                "resources": {"requests": gpu, "limits": {**gpu, "memory": "16Gi"}}}
    return {"image": options.image, "env": [_env("PSGRID_DEVICE", "cpu")],
            "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}}


#: Where GPU nodes are tainted for GPU pods only, the workers may go there.
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def workers(config: ClusterConfig, options: K8sOptions) -> list[dict]:
    """A headless Service and the worker StatefulSet: pod ``NAME-worker-I`` is worker ``--name NAME-worker-I``."""
    name, section, settings = f"{options.name}-worker", config.workers, worker_settings(options)
    args = ["worker", "--server", f"{options.shard_host(0)}:{options.port}", "--name", "$(POD_NAME)",
            "--local-workers", "1", "--device", "$(PSGRID_DEVICE)", "--threads", "$(PSGRID_THREADS)",
            "--liveness-file", LIVENESS_FILE, *SECURITY_ARGS, *_args("workers", section.args)]
    fresh = file_probe(section.liveness_timeout_s)
    probes = {"startupProbe": _probe(file_probe(None), 5, 12),
              "readinessProbe": _probe(fresh, PROBE_PERIOD_S, 2), "livenessProbe": _probe(fresh, PROBE_PERIOD_S, 3)}
    env = [*settings["env"], _env("PSGRID_THREADS", resource="limits.cpu")]
    container = _container("worker", settings["image"], args, env, None, settings["resources"], probes, [])
    container["workingDir"] = TMP_DIR
    pod = _pod(options, "worker", container, section.shutdown_s, [])
    if options.gpu:
        pod["spec"]["tolerations"] = GPU_TOLERATIONS
    return [
        _service(options, name, "worker", None, headless=True),
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(options, name, "worker"), "spec": {
            "serviceName": name, "replicas": options.workers, "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels(options, "worker")}, "template": pod}},
    ]


def gpu_patch(options: K8sOptions) -> dict:
    """The GPU overlay's strategic-merge patch of the worker StatefulSet."""
    settings = worker_settings(dataclasses.replace(options, gpu=True))
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": f"{options.name}-worker", "namespace": options.namespace},
            "spec": {"template": {"spec": {"tolerations": GPU_TOLERATIONS,
                                           "containers": [{"name": "worker", **settings}]}}}}


# --- psgrid serve -----------------------------------------------------------------------------


def serve(options: K8sOptions) -> list[dict]:
    """The ``psgrid serve`` Deployment following job ``$(PSGRID_JOB)``, and its Service."""
    name = f"{options.name}-serve"
    args = ["serve", "--follow-job", "$(PSGRID_JOB)", "--server", f"{options.client_host}:{options.port}",
            "--host", "0.0.0.0", "--port", str(options.serve_port), "--threads", "$(PSGRID_THREADS)",
            "--health-port", str(options.health_port), *SECURITY_ARGS]
    probes = health_probes(options.health_port, 12, 3)  # ready once a model version is loaded
    env = [_env("PSGRID_JOB", options.serve_job), _env("PSGRID_THREADS", resource="limits.cpu")]
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    container = _container("serve", options.image, args, env, options.serve_port, resources, probes, [],
                           options.health_port)
    container["workingDir"] = TMP_DIR
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(options, name, "serve"), "spec": {
            "replicas": 1 if options.serve_job else 0,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": labels(options, "serve")},
            "template": _pod(options, "serve", container, 30, [])}},
        _service(options, name, "serve", options.serve_port, headless=False),
    ]


# --- everything -------------------------------------------------------------------------------


def render(config: ClusterConfig, options: K8sOptions) -> dict[str, list[dict]]:
    """Every object, by the file it goes in, in apply order."""
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": options.namespace, "labels": {"app.kubernetes.io/name": "psgrid"}}}
    return {"namespace.yaml": [namespace], "parameter-servers.yaml": parameter_servers(config, options),
            "workers.yaml": workers(config, options), "serve.yaml": serve(options)}


def files(config: ClusterConfig, options: K8sOptions, source: str) -> dict[str, str]:
    """What ``psgrid k8s render`` writes, by path under its output folder: ``base/`` (the
    kustomization and its objects) and ``overlays/gpu/`` (the GPU workers' patch).

    ``source`` names the cluster file in each file's header.
    """
    from psgrid.cli.k8s_yaml import dump, dump_all

    header = (f"# Rendered by `psgrid k8s render` from {source} (shards {options.shards}, workers "
              f"{options.workers}, namespace {options.namespace}).\n# Do not edit: change the cluster file "
              "or the flags and render again (docs/kubernetes.md).\n")
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    base = dataclasses.replace(options, gpu=False)
    out = {f"base/{name}": header + dump_all(objects) for name, objects in render(config, base).items()}
    out["base/kustomization.yaml"] = header + dump({**kustomization, "resources": list(render(config, base))})
    out["overlays/gpu/kustomization.yaml"] = header + dump(
        {**kustomization, "resources": ["../../base"], "patches": [{"path": "workers-gpu.yaml"}]})
    out["overlays/gpu/workers-gpu.yaml"] = header + dump(gpu_patch(options))
    return out


def tls_hosts(options: K8sOptions) -> list[str]:
    """The names one node certificate must hold for every pod: the shards' DNS names (one
    wildcard), the two Services, and loopback (probes and ``kubectl port-forward``)."""
    return [f"*.{options.name}-ps.{options.namespace}.svc", options.client_host, options.serve_host,
            "localhost", "127.0.0.1"]


def secret_commands(options: K8sOptions, pki: str = "pki") -> list[str]:
    """Shell commands that make the Secrets the pods mount, with ``psgrid certs``."""
    tls, token = f"{options.name}-tls", f"{options.name}-token"
    files = " ".join(f"--from-file={key}={pki}/{source}" for key, source in
                     zip(SECRET_KEYS["tls"], ("ca.pem", "node.pem", "node.key")))
    return [f"psgrid certs {pki} --name node --hosts '{','.join(tls_hosts(options))}'",
            f"python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {pki}/token",
            f"kubectl -n {options.namespace} create secret generic {tls} {files}",
            f"kubectl -n {options.namespace} create secret generic {token} --from-file=token={pki}/token"]
