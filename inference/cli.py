"""``psgrid serve``: serve a trained model, following a job or a checkpoint directory.

The integrator wires :func:`add_serve_parser` into ``psgrid``'s subcommands;
``python -m psgrid.inference.cli serve ...`` runs the same command on its own.
Only this module (and psgrid's main CLI) reads the environment (``PSGRID_SERVER``).
"""
from __future__ import annotations

import argparse
import os
import sys

from psgrid.log import setup_logging

DEFAULT_PS = "127.0.0.1:7070"


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is comma-separated ints, got {text!r}") from None


def cmd_serve(args: argparse.Namespace, security=None, on_start=None) -> int:
    """Build the config (defaults < --config < flags) and serve until SIGTERM/SIGINT.

    ``psgrid serve`` passes the cluster's ``security`` and an ``on_start(app)``
    that exposes its metrics; ``python -m psgrid.inference.cli serve`` neither.
    """
    from psgrid.inference.app import serve

    try:
        config = _config(args)
    except ValueError as exc:
        print(f"psgrid serve: {exc}", file=sys.stderr)
        return 2
    serve(config, security=security, on_start=on_start)
    return 0


def _config(args: argparse.Namespace):
    """The ServeConfig the flags describe; ValueError for a bad combination or value."""
    from psgrid.inference.config import ServeConfig

    server = None
    if args.follow_job:
        server = args.server or os.environ.get("PSGRID_SERVER") or DEFAULT_PS
    timeout_s = None if args.batch_timeout_ms is None else args.batch_timeout_ms / 1000.0
    return ServeConfig.load(
        args.config, host=args.host, port=args.port, port_file=args.port_file, health_port=args.health_port,
        follow_job=args.follow_job, server=server, checkpoint_dir=args.checkpoint_dir,
        job_id=args.job, poll_interval_s=args.poll_interval, device=args.device,
        threads=args.threads, preprocess=args.preprocess, features=args.features,
        allowed_modules=getattr(args, "allow_modules", None),
        preprocess_concurrency=args.preprocess_concurrency,
        features_concurrency=args.features_concurrency, max_batch_size=args.max_batch_size,
        batch_timeout_s=timeout_s, batch_concurrency=args.batch_concurrency,
        queue_capacity=args.queue_capacity, max_request_bytes=args.max_request_bytes,
        input_shape=args.input_shape, input_dtype=args.input_dtype,
    )


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to an ``add_subparsers()`` object; its handler is ``args.func``."""
    p = subparsers.add_parser("serve", help="serve a trained model with dynamic batching and hot reload")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--follow-job", metavar="ID", help="serve this job's parameters as training goes on")
    source.add_argument("--checkpoint-dir", metavar="DIR",
                        help="serve the newest valid checkpoint in DIR (a job's folder, or a root with --job)")
    p.add_argument("--server", help=f"HOST:PORT of the parameter server for --follow-job (env PSGRID_SERVER, "
                                    f"default {DEFAULT_PS})")
    p.add_argument("--job", metavar="ID", help="with --checkpoint-dir: which job, when DIR holds several")
    p.add_argument("--config", help="TOML file with a [serve] table")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port to bind (default 0 = any free port)")
    p.add_argument("--port-file", help="write the bound port to this file")
    p.add_argument("--health-port", type=int, metavar="PORT",
                   help="also serve grpc.health.v1 alone, in plaintext, on this port, for Kubernetes' native "
                   "gRPC probes: service \"\" is ready, \"psgrid.liveness\" alive (default: none)")
    p.add_argument("--poll-interval", type=float, help="seconds between checks for a new version (default 2)")
    p.add_argument("--device", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch threads (default: this machine's cores)")
    p.add_argument("--preprocess", metavar="MODULE:FN", help="applied to each request's examples (default identity)")
    p.add_argument("--features", metavar="MODULE:FN", help="feature extraction after preprocessing (default identity)")
    p.add_argument("--preprocess-concurrency", type=int, help="preprocessing threads (default 2)")
    p.add_argument("--features-concurrency", type=int, help="feature-extraction threads (default 2)")
    p.add_argument("--max-batch-size", type=int, help="most examples per model call (default 100)")
    p.add_argument("--batch-timeout-ms", type=float, help="longest wait for a fuller batch (default 5)")
    p.add_argument("--batch-concurrency", type=int, help="batches run at once (default 1)")
    p.add_argument("--queue-capacity", type=int, help="requests each stage buffers before RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--max-request-bytes", type=int, help="largest request payload (default 4 MiB)")
    p.add_argument("--input-shape", type=_shape, metavar="D1,D2,...",
                   help="one example's shape (default: the model's first Linear layer's inputs, "
                        "else one example of the job's dataset)")
    p.add_argument("--input-dtype", help="with --input-shape: the examples' dtype (default float32)")
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> None:
    """``python -m psgrid.inference.cli serve ...``: the same as ``psgrid serve ...``."""
    parser = argparse.ArgumentParser(prog="psgrid", description="psgrid inference server")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from psgrid.errors import PsgridError

    try:
        code = args.func(args)
    except (PsgridError, ValueError, OSError) as exc:
        print(f"psgrid: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
