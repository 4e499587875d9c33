"""`psgrid up` as a test drives it: :class:`~psgrid.supervisor.launch.UpProcess` plus what tests check."""
from __future__ import annotations

import os
import pathlib
import re
import signal

from psgrid.supervisor.launch import UpProcess

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


class Up(UpProcess):
    """A `psgrid up` process started by a test, and a client of its Supervisor service.

    ``args`` go to `psgrid up` (``--host NAME``, security flags, ...);
    ``security`` is what the test's own Supervisor client presents.
    """

    def wait_new_pid(self, name: str, old_pid: int, timeout: float):
        def replaced():
            node = self.nodes()[name]
            return node if node.pid and node.pid != old_pid else None
        return wait_until(replaced, timeout, interval=0.05, message=f"a new pid for {name}")

    def started_pids(self) -> dict[int, str]:
        """Every process the supervisor ever started, from its log: pid -> node name."""
        found = re.findall(r"started (\S+) \(pid (\d+)\)", self.log.read_text())
        return {int(pid): name for name, pid in found}

    def close(self) -> None:
        """Stop the supervisor if a test left it running; kill whatever it left behind."""
        self.stop(grace=30)
        for pid in self.started_pids():
            if running(pid):
                os.killpg(pid, signal.SIGKILL)
