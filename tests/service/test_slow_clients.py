"""Slow, idle and many callers cannot stall a server (issue 12, item 9; psgrid.guard).

Every hostile call here is a real gRPC call to a real server on 127.0.0.1:0 that
opens its stream and then sends nothing (or not all) of its request.
"""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
import torch

from psgrid import codec, rpc
from psgrid.errors import Overloaded
from psgrid.rpc import identity
from psgrid.security import AUTH_KEY, Security
from psgrid.server.app import ParameterServerApp
from psgrid.server.config import ServerConfig
from psgrid.worker.ps_client import push_header

from helpers import fuzz
from helpers.inproc import make_rig
from helpers.wait import wait_until

TOKEN = "slow-token"
AUTH = ((AUTH_KEY, f"Bearer {TOKEN}"),)
LIST_JOBS = "/psgrid.v1.JobService/ListJobs"
PUSH = "/psgrid.v1.ParameterServer/Push"


@pytest.fixture
def start():
    apps = []

    def start(**config) -> ParameterServerApp:
        app = ParameterServerApp(ServerConfig(port=0, **config), Security(token=TOKEN)).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(grace=0.2)


class Silent:
    """Calls that open their stream and never send their request (until released)."""

    def __init__(self, address: str):
        self.hold = threading.Event()
        self.channels: list[grpc.Channel] = []
        self.address = address

    def _requests(self, first: bytes | None):
        if first is not None:
            yield first
        self.hold.wait(60)

    def open(self, method: str, count: int, metadata=(), first: bytes | None = None) -> list[grpc.Future]:
        calls = []
        for _ in range(count):
            channel = grpc.insecure_channel(self.address)  # one connection each, like separate clients
            self.channels.append(channel)
            calls.append(channel.stream_unary(method, identity, identity).future(
                self._requests(first), metadata=metadata, timeout=60))
        return calls

    def close(self) -> None:
        self.hold.set()
        for channel in self.channels:
            channel.close()


