"""The SDK's side of the JobService: the only gRPC in the client package."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from psgrid import messages, rpc
from psgrid.backoff import Backoff
from psgrid.security import Security
from psgrid.spec import HistoryRow, JobEvent, JobInfo, JobSpec, WorkerStatus
from psgrid.v1 import job_pb2
from psgrid.v1 import job_service_pb2 as js

if TYPE_CHECKING:  # torch loads on the first fetch: `psgrid jobs` need not wait for it
    from psgrid.codec import Pulled


class JobServiceClient(rpc.ServiceClient):
    """Typed calls of psgrid.v1.JobService; failures raise psgrid exceptions."""

    service = "psgrid.v1.JobService"

    def __init__(self, address: str, timeout_s: float = 30.0, retry_for_s: float = 120.0,
                 security: Security | None = None, check_first: bool = False):
        super().__init__(address, timeout_s, retry_for_s, security)
        #: Interactive use: before the first call, fail at once with what is wrong
        #: when the server cannot be reached (:meth:`check_connection`).
        self.check_first = check_first
        unary = self._unary
        self._submit = unary("SubmitJob", js.SubmitJobRequest, js.SubmitJobResponse)
        self._get = unary("GetJob", js.GetJobRequest, js.GetJobResponse)
        self._cancel = unary("CancelJob", js.CancelJobRequest, js.CancelJobResponse)
        self._list = unary("ListJobs", js.ListJobsRequest, js.ListJobsResponse)
        self._history = unary("GetJobHistory", js.GetJobHistoryRequest, js.GetJobHistoryResponse)
        self._workers = unary("ListWorkers", js.ListWorkersRequest, js.ListWorkersResponse)
        self._watch = self.channel.unary_stream(
            self._method("WatchJob"), request_serializer=js.WatchJobRequest.SerializeToString,
            response_deserializer=job_pb2.JobEvent.FromString)
        self._lookup = unary("LookupRows", js.LookupRowsRequest, js.LookupRowsResponse)
        self._fetch = self.channel.unary_stream(
            self._method("FetchParameters"), request_serializer=js.FetchParametersRequest.SerializeToString,
            response_deserializer=rpc.identity)

    def _first(self) -> None:
        if self.check_first:
            self.check_connection()

    def _call(self, fn, request, retry: bool = True):
        self._first()
        return rpc.call(fn, request, timeout=self.timeout_s,
                        retry_for=self.retry_for_s if retry else 0.0)

    def submit(self, spec: JobSpec) -> JobInfo:
        # Not retried: a lost reply would submit the job twice. Waiting for the
        # channel to connect first is safe: nothing is sent until it does.
        self._first()
        reply = rpc.call(self._submit, js.SubmitJobRequest(spec=messages.spec_to_proto(spec)),
                         timeout=self.timeout_s, wait_for_ready=True)
        return messages.info_from_proto(reply.job)

    def get(self, job_id: str) -> JobInfo:
        return messages.info_from_proto(self._call(self._get, js.GetJobRequest(job_id=job_id)).job)

    def cancel(self, job_id: str) -> JobInfo:
        return messages.info_from_proto(self._call(self._cancel, js.CancelJobRequest(job_id=job_id)).job)

    def list(self) -> list[JobInfo]:
        return [messages.info_from_proto(j) for j in self._call(self._list, js.ListJobsRequest()).jobs]

    def history(self, job_id: str) -> list[HistoryRow]:
        reply = self._call(self._history, js.GetJobHistoryRequest(job_id=job_id))
        return [messages.history_from_proto(r) for r in reply.rows]

    def workers(self) -> list[WorkerStatus]:
        return [messages.worker_from_proto(w) for w in self._call(self._workers, js.ListWorkersRequest()).workers]

    def watch(self, job_id: str, from_seq: int = 0, timeout_s: float | None = None) -> Iterator[JobEvent]:
        """Events from ``from_seq`` until the job is terminal (or the deadline).

        Rides through a server restart: on UNAVAILABLE it reconnects with
        capped, jittered back-off (for up to ``retry_for_s`` of outage) and
        resumes after the last event it yielded.
        """
        self._first()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        backoff = Backoff(initial=0.1, maximum=2.0)
        outage_since = None
        while True:
            remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
            stream = self._watch(js.WatchJobRequest(job_id=job_id, from_seq=from_seq), timeout=remaining)
            try:
                for msg in stream:
                    event = messages.event_from_proto(msg)
                    from_seq, outage_since = event.seq + 1, None
                    backoff.reset()
                    yield event
                return
            except grpc.RpcError as exc:
                outage_since = outage_since or time.monotonic()
                if exc.code() != grpc.StatusCode.UNAVAILABLE or (
                        time.monotonic() - outage_since > self.retry_for_s):
                    raise rpc.to_psgrid_error(exc) from None
                time.sleep(backoff.next_delay())
            finally:
                stream.cancel()

    def lookup_rows(self, job_id: str, table: str, ids) -> tuple:
        """(the table's TableSpec, float32 [len(ids), dim]): rows of ``ids`` (int64) held here."""
        from psgrid import sparse

        reply = self._call(self._lookup, js.LookupRowsRequest(job_id=job_id, table=table,
                                                              ids=sparse.ids_to_bytes(ids)))
        spec = messages.table_from_proto(reply.spec)
        return spec, sparse.rows_from_bytes(reply.rows, ids.numel(), spec)

    def fetch(self, job_id: str) -> Pulled:
        import torch

        from psgrid import codec

        def once(request, timeout):
            return codec.decode_pull(self._fetch(request, timeout=timeout),
                                     lambda n: torch.empty(n, dtype=torch.uint8))

        self._first()
        return rpc.call(once, js.FetchParametersRequest(job_id=job_id),
                        timeout=self.timeout_s + 300.0, retry_for=self.retry_for_s)
