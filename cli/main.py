"""The ``psgrid`` command: one entry point, a subcommand per role or action.

Precedence: defaults < config file (``--config``) < flags. Only the
``psgrid.cli*`` modules read the environment (``PSGRID_SERVER`` and the like),
almost all of it through the shared helpers in :mod:`psgrid.cli.flags`.

This module holds the entry point (:func:`main`), the argument parser
(:func:`build_parser`) and the commands that run a node: ``server``,
``worker`` and ``serve``. The other subcommands live by group in
:mod:`psgrid.cli.jobs` (submit, jobs, job, cancel, status, plot) and
:mod:`psgrid.cli.cluster` (demo, up, nodes, restart, certs); their command
functions are importable from here too. Commands import their heavy
dependencies when they run, so ``psgrid --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from psgrid import __version__
from psgrid.cli.cluster import cmd_certs, cmd_demo, cmd_nodes, cmd_restart, cmd_up
from psgrid.cli.flags import (DEFAULT_PORT, _add_metrics_flags, _add_security_flags, _security, _serve_metrics,
                              _server_address)
from psgrid.cli.jobs import cmd_cancel, cmd_job, cmd_jobs, cmd_plot, cmd_status, cmd_submit
from psgrid.log import setup_logging

logger = logging.getLogger(__name__)


# --- psgrid server / worker / serve -------------------------------------------------


def cmd_server(args: argparse.Namespace) -> int:
    from psgrid.server.app import serve
    from psgrid.server.config import ServerConfig

    config = ServerConfig.load(
        args.config, host=args.host, port=args.port, port_file=args.port_file, health_port=args.health_port,
        update_log=args.update_log, max_payload_bytes=args.max_payload_bytes,
        checkpoint_dir=args.checkpoint_dir, checkpoint_interval_s=args.checkpoint_interval,
        checkpoint_every_steps=args.checkpoint_every_steps, keep_checkpoints=args.keep_checkpoints, heartbeat_timeout_s=args.heartbeat_timeout,
        allowed_modules=args.allow_modules, shards=args.shards, advertise=args.advertise,
        shard_name=args.shard_name, keep_finished_jobs=args.keep_finished_jobs,
        finished_job_ttl_s=args.finished_job_ttl, reserve_after_s=args.reserve_after,
    )
    if config.advertise:
        logger.info("[ps] advertised as %s: workers and clients dial that", config.advertise)
    serve(config, _security(args), on_start=lambda app: _serve_metrics(args, app.core.metrics.registry))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import gc
    import pathlib
    import signal

    if args.liveness_file:
        # Now, before torch loads (seconds): a supervisor sees the process alive at once.
        pathlib.Path(args.liveness_file).touch()
    from psgrid.device import default_threads, pick_device, set_threads
    from psgrid.worker.ps_client import ParameterServerClient
    from psgrid.spec import parse_allowed
    from psgrid.worker.runner import Worker

    pick_device(args.device)  # a device this host lacks: one line naming the fix, before anything starts
    set_threads(args.threads or default_threads(args.local_workers))
    security = _security(args)
    client = ParameterServerClient(_server_address(args), security=security, wait_for_server=True)
    worker = Worker(client, device=args.device, name=args.name, liveness_file=args.liveness_file,
                    allowed_modules=parse_allowed(args.allow_modules), security=security)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())
    _serve_metrics(args, worker.metrics.registry)
    try:
        worker.run()
    finally:
        client.close()
        # Out of the collector's sight: the interpreter's last collections walk no
        # longer torch's whole heap (0.6 s alone, seconds on a busy host), so a
        # SIGTERM ends the process in well under its grace.
        gc.freeze()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """psgrid serve: the inference pipeline, with the cluster's token/TLS and metrics."""
    from psgrid.inference.cli import cmd_serve as serve_command
    from psgrid.metrics import inference_registry

    return serve_command(args, security=_security(args),
                         on_start=lambda app: _serve_metrics(args, inference_registry(app.pipeline.stats)))


