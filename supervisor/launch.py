"""Start ``psgrid up`` as a child process, the way a user does, and find its nodes.

The one way to start a local cluster outside a terminal: ``psgrid demo``, the
integration tests and the benchmarks all go through :class:`UpProcess`. The
supervisor reports its bound port through a port file (nothing guesses a free
port); the servers' addresses come from its Supervisor service.
"""
from __future__ import annotations

import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from psgrid.security import Security
from psgrid.supervisor.cluster import SERVER_NAME
from psgrid.supervisor.nodes import NodeInfo, NodeRole
from psgrid.supervisor.supervisor_client import SupervisorClient

T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout: float, what: str, alive: Callable[[], bool] | None = None,
             interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout``.

    RuntimeError at once when ``alive`` says the process being waited on has ended.
    """
    deadline = time.monotonic() + timeout
    while True:
        if value := probe():
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"psgrid up exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f}s")
        time.sleep(interval)


class UpProcess:
    """A ``psgrid up`` child process with its own run directory, and a client of its Supervisor service.

    ``cluster`` is the text of a cluster file (written to ``root/cluster.toml``);
    ``args`` go to ``psgrid up`` after it; ``env`` adds environment variables for
    the supervisor and so for every node it starts. Logs go to ``root/up.log``
    (stderr) and ``root/up.out`` (stdout), the nodes' logs under ``root/run``.
    """

    def __init__(self, root: str | os.PathLike, *args: str, cluster: str | None = None,
                 security: Security | None = None, log_level: str = "INFO",
                 env: dict[str, str] | None = None, timeout: float = 60.0):
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_dir = self.root / "run"
        self.log, self.out = self.root / "up.log", self.root / "up.out"
        port_file = self.root / "supervisor.port"
        port_file.unlink(missing_ok=True)
        files = []
        if cluster is not None:
            (self.root / "cluster.toml").write_text(cluster)
            files = [str(self.root / "cluster.toml")]
        cmd = [sys.executable, "-m", "psgrid", "--log-level", log_level, "up", *files,
               "--run-dir", str(self.run_dir), "--port-file", str(port_file), *args]
        with open(self.out, "wb") as out, open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, **(env or {})})
        try:
            wait_for(port_file.exists, timeout, f"supervisor port file (see {self.log})", self.alive)
        except BaseException:
            self.stop()
            raise
        self.address = f"127.0.0.1:{int(port_file.read_text())}"
        self.client = SupervisorClient(self.address, security=security)

    def alive(self) -> bool:
        """Whether ``psgrid up`` is still running."""
        return self.proc.poll() is None

    def nodes(self) -> dict[str, NodeInfo]:
        """Every node by name, as the supervisor reports it now."""
        return {n.name: n for n in self.client.nodes()}

    def wait_running(self, timeout: float = 60) -> dict[str, NodeInfo]:
        """Every node, once each is RUNNING."""
        def all_running():
            nodes = self.nodes()
            return nodes if all(n.state.value == "RUNNING" for n in nodes.values()) else None
        return wait_for(all_running, timeout, "every node RUNNING", self.alive)

    def server_addresses(self, timeout: float = 60) -> list[str]:
        """The parameter-server shards' addresses, the coordinator first, once every one is known."""
        def known():
            servers = sorted((n for n in self.client.nodes() if n.role is NodeRole.SERVER),
                             key=lambda n: n.name != SERVER_NAME)
            return [n.address for n in servers] if servers and all(n.address for n in servers) else None
        return wait_for(known, timeout, "server addresses", self.alive)

    def wait_exit(self, timeout: float) -> int:
        """The exit code of ``psgrid up``, waiting up to ``timeout`` for it."""
        wait_for(lambda: not self.alive(), timeout, "exit of psgrid up", interval=0.05)
        return self.proc.returncode

    def stop(self, grace: float = 60.0) -> int:
        """SIGTERM ``psgrid up`` (it stops its nodes in order) and return its exit code; SIGKILL after ``grace``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if hasattr(self, "client"):
            self.client.close()
        return self.proc.returncode

    def __enter__(self) -> UpProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for a port-0 bind (Linux; 32768 elsewhere)."""
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that were free a moment ago.

    Everywhere else a child reports the port it bound. Shards are named to the
    coordinator by fixed addresses (other machines dial a shard before it
    starts), so a cluster file with ``servers = N`` needs fixed ports: tests and
    benchmarks that play every machine on one take them from here. It binds
    them and closes them just before `psgrid up` binds the same ports; another
    process could take a port in between. They are drawn from below the
    kernel's ephemeral range, so that no port-0 bind in between (a shard's
    direct step channel, any client) can be handed one of them.
    """
    low, high = 10000, _ephemeral_low() - count
    for _ in range(100):
        socks = [socket.socket() for _ in range(count)]
        try:
            if high > low:
                base = random.randrange(low, high)
                socks[0].bind(("127.0.0.1", base))
            else:  # no room below the ephemeral range: any free port first
                socks[0].bind(("127.0.0.1", 0))
                base = socks[0].getsockname()[1]
            for offset, sock in enumerate(socks[1:], start=1):
                sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError(f"found no {count} consecutive free ports")
