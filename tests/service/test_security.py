"""Token authentication on every RPC, and TLS / mutual TLS."""
from __future__ import annotations

import pathlib

import grpc
import pytest
import torch

from psgrid import codec
from psgrid.v1 import parameter_server_pb2 as ps_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psgrid.cli import certs
from psgrid.client.job_client import JobServiceClient
from psgrid.errors import Unauthenticated, Unavailable
from psgrid.security import InsecureChannel, Security
from psgrid.server.app import ParameterServerApp
from psgrid.server.config import ServerConfig
from psgrid.sparse import TableSpec
from psgrid.spec import JobState
from psgrid.worker.ps_client import ParameterServerClient, push_header

from helpers.inproc import make_rig, spec

TOKEN = "s3cret-token"


@pytest.fixture
def secured():
    apps = []

    def start(security: Security):
        app = ParameterServerApp(ServerConfig(port=0), security).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(grace=0.2)


def clients(port: int, security: Security):
    address = f"127.0.0.1:{port}"
    return (ParameterServerClient(address, timeout_s=5, retry_for_s=0, security=security),
            JobServiceClient(address, timeout_s=5, retry_for_s=0, security=security))


def every_rpc(ps: ParameterServerClient, jobs: JobServiceClient, job_id: str, worker: str, layout):
    """One call of each RPC of both services, unary and streaming."""
    buf = lambda n: torch.empty(n, dtype=torch.uint8)  # noqa: E731
    return {
        "RegisterWorker": lambda: ps.register("intruder", "h", 1, "cpu"),
        "Heartbeat": lambda: ps.heartbeat(worker, job_id),
        "Pull": lambda: ps._call(lambda r, timeout: list(ps._pull(r, timeout=timeout)),
                                 ps_pb2.PullRequest(job_id=job_id, worker_id=worker)),
        "Push": lambda: ps._call(lambda h, timeout: ps._push(codec.encode_push(h, layout.pack(
            {"w": torch.ones(4, 3), "b": torch.ones(4)})), timeout=timeout), push_header(job_id, worker, 0, 0, 0, layout)),
        "Step": lambda: ps.pull(job_id, worker, 0, False, buf),
        "ReportMetrics": lambda: ps.report(worker, job_id, "FAILED", error="x"),
        "OpenPartition": lambda: ps.open_partition("job-x", spec(), ["intruder"], 1, 2),
        "ClosePartition": lambda: ps.close_partition(job_id, worker, JobState.CANCELLED),
        "ListRestorePoints": lambda: ps.restore_points(job_id, worker),
        "RollBack": lambda: ps.roll_back(job_id, worker, (0, ""), 0),
        "PullRows": lambda: ps.pull_rows(job_id, worker, TABLE, torch.tensor([1, 2])),
        "PushRows": lambda: ps.push_rows(job_id, worker, 0, {"emb": (torch.tensor([1]), torch.ones(1, 4))}),
        "SubmitJob": lambda: jobs.submit(spec()),
        "GetJob": lambda: jobs.get(job_id),
        "WatchJob": lambda: list(jobs.watch(job_id, timeout_s=5)),
        "CancelJob": lambda: jobs.cancel(job_id),
        "ListJobs": lambda: jobs.list(),
        "FetchParameters": lambda: jobs.fetch(job_id),
        "GetJobHistory": lambda: jobs.history(job_id),
        "ListWorkers": lambda: jobs.workers(),
        "LookupRows": lambda: jobs.lookup_rows(job_id, "emb", torch.tensor([1, 2])),
    }


#: The embedding table the token test's calls name (psgrid.sparse).
TABLE = TableSpec("emb", 100, 4)


def test_every_rpc_of_both_services_is_in_the_token_test():
    from psgrid.v1 import job_service_pb2, parameter_server_pb2

    declared = {m.name for f, name in ((parameter_server_pb2, "ParameterServer"), (job_service_pb2, "JobService"))
                for m in f.DESCRIPTOR.services_by_name[name].methods}
    assert set(every_rpc(None, None, "", "", None)) == declared


