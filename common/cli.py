"""The ``psgrid`` command: one entry point, a subcommand per role or action.

Precedence: defaults < config file (``--config``) < flags. Only this module
reads the environment (``PSGRID_SERVER``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from psgrid import __version__
from psgrid.log import setup_logging

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7070


def _server_address(args: argparse.Namespace) -> str:
    return args.server or os.environ.get("PSGRID_SERVER") or f"127.0.0.1:{DEFAULT_PORT}"


def _security(args: argparse.Namespace):
    """Token (--token-file, else PSGRID_TOKEN) and TLS files; never logged."""
    from psgrid.security import Security

    return Security.from_files(token_file=args.token_file, token=os.environ.get("PSGRID_TOKEN"),
                               ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _add_metrics_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free)")
    g.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint binds")
    g.add_argument("--metrics-port-file", help="write the metrics endpoint's bound port here")


def _serve_metrics(args: argparse.Namespace, registry) -> None:
    if args.metrics_port is not None:
        from psgrid.metrics import serve

        serve(registry, args.metrics_host, args.metrics_port, args.metrics_port_file)


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--token-file", help="file holding the cluster token (else env PSGRID_TOKEN)")
    g.add_argument("--tls-ca", help="CA certificate (PEM): verify peers; on a server, require client certs")
    g.add_argument("--tls-cert", help="this node's certificate (PEM)")
    g.add_argument("--tls-key", help="this node's private key (PEM)")


# --- psgrid server / worker ---------------------------------------------------------


def cmd_server(args: argparse.Namespace) -> int:
    from psgrid.server.app import serve
    from psgrid.server.config import ServerConfig

    config = ServerConfig.load(
        args.config, host=args.host, port=args.port, port_file=args.port_file,
        update_log=args.update_log, max_payload_bytes=args.max_payload_bytes,
        checkpoint_dir=args.checkpoint_dir, checkpoint_interval_s=args.checkpoint_interval,
        checkpoint_every_steps=args.checkpoint_every_steps, keep_checkpoints=args.keep_checkpoints, heartbeat_timeout_s=args.heartbeat_timeout,
        allowed_modules=args.allow_modules, shards=args.shards, advertise=args.advertise,
    )
    if config.advertise:
        logger.info("[ps] advertised as %s: workers and clients dial that", config.advertise)
    serve(config, _security(args), on_start=lambda app: _serve_metrics(args, app.core.metrics.registry))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import pathlib
    import signal

    if args.liveness_file:
        # Now, before torch loads (seconds): a supervisor sees the process alive at once.
        pathlib.Path(args.liveness_file).touch()
    from psgrid.worker.device import default_threads, set_threads
    from psgrid.worker.ps_client import ParameterServerClient
    from psgrid.spec import parse_allowed
    from psgrid.worker.runner import Worker

    set_threads(args.threads or default_threads(args.local_workers))
    security = _security(args)
    client = ParameterServerClient(_server_address(args), security=security)
    worker = Worker(client, device=args.device, name=args.name, liveness_file=args.liveness_file,
                    allowed_modules=parse_allowed(args.allow_modules), security=security)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())
    _serve_metrics(args, worker.metrics.registry)
    try:
        worker.run()
    finally:
        client.close()
    return 0


# --- psgrid submit / jobs / job / cancel ----------------------------------------------


def _spec_from_args(args: argparse.Namespace):
    from psgrid.spec import JobSpec

    if args.example:
        from psgrid.examples import spec_path

        data = _toml(spec_path(args.example))
    elif args.spec:
        data = _toml(args.spec)
    else:
        data = {}
    flags = {
        "name": args.name, "model": args.model, "dataset": args.dataset,
        "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
        "num_workers": args.workers, "seed": args.seed, "device": args.device,
        "eval_every": args.eval_every,
    }
    if args.epochs is not None and args.steps is None:
        flags["steps"] = 0
    if args.steps is not None and args.epochs is None:
        flags["epochs"] = 0
    data.update({k: v for k, v in flags.items() if v is not None})
    for key in ("model_kwargs", "dataset_kwargs"):
        value = getattr(args, key)
        if value is not None:
            data[key] = json.loads(value)
    if args.staleness is not None:
        data["staleness"] = args.staleness if args.staleness in ("inf", "async") else int(args.staleness)
    opt = dict(data.get("optimizer", {}))
    for key in ("lr", "momentum", "weight_decay"):
        if getattr(args, key) is not None:
            opt[key] = getattr(args, key)
    if args.optimizer:
        opt["name"] = args.optimizer
    data["optimizer"] = opt
    return JobSpec.from_dict(data)


def _toml(path) -> dict:
    from psgrid.spec import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def _print_result(info) -> None:
    from psgrid.client.progress import describe

    print(f"{info.job_id}: {describe(info)}")


def cmd_submit(args: argparse.Namespace) -> int:
    from psgrid.client import Client

    spec = _spec_from_args(args)
    with Client(_server_address(args), security=_security(args)) as client:
        job = client.submit(spec)
        print(job.job_id)
        if args.wait:
            info = job.wait()
            if args.tensorboard:
                print(f"{job.write_tensorboard(args.tensorboard)} points written to {args.tensorboard}")
            _print_result(info)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from psgrid.client import Client
    from psgrid.client.progress import describe

    with Client(_server_address(args), security=_security(args)) as client:
        jobs = client.list_jobs()
    if args.json:
        print(json.dumps([_info_json(j) for j in jobs], indent=2))
        return 0
    print(f"{'JOB':<16} {'NAME':<20} {'STATE':<11} PROGRESS")
    for j in jobs:
        print(f"{j.job_id:<16} {j.spec.name[:20]:<20} {j.state.value:<11} {describe(j)}")
    return 0


def _info_json(info) -> dict:
    import dataclasses

    out = dataclasses.asdict(info)
    out["state"] = info.state.value
    return out


def cmd_job(args: argparse.Namespace) -> int:
    from psgrid.client import Client

    with Client(_server_address(args), security=_security(args)) as client:
        info = client.job(args.job_id).status()
    print(json.dumps(_info_json(info), indent=2, default=str))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from psgrid.client import Client

    with Client(_server_address(args), security=_security(args)) as client:
        _print_result(client.job(args.job_id).cancel())
    return 0


# --- psgrid demo ----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Train an example on a fresh local cluster that runs under the supervisor."""
    import pathlib
    import shutil
    import signal
    import subprocess
    import time

    from psgrid.client import Client
    from psgrid.examples import spec_path
    from psgrid.spec import JobSpec
    from psgrid.supervisor.supervisor_client import SupervisorClient

    spec = JobSpec.from_toml(spec_path(args.example)).replace(num_workers=args.workers)
    run_dir = pathlib.Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh cluster: no jobs restored from a past demo
    run_dir.mkdir(parents=True)
    (run_dir / "cluster.toml").write_text(
        f'[server]\ncheckpoint_dir = "{run_dir / "checkpoints"}"\n[workers]\ncount = {args.workers}\n')
    port_file = run_dir / "supervisor.port"
    print(f"starting `psgrid up`: a parameter server and {args.workers} workers (logs in {run_dir}/)")
    with open(run_dir / "up.log", "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "psgrid", "up", str(run_dir / "cluster.toml"),
                               "--run-dir", str(run_dir), "--port-file", str(port_file)],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if up.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"psgrid: the cluster did not start; see {run_dir}/up.log")
            time.sleep(0.1)
        supervisor = f"127.0.0.1:{int(port_file.read_text())}"
        with SupervisorClient(supervisor, retry_for_s=60) as nodes:
            while not (server := nodes.nodes()[0].address):
                if up.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"psgrid: the server did not start; see {run_dir}/")
                time.sleep(0.1)
        print(f"server on {server}; supervisor on {supervisor}")
        print(f"  watch the nodes:  psgrid nodes --supervisor {supervisor}")
        print("  kill one and watch it come back:  kill -9 <pid of worker-0>")
        with Client(server) as client:
            info = client.submit(spec).wait()
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
    _print_result(info)
    for name, value in sorted(info.metrics.items()):
        print(f"{name}: {value:.4f}")
    return 0


