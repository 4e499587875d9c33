"""gRPC adapters of the parameter server: decode, call the core, encode.

Every method receives its request as raw bytes and decodes it itself
(:func:`psgrid.rpc.decode`; Push frame by frame through :mod:`psgrid.codec`), so
the token check comes before any parsing and bad bytes are INVALID_ARGUMENT. The
streams that carry tensors (Pull, Push, FetchParameters) send raw frames framed by
:mod:`psgrid.codec`; every other reply is a generated protobuf message.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import grpc
import torch

from psgrid import channel, codec, messages, shm, sparse, stepframes
from psgrid.errors import (FailedPrecondition, Internal, InvalidArgument, MalformedPayload, MalformedRequest,
                           PayloadTooLarge, PsgridError)
from psgrid.limits import quote
from psgrid.rpc import stream_handler, translate_errors, unary_handler, unary_stream_handler
from psgrid.server.core import ParameterServerCore
from psgrid.server.steps import PullResult, PushHeader
from psgrid.v1 import job_service_pb2 as js
from psgrid.v1 import parameter_server_pb2 as ps

logger = logging.getLogger(__name__)

_PHASES = {v.number: v.name.removeprefix("WORKER_PHASE_") for v in ps.WorkerPhase.DESCRIPTOR.values}


def pull_frames(result: PullResult, shm: bool = False, pieces: bool = False,
                store_seq: int | None = None) -> Iterator[bytes]:
    return codec.encode_pull(result.state, result.version, result.step, result.layout,
                             result.payload, result.clock, result.ranks, result.lineage, shm=shm, pieces=pieces,
                             store_seq=store_seq)


class StreamMemory:
    """A step stream's shared memory (psgrid.shm): its push and pull segments, and the
    job's parameters when the worker was offered them. Dropped with the stream."""

    def __init__(self):
        #: push, pull, then the name the parameters were offered under, if they were.
        self.segments: list[shm.Segment] = []
        #: The job's parameters (psgrid.shm.SharedStore) the worker maps, if any.
        self.store: shm.SharedStore | None = None

    @property
    def push(self) -> shm.Segment | None:
        return self.segments[0] if self.segments else None

    @property
    def pull(self) -> shm.Segment | None:
        return self.segments[1] if self.segments else None

    def drop(self) -> None:
        for segment in self.segments:
            segment.unlink()
        self.segments.clear()
        self.store = None


def _push_payload(shm: bool, header: PushHeader, inline: memoryview | None, frames: Iterator[bytes],
                  memory: StreamMemory) -> tuple[object, stepframes.Payload]:
    """Where a step-stream push's payload is (what core.push takes), and the chunk frames
    still to come on the stream for it (none when inline or in shared memory)."""
    nbytes = header.wire_bytes
    payload = stepframes.Payload(frames, 0 if shm or inline is not None else nbytes)
    if not shm:
        return ([inline] if inline is not None else payload), payload
    if memory.push is None or nbytes > memory.push.data.numel():
        raise MalformedRequest("a push from shared memory on a stream without it, or larger than it")
    return memory.push.data[:nbytes], payload  # the push segment; copied once, then checked (StepPath.push)


def _tables(h: ps.PushHeader) -> tuple:
    tables = tuple(messages.table_from_proto(t) for t in h.tables)
    if len({t.name for t in tables}) != len(tables):
        raise InvalidArgument("an init push names a table twice")
    if tables and not h.init:
        raise InvalidArgument("only an init push declares embedding tables")
    return tables