@pytest.mark.parametrize("presented", [None, "wrong-token"])
def test_every_rpc_needs_the_token_and_changes_nothing_without_it(secured, presented):
    server = secured(Security(token=TOKEN))
    rig = make_rig(server.port, security=Security(token=TOKEN))
    summary = lambda: [(j.job_id, j.state, j.version, j.step, j.error) for j in rig.jobs.list()]  # noqa: E731
    before_params, before_jobs = rig.params(), summary()
    before_workers = set(server.core._workers)
    ps, jobs = clients(server.port, Security(token=presented))
    for name, call in every_rpc(ps, jobs, rig.job_id, rig.workers[0], rig.layout).items():
        with pytest.raises(Unauthenticated):
            call()
    assert summary() == before_jobs
    assert set(server.core._workers) == before_workers
    after = rig.params()
    assert all(torch.equal(after[k], before_params[k]) for k in after)
    # the right token works for the same calls
    assert rig.jobs.get(rig.job_id).job_id == rig.job_id
    assert rig.push(0, 0, {"w": torch.ones(4, 3), "b": torch.ones(4)}) == (1, False)


def test_health_stays_open(secured):
    server = secured(Security(token=TOKEN))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_token_over_plaintext_to_a_remote_host_is_refused():
    # refused while building the channel: nothing is ever sent to that address
    with pytest.raises(InsecureChannel):
        JobServiceClient("192.0.2.10:7070", security=Security(token=TOKEN))
    JobServiceClient("localhost:7070", security=Security(token=TOKEN)).close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, pathlib.Path]:
    good = tmp_path_factory.mktemp("pki")
    other = tmp_path_factory.mktemp("other-ca")
    certs.make_node(good, "server", ["127.0.0.1", "localhost"])
    certs.make_node(good, "client", ["client.local"])
    certs.make_node(other, "client", ["client.local"])
    return {"good": good, "other": other}


def tls(directory: pathlib.Path, name: str, ca_dir: pathlib.Path, token: str | None = None) -> Security:
    return Security.from_files(token=token, ca=str(ca_dir / "ca.pem"),
                               cert=str(directory / f"{name}.pem"), key=str(directory / f"{name}.key"))


def test_plaintext_client_fails_against_a_tls_server(secured, pki):
    server = secured(tls(pki["good"], "server", pki["good"]))
    with pytest.raises(Unavailable):
        clients(server.port, Security())[1].list()


def test_mutual_tls(secured, pki):
    server = secured(tls(pki["good"], "server", pki["good"], token=TOKEN))
    _, jobs = clients(server.port, tls(pki["good"], "client", pki["good"], token=TOKEN))
    assert jobs.list() == []
    _, stranger = clients(server.port, tls(pki["other"], "client", pki["good"], token=TOKEN))
    with pytest.raises(Unavailable):
        stranger.list()
    # a certificate alone is not enough: the token is still required
    _, no_token = clients(server.port, tls(pki["good"], "client", pki["good"]))
    with pytest.raises(Unauthenticated):
        no_token.list()


def test_a_job_outside_the_allow_list_is_refused_at_submit(server):
    from psgrid.errors import PermissionDenied

    jobs = JobServiceClient(f"127.0.0.1:{server.port}", retry_for_s=0)
    with pytest.raises(PermissionDenied) as info:
        jobs.submit(spec(model="os.path:join"))
    assert info.value.grpc_code == grpc.StatusCode.PERMISSION_DENIED and "allow-list" in str(info.value)
    assert jobs.list() == []


def test_the_direct_step_channel_is_only_got_with_the_token_and_never_under_tls(secured, pki):
    """A ticket for the direct step channel (psgrid.channel) comes only on a step stream the
    token let through (every_rpc's Step: UNAUTHENTICATED without it); a TLS server offers
    none, so that no frame of its travels in the clear."""
    plain = secured(Security.from_files(token=TOKEN))
    rig = make_rig(plain.port, spec(num_workers=1, staleness=None), security=Security.from_files(token=TOKEN))
    rig.pull(0, 0)
    assert rig.ps.stream(rig.workers[0]).on_channel
    server = secured(tls(pki["good"], "server", pki["good"], token=TOKEN))
    assert server.listener is None
    rig = make_rig(server.port, spec(num_workers=1, staleness=None),
                   security=tls(pki["good"], "client", pki["good"], token=TOKEN))
    rig.pull(0, 0)
    assert not rig.ps.stream(rig.workers[0]).on_channel
