"""`psgrid up` as a test drives it: a real supervisor process and a client of its service."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

from psgrid.security import Security
from psgrid.supervisor.supervisor_client import SupervisorClient

from helpers.wait import wait_until


def running(pid: int) -> bool:
    """Whether ``pid`` is a psgrid process that has not ended (a zombie has ended)."""
    proc = pathlib.Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes()
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return b"psgrid" in cmdline and state != "Z"


class Up:
    """A `psgrid up` process started by a test, and a client of its Supervisor service.

    ``args`` go to `psgrid up` (``--host NAME``, security flags, ...);
    ``security`` is what the test's own Supervisor client presents.
    """

    def __init__(self, root: pathlib.Path, *args: str, cluster: str | None = None,
                 security: Security | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = root / "up.log"
        self.out = root / "up.out"
        port_file = root / "supervisor.port"
        files = []
        if cluster is not None:
            (root / "cluster.toml").write_text(cluster)
            files = [str(root / "cluster.toml")]
        cmd = [sys.executable, "-m", "psgrid", "up", *files, "--run-dir", str(root / "run"),
               "--port-file", str(port_file), *args]
        with open(self.out, "wb") as out, open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_until(lambda: port_file.exists() or self.proc.poll() is not None, 30,
                   message="the supervisor's port file")
        assert port_file.exists(), self.log.read_text()
        self.address = f"127.0.0.1:{int(port_file.read_text())}"
        self.client = SupervisorClient(self.address, security=security)

    def nodes(self) -> dict:
        return {n.name: n for n in self.client.nodes()}

    def wait_running(self, timeout: float = 30) -> dict:
        def all_running():
            nodes = self.nodes()
            return nodes if all(n.state.value == "RUNNING" for n in nodes.values()) else None
        return wait_until(all_running, timeout, message="every node RUNNING")

    def wait_new_pid(self, name: str, old_pid: int, timeout: float):
        def replaced():
            node = self.nodes()[name]
            return node if node.pid and node.pid != old_pid else None
        return wait_until(replaced, timeout, interval=0.05, message=f"a new pid for {name}")

    def started_pids(self) -> dict[int, str]:
        """Every process the supervisor ever started, from its log: pid -> node name."""
        found = re.findall(r"started (\S+) \(pid (\d+)\)", self.log.read_text())
        return {int(pid): name for name, pid in found}

    def wait_exit(self, timeout: float) -> int:
        wait_until(lambda: self.proc.poll() is not None, timeout, message="psgrid up to exit")
        return self.proc.returncode

    def close(self) -> None:
        """Stop the supervisor if a test left it running; kill whatever it left behind."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.started_pids():
            if running(pid):
                os.killpg(pid, signal.SIGKILL)
