"""Hosts with their own addresses on one machine: Linux network namespaces on a bridge.

Everything is created by the test and deleted afterwards; traffic stays inside
these namespaces (the bridge lives in a namespace of its own, with no route to
the machine's network). Needs root and iproute2.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid

SUBNET = "10.213.7"


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"psgp{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Network:
    """Hosts named in ``hosts`` get addresses SUBNET.1, .2, ... on one bridge."""

    def __init__(self, hosts: list[str]):
        tag = uuid.uuid4().hex[:5]
        self.switch = f"psg{tag}sw"
        self.namespaces = {h: f"psg{tag}{h}" for h in hosts}
        self.addresses = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(hosts)}
        self._veths = {h: f"v{tag}{i}" for i, h in enumerate(hosts)}

    def __enter__(self) -> "Network":
        try:
            self._create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for host, ns in self.namespaces.items():
            veth = self._veths[host]
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "netns", self.switch)
            _ip("link", "set", veth, "master", "br0", ns=self.switch)
            _ip("link", "set", veth, "up", ns=self.switch)
            _ip("addr", "add", f"{self.addresses[host]}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)

    def popen(self, host: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` inside ``host``'s namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *cmd], **kwargs)

    def run(self, host: str, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.namespaces[host], *cmd], **kwargs)

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[host]], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process of ``host`` at once (the host "disappears")."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def delete(self) -> None:
        for host, ns in self.namespaces.items():
            if subprocess.run(["ip", "netns", "pids", ns], capture_output=True).returncode == 0:
                self.kill_host(host)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
