"""`psgrid up` with real processes and real signals: crashes, hangs, restarts, give-up, shutdown,
security flags passed to every node, and a two-host cluster run as two `psgrid up` on this machine.

Every deadline is a wait_until; every port comes from a port file, except the
fixed ports of the multi-host test (see :func:`consecutive_free_ports`). The
cluster files use short liveness timeouts and back-offs so the file runs in
about a minute on a 2-core machine.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.ports import consecutive_free_ports
from helpers.up import Up, running
from helpers.wait import wait_until
from psgrid.cli import certs
from psgrid.client import Client
from psgrid.examples import spec_path
from psgrid.security import Security
from psgrid.spec import JobSpec, JobState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

#: A worker's liveness file counts as fresh for this long (ProcessSupervisor's default).
FILE_MAX_AGE_S = 2.0
WORKER_LIVENESS_S = 2.5

FAST = f"""
[supervisor]
max_restarts = 20
check_interval_s = 0.1
[server]
checkpoint_dir = ""
liveness_timeout_s = 5
shutdown_s = 3
backoff_initial_s = 0.1
backoff_max_s = 0.5
[workers]
liveness_timeout_s = {WORKER_LIVENESS_S}
shutdown_s = 2
backoff_initial_s = 0.1
backoff_max_s = 0.5
"""


def psgrid(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psgrid", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)



@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """One `psgrid up --workers 2` cluster shared by the crash and restart tests."""
    cluster = Up(tmp_path_factory.mktemp("up"), "--workers", "2", cluster=FAST)
    cluster.wait_running()
    yield cluster
    cluster.close()
    assert cluster.proc.returncode == 0, cluster.log.read_text()


@pytest.fixture
def fresh(tmp_path):
    """Start `psgrid up` clusters of a test's own; stop them and their children at teardown."""
    started: list[Up] = []

    def start(*args: str, cluster: str = FAST, security: Security | None = None) -> Up:
        started.append(Up(tmp_path / f"up{len(started)}", *args, cluster=cluster, security=security))
        return started[-1]

    yield start
    for cluster in reversed(started):  # a worker host before the server host it dials
        cluster.close()


