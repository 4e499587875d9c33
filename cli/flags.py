"""The flags many ``psgrid`` subcommands share, and what they resolve to.

Every ``psgrid.cli*`` module reads its cluster addresses and credentials
through these helpers, so the environment fallbacks (``PSGRID_SERVER``,
``PSGRID_SUPERVISOR``, ``PSGRID_TOKEN``) are resolved in one place (``psgrid
status`` also checks ``PSGRID_SUPERVISOR`` itself, to decide whether to ask a
supervisor at all). They live apart from :mod:`psgrid.cli` so that the
subcommand modules can use them while :mod:`psgrid.cli` imports those modules
to build its parser, without an import cycle.
"""
from __future__ import annotations

import argparse
import os

DEFAULT_PORT = 7070


def _server_address(args: argparse.Namespace) -> str:
    return args.server or os.environ.get("PSGRID_SERVER") or f"127.0.0.1:{DEFAULT_PORT}"


def _supervisor_address(args: argparse.Namespace) -> str:
    address = args.supervisor or os.environ.get("PSGRID_SUPERVISOR")
    if not address:
        raise SystemExit("psgrid: give --supervisor HOST:PORT (or set PSGRID_SUPERVISOR); "
                         "`psgrid up` prints it and writes its port to --port-file")
    return address


SUPERVISOR_FLAG = "--supervisor / PSGRID_SUPERVISOR"


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
