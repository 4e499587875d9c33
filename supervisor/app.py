"""Run a supervised cluster (``psgrid up``): children, the Supervisor service, signals, shutdown."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from psgrid.diagnose import REMIND_EVERY_S, Reminder, diagnose
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
    ended = threading.Event()
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
        if supervisor.server_address and not any(n.name == SERVER_NAME for n in supervisor.server_nodes()):
            probe = (child_security or ChildSecurity())
            threading.Thread(target=announce_server_wait, name="up-server-wait", daemon=True,
                             args=(supervisor.server_address, Security.from_files(
                                 ca=probe.tls_ca, cert=probe.tls_cert, key=probe.tls_key), ended, out)).start()
        # The base class's run() loop, with the addresses printed once the children are up.
        while True:
            supervisor.tick(supervisor.clock())
            if supervisor.gave_up or stop.wait(interval):
                break
    finally:
        ended.set()
        supervisor.shutdown()
        service.stop()
    if supervisor.gave_up:
        logger.error("[supervisor] restart intensity exceeded: stopped every node")
        return 1
    logger.info("[supervisor] stopped every node")
    return 0


def announce_server_wait(address: str, security: Security, stop: threading.Event, out: TextIO,
                         every_s: float = REMIND_EVERY_S, poll_s: float = 1.0) -> None:
    """On a host whose workers dial a server elsewhere: until it answers, say what they
    wait for and why (at once, then every ``every_s``), and say when it answers."""
    reminder, said = Reminder(every_s), False
    while not stop.is_set():
        mistake = diagnose(address, security)
        if mistake is None:
            if said:
                print(f"the parameter server at {address} answers", file=out, flush=True)
            return
        if reminder.due(time.monotonic()):
            said = True
            print(f"workers wait for the parameter server at {address}: {mistake}", file=out, flush=True)
        stop.wait(poll_s)


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