class ParameterServerService:
    """psgrid.v1.ParameterServer over a :class:`ParameterServerCore`."""

    def __init__(self, core: ParameterServerCore):
        self.core = core
        #: Where workers may carry their step streams on (psgrid.channel); None: nowhere.
        self.listener: channel.Listener | None = None

    @translate_errors
    def RegisterWorker(self, request: ps.RegisterWorkerRequest, context) -> ps.RegisterWorkerResponse:
        record = self.core.register_worker(request.name, request.host, request.pid, request.device)
        return ps.RegisterWorkerResponse(
            worker_id=record.worker_id, heartbeat_interval_s=self.core.config.heartbeat_interval_s
        )

    @translate_errors
    def Heartbeat(self, request: ps.HeartbeatRequest, context) -> ps.HeartbeatResponse:
        if not math.isfinite(request.wait_s) or request.wait_s < 0:
            raise InvalidArgument(f"wait_s must be a finite number >= 0, got {request.wait_s}")
        assignment, state = self.core.heartbeat(request.worker_id, request.job_id, request.wait_s)
        reply = ps.HeartbeatResponse()
        if state is not None:
            reply.job_state = messages.state_to_proto(state)
        if assignment is not None:
            reply.assignment.CopyFrom(ps.Assignment(
                job_id=assignment.job_id, rank=assignment.rank,
                world_size=assignment.world_size, spec=messages.spec_to_proto(assignment.spec),
                start_step=assignment.start_step, shards=assignment.shards,
                worker_names=assignment.worker_names,
            ))
        return reply

    @translate_errors
    def Pull(self, request: ps.PullRequest, context) -> Iterator[bytes]:
        yield from pull_frames(self._pull(request, context))

    def _pull(self, request: ps.PullRequest, context, into: torch.Tensor | None = None,
              mapped: shm.SharedStore | None = None) -> PullResult:
        if not math.isfinite(request.max_wait_s) or request.max_wait_s < 0:
            raise InvalidArgument(f"max_wait_s must be a finite number >= 0, got {request.max_wait_s}")
        remaining = context.time_remaining()
        wait = min(self.core.config.pull_wait_s, request.max_wait_s or 1e9, max(0.0, (remaining or 1e9) - 0.5))
        return self.core.pull(request.job_id, request.worker_id, request.clock, request.final, wait, into, mapped)

    @translate_errors
    def Push(self, request_iterator: Iterator[bytes], context) -> ps.PushResponse:
        h, inline = codec.decode_push_header(next(request_iterator, None))
        version, duplicate = self.core.push(
            self._push_header(h), codec.header_payload(inline, request_iterator, ps.PushRequest), context.cancel)
        return ps.PushResponse(version=version, duplicate=duplicate)

    def _push_header(self, h: ps.PushHeader) -> PushHeader:
        limit = self.core.config.max_payload_bytes
        if h.payload_bytes > limit:
            raise PayloadTooLarge(f"payload of {h.payload_bytes} bytes declared, limit {limit}")
        return PushHeader(
            job_id=h.job_id, worker_id=h.worker_id, seq=h.seq, base_version=h.base_version,
            base_step=h.base_step, init=h.init, samples=h.samples, ranks=tuple(h.ranks),
            layout=codec.layout_from_proto(h.tensors, limit), encoding=codec.encoding_from_proto(h),
            payload_bytes=h.payload_bytes, tables=_tables(h), row_tables=h.row_tables,
        )

    @translate_errors
    def Step(self, request_iterator: Iterator[bytes], context) -> Iterator[bytes]:
        """A worker's step stream (psgrid.stepframes): answer each pull and push in order.

        A request that fails is answered with an error frame and the stream goes
        on; a frame out of order (or a push whose tensors cannot be read, so its
        length is unknown) ends the stream with that error. The stream's shared
        memory segments (psgrid.shm), if any, end with it.
        """
        memory = StreamMemory()
        try:
            yield from self._step(iter(request_iterator), context, memory)
        finally:
            memory.drop()

    def serve_channel(self, connection: channel.Connection, worker_id: str) -> None:
        """A step stream carried on a direct channel (psgrid.channel), until it ends: the
        same frames and answers as :meth:`Step`, the same handling."""
        memory = StreamMemory()
        try:
            for reply in self._step(connection, connection, memory, on_channel=True):
                connection.send([reply])
        except channel.ChannelBroken as exc:
            logger.debug("[ps] step channel of %s ended: %s", worker_id, exc)
        except PsgridError as exc:  # out of step, or a frame it cannot take: the stream ends with it, as on gRPC
            logger.info("[ps] step channel of %s ended: %s: %s", worker_id, type(exc).__name__, exc)
            self._last_word(connection, exc)
        except Exception as exc:  # noqa: BLE001 - a bug: said in full, and INTERNAL to the worker, as on gRPC
            logger.exception("[ps] step channel of %s failed", worker_id)
            self._last_word(connection, Internal(f"{type(exc).__name__}: {exc}"))
        finally:
            memory.drop()

    @staticmethod
    def _last_word(connection: channel.Connection, exc: PsgridError) -> None:
        try:
            connection.send([stepframes.error(exc)])
        except channel.ChannelBroken:
            pass

    def _step(self, frames: Iterator[bytes], context, memory: StreamMemory,
              on_channel: bool = False) -> Iterator[bytes]:
        for frame in frames:
            request, inline = stepframes.read_request(frame)
            kind = request.WhichOneof("frame")
            if kind == "pull":
                into = memory.pull.data if request.pull.shm and memory.pull is not None else None
                mapped = memory.store if into is not None and not request.pull.copy else None
                try:
                    result = self._pull(request.pull, context, into, mapped)
                except PsgridError as exc:
                    yield stepframes.error(exc)
                    continue
                if result.shared is not None:  # the worker reads the parameters where they are: no copy
                    yield from pull_frames(dataclasses.replace(result, payload=None), store_seq=result.seq)
                    continue
                if into is not None and result.payload is not None and result.layout.total_bytes == into.numel():
                    if result.payload.data_ptr() != into.data_ptr():  # BSP: the store itself, unchanging now
                        into.copy_(result.payload[: result.layout.total_bytes])
                    yield from pull_frames(dataclasses.replace(result, payload=None), shm=True)
                else:
                    yield from pull_frames(result, pieces=on_channel)  # a channel sends the payload's views
                continue
            if kind in ("shm_open", "channel_open"):  # an offer of another path, or why not
                try:
                    yield (self._offer(request.shm_open, memory) if kind == "shm_open"
                           else self._channel_offer(request.channel_open, on_channel))
                except PsgridError as exc:
                    yield stepframes.error(exc)
                continue
            header = self._push_header(request.push)
            pieces, payload = _push_payload(request.push.shm, header, inline, frames, memory)
            try:
                version, duplicate = self.core.push(header, pieces, context.cancel)
            except (MalformedPayload, grpc.RpcError):
                raise  # the stream is out of step, or gone
            except PsgridError as exc:
                payload.drain()
                yield stepframes.error(exc)
                continue
            yield stepframes.pushed(version, duplicate)

    def _offer(self, request: ps.ShmOpen, memory: StreamMemory) -> bytes:
        """Create this stream's two segments, and name the job's parameters in shared memory
        when the worker can read them there (FailedPrecondition saying why not)."""
        memory.drop()
        if request.decline:
            raise FailedPrecondition("shared memory declined: its segments are dropped")
        if not self.core.config.shared_memory:
            raise FailedPrecondition("this server offers no shared memory (shared_memory = false)")
        nbytes = self.core.payload_bytes(request.job_id, request.worker_id)
        try:
            shm.check_space(2 * nbytes)
            memory.segments.extend(shm.Segment.create(nbytes) for _ in range(2))
        except (shm.Unavailable, OSError) as exc:
            memory.drop()
            raise FailedPrecondition(f"no shared memory: {exc}") from None
        store = self.core.shared_store(request.job_id, request.worker_id) if request.store else None
        if store is not None:
            try:
                memory.segments.append(store.link())
                memory.store = store
            except shm.Unavailable as exc:
                logger.info("[ps] job %s: %s; its pulls are copied", request.job_id, exc)
        return stepframes.offer(memory.push, memory.pull, nbytes, memory.segments[2] if memory.store else None)

    def _channel_offer(self, request: ps.ChannelOpen, on_channel: bool) -> bytes:
        """A ticket for a direct step channel (FailedPrecondition saying why not)."""
        if self.listener is None:
            raise FailedPrecondition("this server offers no direct step channel (step_channel = false, or TLS)")
        if on_channel:
            raise FailedPrecondition("this step stream is on a direct channel already")
        self.core.state.worker(request.worker_id)  # UnknownWorker unless registered
        return stepframes.channel_offer(self.listener.port, self.listener.tickets.issue(request.worker_id))

    @translate_errors
    def ReportMetrics(self, request: ps.ReportMetricsRequest, context) -> ps.ReportMetricsResponse:
        state = self.core.report(
            request.worker_id, request.job_id, _PHASES.get(request.phase, "UNSPECIFIED"),
            request.step, request.total_steps, request.loss, request.samples, request.seconds,
            dict(request.metrics), request.error,
        )
        return ps.ReportMetricsResponse(job_state=messages.state_to_proto(state))

    @translate_errors
    def OpenPartition(self, request: ps.OpenPartitionRequest, context) -> ps.OpenPartitionResponse:
        self.core.open_partition(request.job_id, messages.spec_from_proto(request.spec),
                                 list(request.worker_names))
        return ps.OpenPartitionResponse()

    @translate_errors
    def ClosePartition(self, request: ps.ClosePartitionRequest, context) -> ps.ClosePartitionResponse:
        state = messages.state_from_proto(request.state)
        if state is None:
            raise InvalidArgument("ClosePartition needs a job state")
        self.core.close_partition(request.job_id, request.worker_id, state)
        return ps.ClosePartitionResponse()

    @translate_errors
    def ListRestorePoints(self, request: ps.ListRestorePointsRequest, context) -> ps.ListRestorePointsResponse:
        at = self.core.restore_points(request.job_id, request.worker_id)
        return ps.ListRestorePointsResponse(
            step=at.step, lineage=at.lineage, timeline=at.timeline, clock=at.clock,
            points=[ps.RestorePoint(step=step, lineage=lineage) for step, lineage in at.points])

    @translate_errors
    def PullRows(self, request: ps.PullRowsRequest, context) -> ps.PullRowsResponse:
        ids = sparse.ids_from_bytes(request.ids, request.table)
        rows, version = self.core.pull_rows(request.job_id, request.worker_id, request.table, ids)
        return ps.PullRowsResponse(rows=sparse.rows_to_bytes(rows), version=version)

    @translate_errors
    def PushRows(self, request: ps.PushRowsRequest, context) -> ps.PushRowsResponse:
        rows = {}
        for t in request.tables:
            if t.table in rows:
                raise InvalidArgument(f"table {quote(t.table)} named twice in one PushRows")
            spec = self.core.table_spec(request.job_id, t.table)
            ids = sparse.ids_from_bytes(t.ids, spec.name)
            rows[t.table] = (ids, sparse.rows_from_bytes(t.grads, ids.numel(), spec))
        self.core.push_rows(request.job_id, request.worker_id, request.seq, rows, request.part, request.parts or 1)
        return ps.PushRowsResponse()

    @translate_errors
    def RollBack(self, request: ps.RollBackRequest, context) -> ps.RollBackResponse:
        step, moved = self.core.roll_back(request.job_id, request.worker_id, request.step, request.lineage,
                                          request.expect_timeline)
        return ps.RollBackResponse(step=step, rolled_back=moved)


