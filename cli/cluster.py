"""``psgrid`` subcommands that run or manage a supervised cluster: demo, up, nodes, restart, certs.

Each command imports what it needs when it runs, so ``psgrid --help`` stays
fast; :mod:`psgrid.cli` wires them into the parser.
"""
from __future__ import annotations

import argparse
import json
import sys

from psgrid.cli.flags import SUPERVISOR_FLAG, _security, _serve_metrics, _supervisor_address
from psgrid.cli.jobs import _print_result

# --- psgrid demo ----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Train an example on a fresh local cluster that runs under the supervisor."""
    import pathlib
    import shutil

    from psgrid.client import Client
    from psgrid.examples import spec_path
    from psgrid.spec import JobSpec
    from psgrid.supervisor.launch import UpProcess

    spec = JobSpec.from_toml(spec_path(args.example)).replace(num_workers=args.workers)
    run_dir = pathlib.Path(args.run_dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh cluster: no jobs restored from a past demo
    print(f"starting `psgrid up`: a parameter server and {args.workers} workers (logs in {run_dir}/)")
    try:
        up = UpProcess(run_dir, timeout=120, cluster=(
            f'[server]\ncheckpoint_dir = "{run_dir / "checkpoints"}"\n[workers]\ncount = {args.workers}\n'))
    except (RuntimeError, TimeoutError):
        raise SystemExit(f"psgrid: the cluster did not start; see {run_dir}/up.log") from None
    with up:
        try:
            server = up.server_addresses(timeout=120)[0]
        except (RuntimeError, TimeoutError):
            raise SystemExit(f"psgrid: the server did not start; see {run_dir}/") from None
        print(f"server on {server}; supervisor on {up.address}")
        print(f"  watch the nodes:  psgrid nodes --supervisor {up.address}")
        print("  kill one and watch it come back:  kill -9 <pid of worker-0>")
        with Client(server) as client:
            info = client.submit(spec).wait()
    _print_result(info)
    for name, value in sorted(info.metrics.items()):
        print(f"{name}: {value:.4f}")
    return 0


# --- psgrid up / nodes / restart / certs -------------------------------------------------


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
        client.check_connection(flag=SUPERVISOR_FLAG)
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
        client.check_connection(flag=SUPERVISOR_FLAG)
        node = client.restart(args.node)
    was = f" (was pid {node.pid})" if node.pid else ""
    print(f"{node.name}: restart requested{was}; `psgrid nodes` shows the new pid")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    import pathlib

    from psgrid.cli.certs import make_node

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    cert, key = make_node(pathlib.Path(args.directory), args.name, hosts)
    print(f"CA: {pathlib.Path(args.directory) / 'ca.pem'}\ncertificate: {cert}\nkey: {key}")
    return 0