# --- argument parsing -------------------------------------------------------------------------


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="job spec TOML file")
    p.add_argument("--example", help="a packaged example spec: digits, linear, recsys")
    p.add_argument("--name", help="a name for the job in listings (default: the spec file's, if any)")
    p.add_argument("--model", help="model factory, package.module:function")
    p.add_argument("--model-kwargs", help="JSON object of model factory arguments")
    p.add_argument("--dataset", help="dataset factory, package.module:function")
    p.add_argument("--dataset-kwargs", help="JSON object of dataset factory arguments")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                   help="the server-side optimizer, matching torch.optim (default sgd)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.01)")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, help="weight decay (L2 for sgd/adam, decoupled for adamw)")
    p.add_argument("--batch-size", type=int, help="per-worker mini-batch")
    p.add_argument("--epochs", type=int, help="passes over each worker's data shard (instead of --steps)")
    p.add_argument("--steps", type=int, help="gradient pushes per worker")
    p.add_argument("--staleness", help="0 = synchronous, N = SSP bound, inf = asynchronous")
    p.add_argument("--workers", type=int, help="number of workers")
    p.add_argument("--seed", type=int, help="seeds the initial weights and every worker's data order (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (a metric curve)")
    p.add_argument("--sync-every", type=int, metavar="H",
                   help="local SGD: each worker takes H local steps, then pushes its model delta; --optimizer "
                   "is then the outer one (default 1: a gradient every step)")
    p.add_argument("--local-optimizer", choices=["sgd", "adam", "adamw"],
                   help="with --sync-every: the workers' optimizer of their local steps (torch.optim)")
    p.add_argument("--local-lr", type=float, help="with --sync-every: the local optimizer's learning rate")
    p.add_argument("--compression", metavar="ENCODING",
                   help="what a push carries: none, fp16, bf16, int8, topk:RATIO (default none)")
    p.add_argument("--no-error-feedback", action="store_true",
                   help="lossy compression without carrying what a push left out into the next")
    p.add_argument("--pull-dtype", choices=["full", "fp16", "bf16"],
                   help="send training pulls in 16 bits; the server keeps full precision (default full)")
    p.add_argument("--scale-stale", action="store_true",
                   help="SSP and async: apply a push computed s steps ago scaled by 1/(1+s)")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    p.add_argument("--tensorboard", metavar="DIR", help="with --wait: write the job's curves as TensorBoard events")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psgrid", description="psgrid: a parameter-server training cluster for PyTorch. "
        "One command, a subcommand per role or action; `psgrid SUBCOMMAND --help` for each.")
    parser.add_argument("--version", action="version", version=f"psgrid {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("server", help="run a parameter server")
    p.add_argument("--config", help="TOML file with a [server] table")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help=f"port to bind (default 0 = any free port; try {DEFAULT_PORT})")
    p.add_argument("--port-file", help="write the bound port to this file")
    p.add_argument("--health-port", type=int, metavar="PORT",
                   help="also serve grpc.health.v1 alone, in plaintext, on this port, for Kubernetes' native "
                   "gRPC probes: service \"\" is ready, \"psgrid.liveness\" alive (default: none)")
    p.add_argument("--update-log", help="append a JSON line per accepted gradient push")
    p.add_argument("--shard-name", help="this server's name on update-log lines (default server; "
                   "psgrid up names the other shards shard-1, shard-2, ...: a server so named is not "
                   "the coordinator and refuses jobs submitted to it)")
    p.add_argument("--max-payload-bytes", type=int, help="largest parameter set one job may hold")
    p.add_argument("--checkpoint-dir", help="checkpoint jobs here, and restore them from here at start")
    p.add_argument("--checkpoint-interval", type=float, help="seconds between checkpoints (default 5)")
    p.add_argument("--checkpoint-every-steps", type=int,
                   help="sharded synchronous jobs: checkpoint every N steps, the same steps on "
                   "every shard, instead of by time (default 100)")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept per job (default 3)")
    p.add_argument("--reserve-after", type=float, metavar="SECONDS",
                   help="a pending job that waited this long reserves the next free workers: younger "
                   "jobs stop backfilling around it (default 60)")
    p.add_argument("--keep-finished-jobs", type=int,
                   help="finished jobs kept in memory, the newest (default 20); older ones are "
                   "released and their weights read from their last checkpoint")
    p.add_argument("--finished-job-ttl", type=float,
                   help="seconds a finished job is kept in memory at most (default: no limit)")
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
    p.add_argument("--name", default="", help="this worker's name (default host-pid): a restarted worker "
                   "that gives the same name takes its rank in a running job back")
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
        if name != "jobs":
            p.add_argument("job_id", help="the id `psgrid submit` printed (`psgrid jobs` lists them)")
        if name != "cancel":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        _add_security_flags(p)
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="start a local cluster and train an example end to end")
    p.add_argument("--example", default="digits", help="the packaged example to train: digits, linear, recsys "
                   "(default digits)")
    p.add_argument("--workers", type=int, default=2, help="number of workers (default 2)")
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
    p.add_argument("--json", action="store_true", help="machine-readable output")
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
    p.add_argument("--supervisor", help="HOST:PORT of a `psgrid up` supervisor, for restarts and uptime "
                   "(env PSGRID_SUPERVISOR)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    _add_security_flags(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plot", help="draw a job's loss and metric curves to a PNG")
    p.add_argument("job_id", help="the id `psgrid submit` printed")
    p.add_argument("-o", "--output", default="curve.png", help="PNG file to write (default curve.png)")
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

    from psgrid.cli.k8s import add_k8s_parser

    add_k8s_parser(sub)
    return parser


def _node_name(args: argparse.Namespace) -> str:
    if args.command == "worker":
        return args.name or f"worker-{os.getpid()}"
    return {"server": "server", "up": "supervisor", "serve": "serve"}.get(args.command, args.command)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, node=_node_name(args), as_json=args.log_json)
    from psgrid.errors import ConnectionMistake, PsgridError

    try:
        code = args.func(args)
    except ConnectionMistake as exc:  # its message says it all: cause and fix
        print(f"psgrid: {exc}", file=sys.stderr)
        code = 1
    except PsgridError as exc:
        print(f"psgrid: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
