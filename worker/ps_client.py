"""The worker's side of the ParameterServer service: the only gRPC in the worker."""
from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import torch

from psgrid import codec, messages, rpc
from psgrid.codec import Layout, Pulled
from psgrid.errors import NotFound, NotReady
from psgrid.security import Security
from psgrid.spec import Assignment, JobSpec, JobState, RestorePoints
from psgrid.v1 import parameter_server_pb2 as ps

_PHASE = {name.removeprefix("WORKER_PHASE_"): v for name, v in ps.WorkerPhase.items()}

#: Longest one training pull waits on the server before asking again: the server
#: frees its handler, and a worker whose calls were not cancelled still stops soon.
PULL_SLICE_S = 2.0


class ParameterServerClient(rpc.ServiceClient):
    """Calls a parameter server; every call has a deadline and retries UNAVAILABLE.

    Once ``stop`` is set, every call raises Stopping instead of trying or
    retrying (see :func:`psgrid.rpc.call`); closing the client cancels the calls
    in flight.
    """

    service = "psgrid.v1.ParameterServer"

    def __init__(self, address: str, timeout_s: float = 30.0, retry_for_s: float = 60.0,
                 security: Security | None = None, stop: threading.Event | None = None):
        super().__init__(address, timeout_s, retry_for_s, security)
        self.stop = stop or threading.Event()
        unary = self._unary
        self._register = unary("RegisterWorker", ps.RegisterWorkerRequest, ps.RegisterWorkerResponse)
        self._heartbeat = unary("Heartbeat", ps.HeartbeatRequest, ps.HeartbeatResponse)
        self._report = unary("ReportMetrics", ps.ReportMetricsRequest, ps.ReportMetricsResponse)
        self._open = unary("OpenPartition", ps.OpenPartitionRequest, ps.OpenPartitionResponse)
        self._close = unary("ClosePartition", ps.ClosePartitionRequest, ps.ClosePartitionResponse)
        self._points = unary("ListRestorePoints", ps.ListRestorePointsRequest, ps.ListRestorePointsResponse)
        self._roll_back = unary("RollBack", ps.RollBackRequest, ps.RollBackResponse)
        self._pull = self.channel.unary_stream(
            self._method("Pull"), request_serializer=ps.PullRequest.SerializeToString,
            response_deserializer=rpc.identity)
        self._push = self.channel.stream_unary(
            self._method("Push"), request_serializer=rpc.identity,
            response_deserializer=ps.PushResponse.FromString)

    def _call(self, fn, request, **kw):
        return rpc.call(fn, request, timeout=kw.pop("timeout", self.timeout_s),
                        retry_for=kw.pop("retry_for", self.retry_for_s), stop=self.stop, **kw)

    def register(self, name: str, host: str, pid: int, device: str) -> tuple[str, float]:
        reply = self._call(self._register, ps.RegisterWorkerRequest(name=name, host=host, pid=pid, device=device))
        return reply.worker_id, reply.heartbeat_interval_s

    def heartbeat(self, worker_id: str, job_id: str) -> tuple[Assignment | None, JobState | None]:
        reply = self._call(self._heartbeat, ps.HeartbeatRequest(worker_id=worker_id, job_id=job_id),
                           timeout=10.0, retry_for=0.0)
        assignment = None
        if reply.HasField("assignment"):
            a = reply.assignment
            assignment = Assignment(a.job_id, a.rank, a.world_size, messages.spec_from_proto(a.spec),
                                    a.start_step, tuple(a.shards), tuple(a.worker_names))
        return assignment, messages.state_from_proto(reply.job_state)

    def pull(self, job_id: str, worker_id: str, clock: int, final: bool,
             buffer_for: Callable[[int], torch.Tensor], wait_s: float | None = None) -> Pulled:
        """Weights for step ``clock``; waits until they may be had, or until stopping (Stopping).

        The server is asked to wait at most PULL_SLICE_S at a time, and asked again
        when a wait ends (an unreachable server is retried). With ``wait_s``, it waits
        at most about that long and NotReady is raised after, and an unreachable
        server is retried for about as long before Unavailable is raised: the caller
        looks around and asks again.
        """
        def once(req, timeout):
            return codec.decode_pull(self._pull(req, timeout=timeout), buffer_for)

        if wait_s is not None:
            request = ps.PullRequest(job_id=job_id, worker_id=worker_id, clock=clock, final=final,
                                     max_wait_s=wait_s)
            return self._call(once, request, timeout=wait_s + self.timeout_s + 60.0, retry_for=wait_s)
        request = ps.PullRequest(job_id=job_id, worker_id=worker_id, clock=clock, final=final,
                                 max_wait_s=PULL_SLICE_S)
        while True:
            try:
                return self._call(once, request, timeout=PULL_SLICE_S + self.timeout_s + 60.0, retry_for=1e9,
                                  retry_codes={grpc.StatusCode.UNAVAILABLE})
            except NotReady:  # the server waited a whole slice: ask again (it held the call, no back-off)
                continue

    def push(self, header: ps.PushHeader, payload: torch.Tensor) -> tuple[int, bool]:
        """Send a gradient (or initial parameters); a retry is deduplicated by the server."""
        def once(frames_header, timeout):
            return self._push(codec.encode_push(frames_header, payload), timeout=timeout)

        reply = self._call(once, header, timeout=self.timeout_s + 60.0)
        return reply.version, reply.duplicate

    def open_partition(self, job_id: str, spec: JobSpec, worker_names: list[str], index: int, count: int) -> None:
        self._call(self._open, ps.OpenPartitionRequest(
            job_id=job_id, spec=messages.spec_to_proto(spec), worker_names=worker_names,
            shard_index=index, shard_count=count))

    def close_partition(self, job_id: str, worker_id: str, state: JobState) -> None:
        self._call(self._close, ps.ClosePartitionRequest(
            job_id=job_id, worker_id=worker_id, state=messages.state_to_proto(state)))

    def restore_points(self, job_id: str, worker_id: str) -> RestorePoints:
        """Where the job is on this server, and the snapshots it can be put back to."""
        r = self._call(self._points, ps.ListRestorePointsRequest(job_id=job_id, worker_id=worker_id))
        return RestorePoints(r.step, r.lineage, r.timeline, tuple((p.step, p.lineage) for p in r.points), r.clock)

    def roll_back(self, job_id: str, worker_id: str, point: tuple[int, str], expect_timeline: int) -> tuple[int, bool]:
        """Put this server's part of the job back to snapshot ``point`` (step, lineage),
        unless it was rolled back since timeline ``expect_timeline``."""
        reply = self._call(self._roll_back, ps.RollBackRequest(
            job_id=job_id, worker_id=worker_id, step=point[0], lineage=point[1], expect_timeline=expect_timeline))
        return reply.step, reply.rolled_back

    def report(self, worker_id: str, job_id: str, phase: str, step: int = 0, total_steps: int = 0,
               loss: float = float("nan"), samples: int = 0, seconds: float = 0.0,
               metrics: dict[str, float] | None = None, error: str = "") -> JobState | None:
        request = ps.ReportMetricsRequest(
            worker_id=worker_id, job_id=job_id, phase=_PHASE[phase], step=step,
            total_steps=total_steps, loss=loss, samples=samples, seconds=seconds,
            metrics=metrics or {}, error=error[:4000],
        )
        return messages.state_from_proto(self._call(self._report, request).job_state)


def push_header(job_id: str, worker_id: str, seq: int, base_version: int, base_step: int,
                layout: Layout, init: bool = False, ranks: tuple[int, ...] = ()) -> ps.PushHeader:
    """The header of a push: a gradient for step ``seq`` on ``ranks``' data (empty: the worker's own)."""
    return ps.PushHeader(
        job_id=job_id, worker_id=worker_id, seq=seq, base_version=base_version,
        base_step=base_step, init=init, tensors=codec.layout_to_proto(layout), ranks=ranks,
    )


__all__ = ["Assignment", "ParameterServerClient", "push_header", "NotFound"]
