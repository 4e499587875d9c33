"""Start a parameter server and workers as local child processes, and stop them.

Used by ``psgrid demo``, the integration tests and the benchmarks. Each child
is a real ``python -m psgrid`` process in its own session; the server reports
its bound port through a port file, so nothing guesses a free port.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

from psgrid.worker.device import default_threads


class LocalCluster:
    """``servers`` parameter-server shards and ``workers`` workers on loopback.

    Use as a context manager. Shard 0, the coordinator, is the one clients and
    workers dial (``address``); the others are named to it with ``--shards``.
    """

    def __init__(self, run_dir: str | os.PathLike, workers: int = 2, threads: int | None = None,
                 server_args: tuple[str, ...] = (), worker_args: tuple[str, ...] = (),
                 log_level: str = "INFO", servers: int = 1):
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for old in self.run_dir.glob("*.log"):
            old.unlink()
        self.n_workers = workers
        self.threads = threads or default_threads(max(1, workers))
        self.server_args = tuple(server_args)
        self.worker_args = tuple(worker_args)
        self.log_level = log_level
        self.server: subprocess.Popen | None = None
        self.n_servers = servers
        self.shard_servers: list[subprocess.Popen] = []
        self.shard_addresses: list[str] = []
        self.workers: list[subprocess.Popen] = []
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.run_dir / f"{name}.log", "ab")
        cmd = [sys.executable, "-m", "psgrid", "--log-level", self.log_level, *args]
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, **env} if env else None)
        finally:
            log.close()

    def _start_server_process(self, name: str, *extra: str, timeout: float = 60.0) -> tuple[subprocess.Popen, int]:
        port_file = self.run_dir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        proc = self._spawn(name, "server", "--host", "127.0.0.1", "--port", "0",
                           "--port-file", str(port_file), *self.server_args, *extra)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.run_dir}/{name}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not report its port within {timeout}s")
            time.sleep(0.05)
        return proc, int(port_file.read_text())

    def start_server(self, timeout: float = 60.0) -> None:
        """Start the shard servers (when ``servers`` > 1), then the coordinator naming them."""
        addresses = []
        for index in range(1, self.n_servers):
            proc, port = self._start_server_process(f"shard{index}", timeout=timeout)
            self.shard_servers.append(proc)
            addresses.append(f"127.0.0.1:{port}")
        extra = ("--shards", ",".join(addresses)) if addresses else ()
        self.server, self.port = self._start_server_process("server", *extra, timeout=timeout)
        self.shard_addresses = addresses

    def start_worker(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start one more worker; ``env`` adds environment variables for it alone."""
        index = len(self.workers)
        proc = self._spawn(f"worker{index}", "worker", "--server", self.address,
                           "--threads", str(self.threads), "--name", f"worker-{index}",
                           *self.worker_args, env=env)
        self.workers.append(proc)
        return proc

    def start(self) -> "LocalCluster":
        self.start_server()
        for _ in range(self.n_workers):
            self.start_worker()
        return self

    def processes(self) -> list[subprocess.Popen]:
        return [p for p in [*self.workers, self.server, *self.shard_servers] if p is not None]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child (workers first), SIGKILL whatever outlives ``grace``."""
        procs = self.processes()
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