def health_status(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:  # health stays open: no token needed
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
        except grpc.RpcError:
            return None


def test_a_killed_worker_gets_a_new_pid_within_3s(up):
    listed = psgrid("nodes", "--json", "--supervisor", up.address)
    assert listed.returncode == 0, listed.stderr
    nodes = {n["name"]: n for n in json.loads(listed.stdout)}
    assert [n for n in nodes] == ["server", "worker-0", "worker-1"]
    assert nodes["server"]["role"] == "server" and nodes["worker-1"]["role"] == "worker"
    assert f"server listening on {nodes['server']['address']}" in up.out.read_text()
    victim = nodes["worker-1"]
    os.kill(victim["pid"], signal.SIGKILL)
    node = up.wait_new_pid("worker-1", victim["pid"], timeout=3)
    assert node.restarts == victim["restarts"] + 1
    assert node.last_exit == "signal SIGKILL"
    assert not running(victim["pid"])


def test_a_stopped_worker_fails_liveness_and_is_replaced(up):
    victim = up.wait_running()["worker-0"]
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        # Stale after FILE_MAX_AGE_S, killed WORKER_LIVENESS_S later; the rest is slack.
        node = up.wait_new_pid("worker-0", victim.pid, timeout=FILE_MAX_AGE_S + WORKER_LIVENESS_S + 4)
    finally:
        if running(victim.pid):
            os.kill(victim.pid, signal.SIGKILL)
    assert node.last_exit == "liveness" and node.restarts == victim.restarts + 1
    wait_until(lambda: not running(victim.pid), 5, message="the stopped worker to be gone")


def test_a_killed_server_comes_back_on_the_same_port(up):
    before = up.wait_running()
    server = before["server"]
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    os.kill(server.pid, signal.SIGKILL)
    node = up.wait_new_pid("server", server.pid, timeout=20)
    assert node.address == server.address and node.restarts == server.restarts + 1
    wait_until(lambda: health_status(server.address) == health_pb2.HealthCheckResponse.SERVING, 20,
               message="the restarted server to serve")
    after = up.wait_running()
    # one_for_one: the workers rode it out (their liveness does not depend on the server)
    assert [after[w].pid for w in ("worker-0", "worker-1")] == [before[w].pid for w in ("worker-0", "worker-1")]


def test_restart_command_replaces_a_running_worker(up):
    before = up.wait_running()["worker-0"]
    out = psgrid("restart", "worker-0", "--supervisor", up.address)
    assert out.returncode == 0 and f"was pid {before.pid}" in out.stdout, out.stderr
    node = up.wait_new_pid("worker-0", before.pid, timeout=10)
    assert node.restarts == before.restarts + 1 and node.last_exit == "shutdown"
    missing = psgrid("restart", "worker-9", "--supervisor", up.address)
    assert missing.returncode == 1 and "UnknownNode" in missing.stderr and "worker-9" in missing.stderr
    table = psgrid("nodes", "--supervisor", up.address)
    assert table.returncode == 0 and str(node.pid) in table.stdout and "worker-0" in table.stdout


def test_sigterm_stops_every_node_in_reverse_order_and_exits_0(fresh):
    cluster = fresh("--workers", "2")
    pids = {n.pid: name for name, n in cluster.wait_running().items()}
    cluster.proc.send_signal(signal.SIGTERM)
    # Within the graces: workers 2 s each and the server 3 s, plus interpreter exit.
    assert cluster.wait_exit(timeout=2 + 2 + 3 + 3) == 0, cluster.log.read_text()
    log = cluster.log.read_text()
    stops = re.findall(r"stopped (server|worker-\d)", log)
    assert stops == ["worker-1", "worker-0", "server"], log
    assert "[ps] stopped" in (cluster.root / "run" / "server.log").read_text()  # a graceful stop
    assert set(cluster.started_pids()) == set(pids)
    assert not [pid for pid in pids if running(pid)]


def test_a_crash_loop_exceeds_the_intensity_and_leaves_no_process(fresh):
    crashing = FAST.replace("max_restarts = 20", "max_restarts = 3").replace(
        "[workers]", '[workers]\nargs = ["--no-such-flag"]')
    cluster = fresh("--workers", "2", cluster=crashing)
    assert cluster.wait_exit(timeout=30) == 1
    log = cluster.log.read_text()
    assert "giving up" in log and "restart intensity exceeded" in log
    assert "--no-such-flag" in (cluster.root / "run" / "worker-0.log").read_text()
    started = cluster.started_pids()
    assert sorted(set(started.values())) == ["server", "worker-0", "worker-1"]
    assert log.count("; restarting worker-") == 3  # max_restarts granted; the next crash gave up
    for worker in ("worker-0", "worker-1"):  # each worker's back-off grows (x2, jitter <= 0.5)
        delays = [float(d) for d in re.findall(rf"restarting {worker} in ([\d.]+)s", log)]
        assert delays == sorted(delays), log
    assert not [pid for pid in started if running(pid)]


def test_a_transient_worker_that_exits_0_is_not_restarted(fresh):
    # `psgrid worker --help` exits 0 at once: a normal exit, which a transient child keeps.
    normal_exit = FAST.replace("[workers]", '[workers]\nrestart = "transient"\nargs = ["--help"]')
    cluster = fresh("--workers", "1", cluster=normal_exit)
    wait_until(lambda: "worker-0 exited (exit code 0); not restarted" in cluster.log.read_text(), 30,
               message="the worker's normal exit")
    nodes = cluster.nodes()
    assert nodes["worker-0"].state.value == "STOPPED" and nodes["worker-0"].restarts == 0
    assert nodes["worker-0"].last_exit == "exit code 0" and nodes["worker-0"].pid is None
    assert nodes["server"].state.value == "RUNNING"


@pytest.mark.parametrize("command", ["up", "nodes", "restart"])
def test_help(command):
    out = psgrid(command, "--help")
    assert out.returncode == 0 and f"usage: psgrid {command}" in out.stdout


def test_a_bad_cluster_file_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "bad.toml").write_text("[workers]\ncount = -1\n")
    out = psgrid("up", str(tmp_path / "bad.toml"), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "workers.count" in out.stderr and "-1" in out.stderr
    assert not (tmp_path / "run").exists()
    missing = psgrid("nodes", timeout=30)
    if "PSGRID_SUPERVISOR" not in os.environ:
        assert missing.returncode == 1 and "--supervisor" in missing.stderr


# ---- security flags reach every node -------------------------------------------------------

@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    """A cluster token and a CA with one node certificate for 127.0.0.1 (client and server)."""
    root = tmp_path_factory.mktemp("creds")
    (root / "token").write_text("up-test-token\n")
    certs.make_node(root / "certs", "node", ["127.0.0.1", "localhost"])
    return root


@pytest.mark.parametrize("tls", [False, True], ids=["token", "token-and-mutual-tls"])
def test_up_passes_its_security_flags_to_every_node(fresh, credentials, tmp_path, tls):
    token = ["--token-file", str(credentials / "token")]
    pki = credentials / "certs"
    files = {"ca": str(pki / "ca.pem"), "cert": str(pki / "node.pem"), "key": str(pki / "node.key")} if tls else {}
    tls_flags = [arg for kind, path in files.items() for arg in (f"--tls-{kind}", path)]
    security = Security.from_files(token_file=token[1], **files)
    # `psgrid up` runs in the cluster's root (tmp_path/up0): a relative path there
    # must reach every node made absolute.
    relative = os.path.relpath(credentials / "token", tmp_path / "up0")
    # With TLS the supervisor's health probe dials the server over mutual TLS
    # (the server asks for a client certificate): RUNNING says it works.
    cluster = fresh("--workers", "1", "--token-file", relative, *tls_flags, security=security)
    server = cluster.wait_running()["server"].address
    for node in ("server", "worker-0"):
        launch = (cluster.root / "run" / f"{node}.log").read_text().splitlines()[0]
        assert " ".join([*token, *tls_flags]) in launch, launch
    trained = psgrid("submit", "--example", "linear", "--epochs", "1", "--workers", "1", "--wait",
                     "--server", server, *token, *tls_flags, timeout=60)
    assert trained.returncode == 0 and "succeeded" in trained.stdout, trained.stderr
    refused = psgrid("jobs", "--server", server, *tls_flags)  # no token
    assert refused.returncode == 1 and "Unauthenticated" in refused.stderr, refused.stderr
    listed = psgrid("jobs", "--server", server, *token, *tls_flags)
    assert listed.returncode == 0 and "linear-regression" in listed.stdout, listed.stderr
    # the Supervisor service wants the token too, for both of its RPCs; nothing restarts without it
    pid = cluster.nodes()["worker-0"].pid
    for command in (("nodes",), ("restart", "worker-0")):
        denied = psgrid(*command, "--supervisor", cluster.address, *tls_flags)
        assert denied.returncode == 1 and "Unauthenticated" in denied.stderr, denied.stderr
    assert cluster.nodes()["worker-0"].pid == pid


# ---- two hosts, two `psgrid up` ---------------------------------------------------------------

TWO_HOSTS = FAST.replace("[server]", """[hosts.ps]
address = "127.0.0.1"
servers = 2
server_port = {port}

[hosts.gpu1]
address = "127.0.0.1"
workers = 2
device = "cpu"

[server]""")


def test_two_hosts_train_through_the_coordinator_and_a_killed_shard_returns_on_its_port(fresh):
    port = consecutive_free_ports(2)
    cluster = TWO_HOSTS.format(port=port)
    coordinator, shard = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    ps = fresh("--host", "ps", cluster=cluster)
    gpu1 = fresh("--host", "gpu1", cluster=cluster)
    servers = ps.wait_running()
    assert [(n.name, n.address) for n in servers.values()] == [("shard-1", shard), ("server", coordinator)]
    workers = gpu1.wait_running()
    assert list(workers) == ["gpu1-worker-0", "gpu1-worker-1"]
    assert f"server listening on {coordinator}" in ps.out.read_text()
    assert f"shard-1 listening on {shard}" in ps.out.read_text()
    assert f"workers dial the server at {coordinator}" in gpu1.out.read_text()
    launch = (ps.root / "run" / "server.log").read_text()
    assert f"--advertise {coordinator} --shards {shard}" in launch
    assert f"advertised as {coordinator}" in launch

    with Client(coordinator) as client:
        info = client.submit(JobSpec.from_toml(spec_path("digits"))).wait(timeout=120, progress=False)
    assert info.state is JobState.SUCCEEDED and info.shards == (shard,), info
    assert info.metrics["test_accuracy"] >= 0.95, info.metrics

    victim = servers["shard-1"]
    os.kill(victim.pid, signal.SIGKILL)
    node = ps.wait_new_pid("shard-1", victim.pid, timeout=20)
    assert node.address == shard and node.restarts == 1 and node.last_exit == "signal SIGKILL"
    wait_until(lambda: health_status(shard) == health_pb2.HealthCheckResponse.SERVING, 20,
               message="the restarted shard to serve on its port")
    assert ps.nodes()["server"].pid == servers["server"].pid  # one_for_one: the coordinator rode it out


SHARDS_ON_TWO_HOSTS = FAST.replace("[server]", """[hosts.ps1]
address = "127.0.0.1"
servers = 1
server_port = {port}

[hosts.ps2]
address = "127.0.0.1"
servers = 1
server_port = {port2}
workers = 2
device = "cpu"

[server]""")


def test_shards_on_two_hosts_hold_one_job_between_them(fresh):
    port = consecutive_free_ports(2)
    cluster = SHARDS_ON_TWO_HOSTS.format(port=port, port2=port + 1)
    coordinator, shard = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    ps1 = fresh("--host", "ps1", cluster=cluster)
    ps2 = fresh("--host", "ps2", cluster=cluster)
    assert list(ps1.wait_running()) == ["server"]
    assert list(ps2.wait_running()) == ["shard-1", "ps2-worker-0", "ps2-worker-1"]
    assert f"--shards {shard}" in (ps1.root / "run" / "server.log").read_text()
    with Client(coordinator) as client:
        info = client.submit(JobSpec.from_toml(spec_path("digits"))).wait(timeout=120, progress=False)
    assert info.state is JobState.SUCCEEDED and info.shards == (shard,), info
    assert info.metrics["test_accuracy"] >= 0.95, info.metrics


def test_a_server_exposes_the_address_it_advertises():
    from psgrid.server.app import ParameterServerApp
    from psgrid.server.config import ServerConfig

    told = ParameterServerApp(ServerConfig(port=0, advertise="10.0.0.5:7070"))
    default = ParameterServerApp(ServerConfig(port=0))
    try:
        assert told.advertised == "10.0.0.5:7070" and default.advertised == default.address
    finally:
        told.server.stop(0)
        default.server.stop(0)


def test_up_says_what_its_workers_wait_for_until_the_server_answers(tmp_path):
    """A host of workers whose server (on another host) is not up yet: `psgrid up` says so
    in its own output, with the cause, and says when the server answers."""
    port = consecutive_free_ports(1)
    cluster = (f'[hosts.ps]\naddress = "127.0.0.1"\nservers = 1\nserver_port = {port}\n'
               f'[hosts.gpu1]\naddress = "127.0.0.1"\nworkers = 1\n[workers]\nargs = ["--threads", "1"]\n')
    server = None
    with Up(tmp_path / "gpu1", "--host", "gpu1", cluster=cluster) as up:
        try:
            wait_until(lambda: f"workers wait for the parameter server at 127.0.0.1:{port}: no psgrid server "
                       "answers" in up.out.read_text(), 30, message="psgrid up names what its workers wait for")
            server = subprocess.Popen([sys.executable, "-m", "psgrid", "server", "--port", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda: f"the parameter server at 127.0.0.1:{port} answers" in up.out.read_text(), 30,
                       message="and that it answers")
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