class JobServiceService:
    """psgrid.v1.JobService over a :class:`ParameterServerCore`."""

    def __init__(self, core: ParameterServerCore):
        self.core = core

    @translate_errors
    def SubmitJob(self, request: js.SubmitJobRequest, context) -> js.SubmitJobResponse:
        info = self.core.submit(messages.spec_from_proto(request.spec))
        return js.SubmitJobResponse(job=messages.info_to_proto(info))

    @translate_errors
    def GetJob(self, request: js.GetJobRequest, context) -> js.GetJobResponse:
        return js.GetJobResponse(job=messages.info_to_proto(self.core.get(request.job_id)))

    @translate_errors
    def WatchJob(self, request: js.WatchJobRequest, context):
        for event in self.core.watch(request.job_id, request.from_seq, context.is_active):
            yield messages.event_to_proto(event)

    @translate_errors
    def CancelJob(self, request: js.CancelJobRequest, context) -> js.CancelJobResponse:
        return js.CancelJobResponse(job=messages.info_to_proto(self.core.cancel(request.job_id)))

    @translate_errors
    def ListJobs(self, request: js.ListJobsRequest, context) -> js.ListJobsResponse:
        return js.ListJobsResponse(jobs=[messages.info_to_proto(i) for i in self.core.list_jobs()])

    @translate_errors
    def GetJobHistory(self, request: js.GetJobHistoryRequest, context) -> js.GetJobHistoryResponse:
        rows = self.core.history(request.job_id)
        return js.GetJobHistoryResponse(rows=[messages.history_to_proto(r) for r in rows])

    @translate_errors
    def ListWorkers(self, request: js.ListWorkersRequest, context) -> js.ListWorkersResponse:
        return js.ListWorkersResponse(workers=[messages.worker_to_proto(w) for w in self.core.list_workers()])

    @translate_errors
    def FetchParameters(self, request: js.FetchParametersRequest, context) -> Iterator[bytes]:
        yield from pull_frames(self.core.fetch(request.job_id))

    @translate_errors
    def LookupRows(self, request: js.LookupRowsRequest, context) -> js.LookupRowsResponse:
        ids = sparse.ids_from_bytes(request.ids, request.table)
        spec, rows = self.core.lookup_rows(request.job_id, request.table, ids)
        return js.LookupRowsResponse(rows=sparse.rows_to_bytes(rows), dim=spec.dim,
                                     spec=messages.table_to_proto(spec))