# --- psgrid up / nodes / restart -----------------------------------------------------------


def _supervisor_address(args: argparse.Namespace) -> str:
    address = args.supervisor or os.environ.get("PSGRID_SUPERVISOR")
    if not address:
        raise SystemExit("psgrid: give --supervisor HOST:PORT (or set PSGRID_SUPERVISOR); "
                         "`psgrid up` prints it and writes its port to --port-file")
    return address


def cmd_up(args: argparse.Namespace) -> int:
    from psgrid.supervisor.app import serve
    from psgrid.supervisor.cluster import ChildSecurity, ClusterConfig

    try:
        config = ClusterConfig.load(args.cluster, workers=args.workers, servers=args.servers)
    except (OSError, ValueError) as exc:  # ValueError includes TOML syntax errors
        print(f"psgrid: bad cluster file: {exc}", file=sys.stderr)
        return 2
    if args.servers and args.servers > 1 and args.host is None:
        from psgrid.supervisor.cluster import LOCAL_HOST

        args.host = LOCAL_HOST
    try:
        config.check_host(args.host)
    except ValueError as exc:
        print(f"psgrid: {exc}", file=sys.stderr)
        return 2
    children = ChildSecurity(token_file=args.token_file, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                             tls_key=args.tls_key)
    from psgrid.metrics import nodes_registry

    try:
        return serve(config, args.run_dir, port_file=args.port_file, log_level=args.log_level,
                     security=_security(args), host=args.host, child_security=children,
                     on_start=lambda sup: _serve_metrics(args, nodes_registry(sup.nodes)))
    except OSError as exc:
        print(f"psgrid: {exc}", file=sys.stderr)
        return 1


