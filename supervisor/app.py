"""Run a supervised cluster (``psgrid up``): children, the Supervisor service, signals, shutdown."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from psgrid.portfile import write_port_file
from psgrid.security import Security
from psgrid.supervisor.cluster import SERVER_NAME, ChildSecurity, ClusterConfig, format_address
from psgrid.supervisor.process import ChildStartError, ProcessSupervisor
from psgrid.supervisor.service import SupervisorServer

logger = logging.getLogger(__name__)


def run_cluster(config: ClusterConfig, run_dir: str | os.PathLike, stop: threading.Event,
                port_file: str | os.PathLike | None = None, log_level: str = "INFO",
                out: TextIO = sys.stdout, security: Security | None = None, host: str | None = None,
                child_security: ChildSecurity | None = None,
                on_start: Callable[[ProcessSupervisor], None] | None = None) -> int:
    """Start this host's nodes and supervise them until ``stop`` is set or the supervisor gives up.

    ``host`` selects the nodes of a multi-host cluster file (None: the
    single-host form, every node); ``security`` guards the Supervisor service
    and ``child_security`` is passed on to every node. The Supervisor service
    is up (and its port in ``port_file``) before the children start, so their
    start can be watched. On ``stop`` every child is stopped in reverse start
    order, each within its ``shutdown_s``, and 0 is returned; when the restart
    intensity is exceeded, or the cluster cannot start, everything is stopped
    the same way and 1 is returned. No child outlives this function, however
    it ends.
    """
    supervisor = ProcessSupervisor(config, run_dir, log_level=log_level, host=host,
                                   security=child_security)
    service = SupervisorServer(supervisor, config.supervisor.host, config.supervisor.port, security).start()
    if on_start is not None:
        on_start(supervisor)
    interval = config.supervisor.check_interval_s
    try:
        if port_file:
            write_port_file(port_file, service.port)
        print(f"supervisor listening on {format_address(config.supervisor.host, service.port)} "
              f"(logs in {run_dir}/)", file=out, flush=True)
        try:
            supervisor.start_all(supervisor.clock())
        except ChildStartError as exc:
            logger.error("[supervisor] the cluster could not start: %s", exc)
            return 1
        _print_addresses(supervisor, out)
        # The base class's run() loop, with the addresses printed once the children are up.
        while True:
            supervisor.tick(supervisor.clock())
            if supervisor.gave_up or stop.wait(interval):
                break
    finally:
        supervisor.shutdown()
        service.stop()
    if supervisor.gave_up:
        logger.error("[supervisor] restart intensity exceeded: stopped every node")
        return 1
    logger.info("[supervisor] stopped every node")
    return 0


def _print_addresses(supervisor: ProcessSupervisor, out: TextIO) -> None:
    """Say where this host's servers listen, and where its workers dial."""
    local = supervisor.server_nodes()
    for node in local:
        print(f"{node.name} listening on {supervisor.address_of(node.name)}", file=out, flush=True)
    if not any(node.name == SERVER_NAME for node in local):
        print(f"workers dial the server at {supervisor.server_address}", file=out, flush=True)


def serve(config: ClusterConfig, run_dir: str | os.PathLike, port_file: str | os.PathLike | None = None,
          log_level: str = "INFO", security: Security | None = None, host: str | None = None,
          child_security: ChildSecurity | None = None,
          on_start: Callable[[ProcessSupervisor], None] | None = None) -> int:
    """:func:`run_cluster` until SIGTERM or SIGINT; returns the exit code."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return run_cluster(config, run_dir, stop, port_file=port_file, log_level=log_level, security=security,
                       host=host, child_security=child_security, on_start=on_start)