def handlers(core: ParameterServerCore,
             listener: Callable[[ParameterServerService], channel.Listener] | None = None
             ) -> list[grpc.GenericRpcHandler]:
    """The generic handlers for both services, ready for ``server.add_generic_rpc_handlers``;
    ``listener`` makes the direct step channel's listener (psgrid.channel) around the service."""
    p, j = ParameterServerService(core), JobServiceService(core)
    if listener is not None:
        p.listener = listener(p)
    return [
        grpc.method_handlers_generic_handler("psgrid.v1.ParameterServer", {
            "RegisterWorker": unary_handler(p.RegisterWorker, ps.RegisterWorkerRequest, ps.RegisterWorkerResponse),
            "Heartbeat": unary_handler(p.Heartbeat, ps.HeartbeatRequest, ps.HeartbeatResponse),
            "Pull": unary_stream_handler(p.Pull, ps.PullRequest),
            "Push": stream_handler(p.Push, False, ps.PushResponse.SerializeToString),
            "Step": stream_handler(p.Step, True),
            "ReportMetrics": unary_handler(p.ReportMetrics, ps.ReportMetricsRequest, ps.ReportMetricsResponse),
            "OpenPartition": unary_handler(p.OpenPartition, ps.OpenPartitionRequest, ps.OpenPartitionResponse),
            "ClosePartition": unary_handler(p.ClosePartition, ps.ClosePartitionRequest, ps.ClosePartitionResponse),
            "ListRestorePoints": unary_handler(p.ListRestorePoints, ps.ListRestorePointsRequest,
                                               ps.ListRestorePointsResponse),
            "RollBack": unary_handler(p.RollBack, ps.RollBackRequest, ps.RollBackResponse),
            "PullRows": unary_handler(p.PullRows, ps.PullRowsRequest, ps.PullRowsResponse),
            "PushRows": unary_handler(p.PushRows, ps.PushRowsRequest, ps.PushRowsResponse),
        }),
        grpc.method_handlers_generic_handler("psgrid.v1.JobService", {
            "SubmitJob": unary_handler(j.SubmitJob, js.SubmitJobRequest, js.SubmitJobResponse),
            "GetJob": unary_handler(j.GetJob, js.GetJobRequest, js.GetJobResponse),
            "WatchJob": unary_stream_handler(j.WatchJob, js.WatchJobRequest, lambda m: m.SerializeToString()),
            "CancelJob": unary_handler(j.CancelJob, js.CancelJobRequest, js.CancelJobResponse),
            "ListJobs": unary_handler(j.ListJobs, js.ListJobsRequest, js.ListJobsResponse),
            "GetJobHistory": unary_handler(j.GetJobHistory, js.GetJobHistoryRequest, js.GetJobHistoryResponse),
            "ListWorkers": unary_handler(j.ListWorkers, js.ListWorkersRequest, js.ListWorkersResponse),
            "FetchParameters": unary_stream_handler(j.FetchParameters, js.FetchParametersRequest),
            "LookupRows": unary_handler(j.LookupRows, js.LookupRowsRequest, js.LookupRowsResponse),
        }),
    ]