def ended(call: grpc.Future, timeout: float = 15) -> grpc.StatusCode:
    try:
        call.result(timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
    except grpc.FutureTimeoutError:
        raise AssertionError(f"a hostile call was still open after {timeout}s") from None


def list_jobs(address: str, timeout: float = 5):
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(LIST_JOBS, identity, identity)(b"", metadata=AUTH, timeout=timeout)


@pytest.mark.parametrize("target", ["parameter server", "supervisor", "inference"])
def test_tokenless_callers_that_never_send_their_request_hold_no_thread(target, tmp_path):
    """The issue's 64 tokenless connections that stalled every handler: each is refused at once."""
    contexts = {"parameter server": lambda: fuzz.parameter_server(TOKEN),
                "supervisor": lambda: fuzz.supervisor(TOKEN),
                "inference": lambda: fuzz.inference(TOKEN, tmp_path)}
    with contexts[target]() as t:
        silent = Silent(t.address)
        try:
            unary = [m for m in t.methods if not m.client_streaming]
            calls = [call for method in unary[:4] for call in silent.open(method.path, 16)]
            assert {ended(call) for call in calls} == {grpc.StatusCode.UNAUTHENTICATED}
            assert t.intact()  # an authenticated call is served meanwhile
        finally:
            silent.close()


def test_an_authenticated_request_that_does_not_arrive_is_cancelled_and_frees_its_slot(start):
    app = start(max_rpc_threads=4, request_arrive_s=0.5)
    silent = Silent(app.address)
    try:
        calls = silent.open(LIST_JOBS, 4, AUTH)
        assert {ended(call) for call in calls} == {grpc.StatusCode.CANCELLED}
        assert list_jobs(app.address) is not None  # every slot is free again
    finally:
        silent.close()


def test_a_service_at_its_bound_answers_resource_exhausted_and_the_other_service_still_serves(start):
    app = start(max_rpc_threads=4)
    rig = make_rig(app.port, security=Security(token=TOKEN))
    watchers = []
    with grpc.insecure_channel(app.address) as channel:
        watch = channel.unary_stream("/psgrid.v1.JobService/WatchJob", identity, identity)
        from psgrid.v1 import job_service_pb2 as js
        # From the first event: each watcher's first answer shows that its call holds a slot.
        # (Asking a ListJobs before all four are in would take the fourth's slot itself.)
        request = js.WatchJobRequest(job_id=rig.job_id, from_seq=0).SerializeToString()
        watchers = [watch(request, metadata=AUTH, timeout=60) for _ in range(4)]
        for w in watchers:
            assert next(w)

        def refused():
            try:
                rig.jobs.list()
            except Overloaded as exc:
                return exc
            return None

        def state(call) -> str:
            return f"{call.code()}: {call.details()}" if call.done() else "open"

        try:
            error = wait_until(refused, 30, message="JobService to reach its bound")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the watchers: {[state(w) for w in watchers]}") from None
        assert error.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 concurrent calls" in str(error)
        # The workers' service has its own bound: pushes and pulls go on.
        assert rig.push(0, 0, {"w": torch.ones(4, 3), "b": torch.ones(4)}) == (1, False)
        for w in watchers:
            w.cancel()
        wait_until(lambda: refused() is None, 15, message="the bound to free up")


def test_a_stalled_push_never_holds_up_the_workers_own_push(start):
    """The issue's Push stream held open with a valid header: the worker's real push goes
    through at once, and the stalled one is cancelled."""
    app = start()
    rig = make_rig(app.port, security=Security(token=TOKEN))
    job = app.core.job(rig.job_id)
    before = rig.params()
    header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout)
    ones = rig.layout.pack({k: torch.ones_like(v) for k, v in before.items()})
    silent = Silent(app.address)
    try:
        # its header frame only (small chunks: no inline payload); the payload never comes
        stalled, = silent.open(PUSH, 1, AUTH, first=next(codec.encode_push(header, ones, chunk_bytes=16)))
        wait_until(lambda: job.is_receiving(rig.workers[0]), 10, message="the stalled push to be received")
        twice = {k: 2 * torch.ones_like(v) for k, v in before.items()}
        assert rig.push(0, 0, twice) == (1, False)
        assert ended(stalled) == grpc.StatusCode.CANCELLED
    finally:
        silent.close()
    after = rig.params()
    assert all(torch.allclose(after[k], before[k] - 0.5 * 2) for k in before)  # the real gradient, once


def test_a_push_whose_frames_stop_coming_is_cancelled(start):
    app = start(frame_idle_s=0.5)
    rig = make_rig(app.port, security=Security(token=TOKEN))
    before = rig.params()
    header = push_header(rig.job_id, rig.workers[0], 0, 0, 0, rig.layout)
    first = next(codec.encode_push(header, rig.layout.pack(before), chunk_bytes=16))  # the header frame only
    silent = Silent(app.address)
    try:
        stalled, = silent.open(PUSH, 1, AUTH, first=first)
        assert ended(stalled) == grpc.StatusCode.CANCELLED
    finally:
        silent.close()
    assert rig.version() == 0 and all(torch.equal(rig.params()[k], before[k]) for k in before)


def test_many_silent_callers_with_and_without_the_token_leave_a_client_served(start):
    """A scaled-down version of scripts/slow_clients.py: authenticated and tokenless callers
    that never send, beyond the bound; ListJobs answers all along."""
    app = start(max_rpc_threads=8, request_arrive_s=30)
    silent = Silent(app.address)
    try:
        tokenless = silent.open(LIST_JOBS, 32) + silent.open(PUSH, 32)
        authed = silent.open(PUSH, 8, AUTH)  # the workers' service at its bound
        assert {ended(call) for call in tokenless} == {grpc.StatusCode.UNAUTHENTICATED}
        with futures.ThreadPoolExecutor(4) as pool:
            assert all(r is not None for r in pool.map(lambda _: list_jobs(app.address), range(20)))
        extra, = silent.open(PUSH, 1, AUTH)
        assert ended(extra) == grpc.StatusCode.RESOURCE_EXHAUSTED
        error = rpc.to_psgrid_error(extra.exception())
        assert isinstance(error, Overloaded)
        assert not any(call.done() for call in authed)
    finally:
        silent.close()