def cmd_nodes(args: argparse.Namespace) -> int:
    from psgrid.supervisor.supervisor_client import SupervisorClient

    with SupervisorClient(_supervisor_address(args), security=_security(args)) as client:
        nodes = client.nodes()
    if args.json:
        print(json.dumps([n.to_json() for n in nodes], indent=2))
        return 0
    width = max([12, *(len(n.name) for n in nodes)])  # <host>-worker-<i> can be long
    print(f"{'NODE':<{width}} {'ROLE':<7} {'STATE':<9} {'PID':>7} {'RESTARTS':>8} {'UPTIME':>9}  "
          f"{'ADDRESS':<21} LAST EXIT")
    for n in nodes:
        uptime = f"{n.uptime_s:.0f}s" if n.pid else "-"
        print(f"{n.name:<{width}} {n.role.value:<7} {n.state.value:<9} {n.pid or '-':>7} {n.restarts:>8} "
              f"{uptime:>9}  {n.address or '-':<21} {n.last_exit or '-'}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    from psgrid.supervisor.supervisor_client import SupervisorClient

    with SupervisorClient(_supervisor_address(args), security=_security(args)) as client:
        node = client.restart(args.node)
    was = f" (was pid {node.pid})" if node.pid else ""
    print(f"{node.name}: restart requested{was}; `psgrid nodes` shows the new pid")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    import pathlib

    from psgrid.certs import make_node

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    cert, key = make_node(pathlib.Path(args.directory), args.name, hosts)
    print(f"CA: {pathlib.Path(args.directory) / 'ca.pem'}\ncertificate: {cert}\nkey: {key}")
    return 0


def _status(args: argparse.Namespace, client) -> dict:
    from psgrid.client.status import job_rows, node_rows

    nodes = None
    if args.supervisor or os.environ.get("PSGRID_SUPERVISOR"):
        from psgrid.supervisor.supervisor_client import SupervisorClient

        with SupervisorClient(_supervisor_address(args), security=_security(args)) as sup:
            nodes = sup.nodes()
    jobs = client.list_jobs()
    histories = {j.job_id: client.job(j.job_id).history() for j in jobs if not j.state.terminal}
    return {"nodes": node_rows(client.workers(), nodes, _server_address(args)),
            "jobs": job_rows(jobs, histories)}


def cmd_serve(args: argparse.Namespace) -> int:
    """psgrid serve: the inference pipeline, with the cluster's token/TLS and metrics."""
    from psgrid.inference.app import serve
    from psgrid.inference.cli import _config
    from psgrid.metrics import inference_registry

    try:
        config = _config(args)
    except ValueError as exc:
        print(f"psgrid serve: {exc}", file=sys.stderr)
        return 2
    serve(config, security=_security(args),
          on_start=lambda app: _serve_metrics(args, inference_registry(app.pipeline.stats)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from psgrid.client import Client
    from psgrid.client.status import render

    with Client(_server_address(args), security=_security(args)) as client:
        while True:
            status = _status(args, client)
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(render(status["nodes"], status["jobs"]), flush=True)
            if not args.watch:
                return 0
            time.sleep(args.interval)


def cmd_plot(args: argparse.Namespace) -> int:
    from psgrid.client import Client
    from psgrid.client.curves import plot_history

    with Client(_server_address(args), security=_security(args)) as client:
        rows = client.job(args.job_id).history()
    path = plot_history(rows, args.output, title=args.job_id, width_px=args.width, height_px=args.height)
    print(f"{path}: {len(rows)} points")
    return 0


# --- argument parsing -------------------------------------------------------------------------


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="job spec TOML file")
    p.add_argument("--example", help="a packaged example spec: digits, linear")
    p.add_argument("--name")
    p.add_argument("--model", help="model factory, package.module:function")
    p.add_argument("--model-kwargs", help="JSON object of model factory arguments")
    p.add_argument("--dataset", help="dataset factory, package.module:function")
    p.add_argument("--dataset-kwargs", help="JSON object of dataset factory arguments")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int, help="per-worker mini-batch")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int, help="gradient pushes per worker")
    p.add_argument("--staleness", help="0 = synchronous, N = SSP bound, inf = asynchronous")
    p.add_argument("--workers", type=int, help="number of workers")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (a metric curve)")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    p.add_argument("--tensorboard", metavar="DIR", help="with --wait: write the job's curves as TensorBoard events")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psgrid", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"psgrid {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("server", help="run a parameter server")
    p.add_argument("--config", help="TOML file with a [server] table")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help=f"port to bind (default 0 = any free port; try {DEFAULT_PORT})")
    p.add_argument("--port-file", help="write the bound port to this file")
    p.add_argument("--update-log", help="append a JSON line per accepted gradient push")
    p.add_argument("--max-payload-bytes", type=int, help="largest parameter set one job may hold")
    p.add_argument("--checkpoint-dir", help="checkpoint jobs here, and restore them from here at start")
    p.add_argument("--checkpoint-interval", type=float, help="seconds between checkpoints (default 5)")
    p.add_argument("--checkpoint-every-steps", type=int,
                   help="sharded synchronous jobs: checkpoint every N steps, the same steps on "
                   "every shard, instead of by time (default 100)")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept per job (default 3)")
    p.add_argument("--heartbeat-timeout", type=float,
                   help="seconds of silence after which a worker leaves the barrier (default 10)")
    p.add_argument("--allow-modules", help="comma-separated module prefixes jobs may name "
                   "(default psgrid.examples; '*' allows any)")
    p.add_argument("--shards", help="comma-separated HOST:PORT of the other parameter-server shards; "
                   "jobs submitted here spread their parameters over this server and those")
    p.add_argument("--advertise", help="HOST:PORT other machines dial to reach this server "
                   "(logged and reported; default: the bound address)")
    _add_security_flags(p)
    _add_metrics_flags(p)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("worker", help="run a worker that trains jobs from a server")
    p.add_argument("--server", help="HOST:PORT of the parameter server (env PSGRID_SERVER)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch threads (default: cores / --local-workers)")
    p.add_argument("--local-workers", type=int, default=1, help="workers sharing this machine")
    p.add_argument("--name", default="", help="a name for logs (default host-pid)")
    p.add_argument("--liveness-file", help="touch this file every heartbeat (for a supervisor)")
    p.add_argument("--allow-modules", help="comma-separated module prefixes this worker imports "
                   "for jobs (default psgrid.examples; '*' allows any)")
    _add_security_flags(p)
    _add_metrics_flags(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("submit", help="submit a training job")
    p.add_argument("--server", help="HOST:PORT of the job service (env PSGRID_SERVER)")
    _add_job_flags(p)
    _add_security_flags(p)
    p.set_defaults(func=cmd_submit)

    for name, func, helptext in [("jobs", cmd_jobs, "list jobs"), ("job", cmd_job, "show one job"),
                                 ("cancel", cmd_cancel, "cancel a job")]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--server", help="HOST:PORT of the job service (env PSGRID_SERVER)")
        if name == "jobs":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("job_id")
        _add_security_flags(p)
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="start a local cluster and train an example end to end")
    p.add_argument("--example", default="digits")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--run-dir", default=".psgrid/demo", help="where the processes' logs go")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("up", help="start a server and workers and keep them running (a supervisor)",
                       description="Start this machine's nodes of a cluster file and keep them running; "
                       "every node gets the security flags given here. See docs/operations.md.")
    p.add_argument("cluster", nargs="?", help="cluster TOML file ([supervisor], [server], [workers], "
                   "and one [hosts.NAME] per machine in the multi-host form)")
    p.add_argument("--host", help="run this [hosts.NAME]'s nodes (required by, and only for, a "
                   "multi-host cluster file)")
    p.add_argument("--workers", type=int, help="number of workers (single-host form; overrides the "
                   "file; default 2)")
    p.add_argument("--servers", type=int, help="parameter-server shards on this machine (default 1; "
                   "more use fixed ports: [server] port, default 7070, and the ports after it)")
    p.add_argument("--run-dir", default=".psgrid/cluster", help="where the nodes' logs go")
    p.add_argument("--port-file", help="write the Supervisor service's bound port to this file")
    _add_security_flags(p)
    _add_metrics_flags(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("nodes", help="list the nodes of a `psgrid up` cluster")
    p.add_argument("--supervisor", help="HOST:PORT of the supervisor (env PSGRID_SUPERVISOR)")
    p.add_argument("--json", action="store_true")
    _add_security_flags(p)
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("restart", help="restart one node of a `psgrid up` cluster")
    p.add_argument("node", help="node name: server, shard-1, worker-0 (<host>-worker-0 on a "
                   "multi-host cluster), ...")
    p.add_argument("--supervisor", help="HOST:PORT of the supervisor (env PSGRID_SUPERVISOR)")
    _add_security_flags(p)
    p.set_defaults(func=cmd_restart)

    from psgrid.inference.cli import add_serve_parser

    p = add_serve_parser(sub)
    p.add_argument("--allow-modules", help="comma-separated module prefixes a served model may come from "
                   "(default psgrid.examples; '*' allows any)")
    _add_security_flags(p)
    _add_metrics_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="every node and job of the cluster in one table")
    p.add_argument("--server", help="HOST:PORT of the job service (env PSGRID_SERVER)")
    p.add_argument("--supervisor", help="HOST:PORT of a `psgrid up` supervisor, for restarts and uptime")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    _add_security_flags(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plot", help="draw a job's loss and metric curves to a PNG")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default="curve.png")
    p.add_argument("--width", type=int, default=1200, help="pixels")
    p.add_argument("--height", type=int, default=500, help="pixels")
    p.add_argument("--server", help="HOST:PORT of the job service (env PSGRID_SERVER)")
    _add_security_flags(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("certs", help="make a CA and a node certificate for TLS")
    p.add_argument("directory", help="where ca.pem/ca.key (made once) and NAME.pem/NAME.key go")
    p.add_argument("--name", default="node", help="file name of the node certificate (default node)")
    p.add_argument("--hosts", required=True, help="comma-separated host names and IPs the node answers on")
    p.set_defaults(func=cmd_certs)
    return parser


def _node_name(args: argparse.Namespace) -> str:
    if args.command == "worker":
        return args.name or f"worker-{os.getpid()}"
    return {"server": "server", "up": "supervisor", "serve": "serve"}.get(args.command, args.command)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, node=_node_name(args), as_json=args.log_json)
    from psgrid.errors import PsgridError

    try:
        code = args.func(args)
    except PsgridError as exc:
        print(f"psgrid: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
