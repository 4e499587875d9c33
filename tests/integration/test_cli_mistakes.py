"""The first hour's mistakes, answered at once with the cause and the fix.

Each connection mistake (no server, plaintext against TLS and the reverse, no
client certificate for mutual TLS, a certificate for another host name, a wrong
token) run through the command line as a user would, and through the SDK: the
process must exit non-zero well within its subprocess timeout, naming what is
wrong and the flag that mends it. Then the other mistakes a first session makes:
a CUDA device on a host without one, cancelling a finished job, a worker started
before its server.
"""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from helpers.wait import wait_until
from psgrid.cli import certs
from psgrid.client import Client
from psgrid.errors import CertificateProblem, ServerNotRunning, TlsMismatch, Unauthenticated
from psgrid.security import Security
from psgrid.server.app import ParameterServerApp
from psgrid.server.config import ServerConfig

#: Seconds a mistaken command may take at most (the issue asks for ~5).
BOUND_S = 10
TOKEN = "right-token"


def psgrid(*args: str, env: dict | None = None, timeout: float = BOUND_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psgrid", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.make_node(directory, "server", ["127.0.0.1", "localhost"])
    certs.make_node(directory, "elsewhere", ["ps.internal"])
    return directory


@pytest.fixture(scope="module")
def servers(pki):
    """One server per setup a client can get wrong, and a port where nothing listens."""
    def files(name: str, ca: bool = False, token: str | None = None) -> Security:
        return Security.from_files(token=token, ca=str(pki / "ca.pem") if ca else None,
                                   cert=str(pki / f"{name}.pem"), key=str(pki / f"{name}.key"))

    apps = {name: ParameterServerApp(ServerConfig(port=0), security).start() for name, security in {
        "plain": Security(), "token": Security(token=TOKEN), "tls": files("server"),
        "mtls": files("server", ca=True), "elsewhere": files("elsewhere")}.items()}
    # Bound, never listening: connections are refused while we hold the port.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    ports = {name: app.port for name, app in apps.items()} | {"closed": closed.getsockname()[1]}
    yield ports
    closed.close()
    for app in apps.values():
        app.stop(grace=0.2)


def mistakes(pki: pathlib.Path) -> dict[str, tuple]:
    """name -> (server, CLI flags, env, SDK security, SDK exception, what the message must say)."""
    ca = str(pki / "ca.pem")
    return {
        "not running": ("closed", [], {}, Security(), ServerNotRunning,
                        ["no psgrid server answers at 127.0.0.1:", "is it running?", "--server"]),
        "plaintext to TLS": ("tls", [], {}, Security(), TlsMismatch, ["speaks TLS", "--tls-ca"]),
        "TLS to plaintext": ("plain", ["--tls-ca", ca], {}, Security.from_files(ca=ca), TlsMismatch,
                             ["does not speak TLS", "--tls-ca"]),
        "no client certificate": ("mtls", ["--tls-ca", ca], {}, Security.from_files(ca=ca), CertificateProblem,
                                  ["requires a client certificate", "--tls-cert/--tls-key"]),
        "wrong host name": ("elsewhere", ["--tls-ca", ca], {}, Security.from_files(ca=ca), CertificateProblem,
                            ["certificate of the server at", "is for ps.internal, not 127.0.0.1", "--hosts"]),
        "wrong token": ("token", [], {"PSGRID_TOKEN": "wrong-token"}, Security(token="wrong-token"),
                        Unauthenticated, ["wrong cluster token", "--token-file", "PSGRID_TOKEN"]),
    }


CASES = ["not running", "plaintext to TLS", "TLS to plaintext", "no client certificate", "wrong host name",
         "wrong token"]


@pytest.mark.parametrize("case", CASES)
def test_the_cli_names_the_connection_mistake_and_its_fix(case, pki, servers):
    server, flags, env, _, _, says = mistakes(pki)[case]
    # subprocess.run's timeout is the bound: before this issue these took 30 s to over 2 minutes
    out = psgrid("jobs", "--server", f"127.0.0.1:{servers[server]}", *flags, env=env)
    assert out.returncode == 1, out
    assert all(s in out.stderr for s in says), out.stderr
    assert "Traceback" not in out.stderr and "Socket closed" not in out.stderr


def test_submit_to_a_server_that_is_not_running(servers):
    out = psgrid("submit", "--example", "linear", "--server", f"127.0.0.1:{servers['closed']}")
    assert out.returncode == 1 and "no psgrid server answers" in out.stderr, out


@pytest.mark.parametrize("case", CASES)
def test_the_sdk_raises_a_typed_error_naming_cause_and_fix(case, pki, servers):
    server, _, _, security, error, says = mistakes(pki)[case]
    with Client(f"127.0.0.1:{servers[server]}", security=security) as client, pytest.raises(error) as info:
        client.list_jobs()
    assert all(s in str(info.value) for s in says), str(info.value)  # one message for both: the flags too


def test_a_cuda_device_on_a_host_without_one_is_one_line_naming_the_fix(servers):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    out = psgrid("worker", "--device", "cuda:0", "--server", f"127.0.0.1:{servers['closed']}", timeout=60)
    assert out.returncode == 1, out
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "CUDA is not available" in out.stderr and "--device cpu" in out.stderr


def test_cancel_says_when_the_job_had_already_finished(servers):
    from psgrid.spec import JobSpec

    address = f"127.0.0.1:{servers['plain']}"
    with Client(address) as client:  # no workers: the job stays PENDING
        job = client.submit(JobSpec(model="psgrid.examples.models:linear",
                                    dataset="psgrid.examples.datasets:linear_regression", steps=5, num_workers=3))
    shown = psgrid("job", job.job_id, "--server", address)
    assert shown.returncode == 0 and "state:" in shown.stdout and "PENDING" in shown.stdout, shown
    first = psgrid("cancel", job.job_id, "--server", address)
    assert first.returncode == 0 and "cancelled" in first.stdout, first
    again = psgrid("cancel", job.job_id, "--server", address)
    assert again.returncode == 0 and "had already finished (cancelled)" in again.stdout, again


def test_a_worker_says_at_once_what_it_waits_for(servers, tmp_path):
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "psgrid", "worker", "--device", "cpu", "--server",
                                 f"127.0.0.1:{servers['closed']}"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: "no psgrid server answers" in log.read_text(), timeout=60,
                   message="the worker's first 'waiting for the parameter server' line")
        text = log.read_text()
        assert f"waiting for the parameter server at 127.0.0.1:{servers['closed']}" in text, text
        assert "Traceback" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
