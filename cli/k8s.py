"""``psgrid k8s``: run a cluster file on Kubernetes instead of under ``psgrid up``.

* ``psgrid k8s render CLUSTER -o DIR`` writes a kustomize base (``DIR/base``) and
  a GPU overlay (``DIR/overlays/gpu``) for the cluster file; no ``kubectl`` needed
  (:mod:`psgrid.cli.k8s_manifests` builds the objects, :mod:`psgrid.cli.k8s_yaml`
  writes them).
* ``psgrid k8s probe --file`` is what the worker pods' probes run: the age of
  their liveness file (workers serve no port). Servers and ``psgrid serve`` are
  probed natively, on their plaintext ``--health-port``. ``probe --port`` asks a
  pod's main port over its TLS, for checking by hand (``kubectl exec``).

docs/kubernetes.md walks through a deployment.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time


def add_k8s_parser(sub) -> argparse.ArgumentParser:
    """Add ``k8s`` (with ``render`` and ``probe``) to ``psgrid``'s subcommands."""
    from psgrid import __version__

    p = sub.add_parser("k8s", help="run the cluster on Kubernetes: render manifests, probe a pod",
                       description="Run a cluster file on Kubernetes. See docs/kubernetes.md.")
    k8s = p.add_subparsers(dest="k8s_command", required=True)
    r = k8s.add_parser("render", help="write a kustomize base and GPU overlay for a cluster file",
                       description="Write DIR/base (kubectl apply -k DIR/base) and DIR/overlays/gpu "
                       "for a cluster file; counts default to the file's.")
    r.add_argument("cluster", help="cluster TOML file, as for `psgrid up`")
    r.add_argument("-o", "--output", required=True, help="folder to write base/ and overlays/gpu/ into")
    r.add_argument("--shards", type=int, help="parameter-server shards (default: the file's servers, or 1)")
    r.add_argument("--workers", type=int, help="worker pods (default: the file's workers)")
    r.add_argument("--name", help="name of the objects and prefix of the pods (default psgrid)")
    r.add_argument("--namespace", help="namespace, part of every DNS name (default psgrid)")
    r.add_argument("--image", help=f"container image (default psgrid:{__version__}; the GPU overlay "
                   "appends -cuda to its tag)")
    r.add_argument("--storage", help="each shard's checkpoint volume (default 10Gi)")
    r.add_argument("--serve-job", help="the job `psgrid serve` follows (default none: 0 replicas)")
    r.set_defaults(func=cmd_render)

    q = k8s.add_parser("probe", help="a pod's liveness/readiness check (exit 0: healthy)")
    target = q.add_mutually_exclusive_group(required=True)
    target.add_argument("--port", type=int, help="ask grpc.health.v1 on 127.0.0.1:PORT")
    target.add_argument("--file", help="a worker's liveness file: it must exist")
    q.add_argument("--serving", action="store_true",
                   help="with --port: pass on SERVING only (readiness); else on any answer (liveness)")
    q.add_argument("--max-age", type=float, help="with --file: seconds since it was last touched, at most")
    q.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer (default 4)")
    q.add_argument("--tls-ca", help="CA certificate (PEM): the port speaks TLS")
    q.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
    q.add_argument("--tls-key", help="client key (PEM)")
    q.add_argument("--tls-server-name", default="localhost",
                   help="name the server's certificate is checked against (default localhost)")
    q.set_defaults(func=cmd_probe)
    return p


def cmd_render(args: argparse.Namespace) -> int:
    from psgrid import __version__
    from psgrid.cli.k8s_manifests import files, options_for, secret_commands
    from psgrid.supervisor.cluster import ClusterConfig

    try:
        config = ClusterConfig.load(args.cluster)
        options = options_for(config, shards=args.shards, workers=args.workers, name=args.name,
                              namespace=args.namespace, image=args.image or f"psgrid:{__version__}",
                              storage=args.storage, serve_job=args.serve_job)
        rendered = files(config, options, pathlib.Path(args.cluster).name)
    except (OSError, ValueError) as exc:  # ValueError includes TOML syntax errors
        print(f"psgrid: cannot render {args.cluster}: {exc}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.output)
    for path, text in rendered.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(text)
    print(f"wrote {len(rendered)} files: {out / 'base'} ({options.shards} shard(s), {options.workers} "
          f"worker(s)) and {out / 'overlays' / 'gpu'}")
    print(f"make the Secrets first (once per namespace; docs/kubernetes.md):\n"
          f"  kubectl apply -f {out / 'base' / 'namespace.yaml'}")
    for command in secret_commands(options):
        print(f"  {command}")
    print(f"then: kubectl apply -k {out / 'base'}   (GPU workers: -k {out / 'overlays' / 'gpu'})")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    if args.file:
        return _probe_file(args.file, args.max_age)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from psgrid.security import Security

    security = Security.from_files(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if security.tls else []
    channel = security.channel(f"127.0.0.1:{args.port}", options)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"no health answer on port {args.port}: {exc.code().name} {exc.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.serving and reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"port {args.port} answers {status}", file=sys.stderr)
        return 1
    print(status)
    return 0


def _probe_file(path: str, max_age: float | None) -> int:
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError as exc:
        print(f"no liveness file: {exc}", file=sys.stderr)
        return 1
    if max_age is not None and age > max_age:
        print(f"{path} last touched {age:.1f}s ago (more than {max_age:g}s)", file=sys.stderr)
        return 1
    return 0
