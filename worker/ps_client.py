"""The worker's side of the ParameterServer service: the only gRPC in the worker."""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import pathlib
import queue
import threading
import time
from collections.abc import Callable, Iterable

import grpc
import torch

from psgrid import channel, codec, messages, rpc, shm, sparse, stepframes
from psgrid.backoff import Backoff
from psgrid.codec import Layout, Pulled
from psgrid.diagnose import REMIND_EVERY_S, Reminder
from psgrid.errors import DeadlineExceeded, NotFound, NotReady, PsgridError, Stopping, Unavailable
from psgrid.guard import Watchdog
from psgrid.security import Security
from psgrid.sparse import TableSpec
from psgrid.spec import Assignment, Encoding, JobSpec, JobState, RestorePoints
from psgrid.v1 import parameter_server_pb2 as ps

logger = logging.getLogger(__name__)

_PHASE = {name.removeprefix("WORKER_PHASE_"): v for name, v in ps.WorkerPhase.items()}

#: Longest one training pull waits on the server before asking again: the server
#: frees its handler, and a worker whose calls were not cancelled still stops soon.
PULL_SLICE_S = 2.0
#: Cancels step streams whose answer is late: one thread for every client of the process.
_WATCHDOG = Watchdog()
#: Step streams one client keeps open (one per worker id it pulls or pushes for).
MAX_STREAMS = 8
#: Longest the server may take to answer a request for a direct step channel.
CHANNEL_SETUP_S = 10.0
#: Longest a connection to a direct step channel may take, ticket taken: on a LAN,
#: milliseconds; a port a firewall drops is given up after this, once per client (its
#: streams stay on gRPC).
CHANNEL_CONNECT_S = 3.0
#: Longest a send or read on a direct channel may block (a server host gone without a
#: word); answers have their own deadlines (the watchdog), all shorter.
CHANNEL_IO_S = 180.0


class StepStream:
    """One worker's step stream to one server (:mod:`psgrid.stepframes`): requests
    go out in order, answers come back in order. Opened on first use and again
    after it broke. Callers hold ``lock`` around every use.

    While ``channel_host()`` names a host, each time it opens it asks the server
    for a direct channel (:mod:`psgrid.channel`) there and goes on on it; when the
    server offers none it stays on gRPC (``say`` tells why), and when the channel
    cannot be reached too (``unreachable`` tells why).
    """

    def __init__(self, method: Callable, watchdog: Watchdog, worker_id: str = "",
                 channel_host: Callable[[], str | None] = lambda: None,
                 say: Callable[[str], None] | None = None, unreachable: Callable[[str], None] | None = None):
        self._method = method
        self._watchdog = watchdog
        self.worker_id = worker_id
        self._channel_host = channel_host
        self._say = say or logger.info
        self._unreachable = unreachable or self._say
        self.lock = threading.Lock()
        #: The gRPC call, or the direct channel (psgrid.channel.Connection: then ``_out`` is None).
        self._call = None
        self._out: queue.SimpleQueue | None = None
        self._retired = None  # the gRPC call a direct channel replaced
        #: The key of a pull sent ahead (with a push) whose answer is not read yet.
        self.prefetched: tuple | None = None
        #: Shared memory (psgrid.shm): the push and pull segments, for ``shm_job``.
        self.shm: tuple[shm.Segment, shm.Segment] | None = None
        self.shm_job = ""
        #: ``shm_job``'s parameters as the server keeps them (psgrid.shm.SharedStore), if offered.
        self.store: shm.SharedStore | None = None
        #: The last read of them was torn by a write: the next pull asks for a copy.
        self.torn = False

    @property
    def ended(self) -> bool:
        """Whether the stream ended while idle (a server restart, say)."""
        return self._call is not None and self._call.done()

    def check(self) -> None:
        """Forget a stream that ended while idle: the next send opens another."""
        if self.ended:
            self.reset()

    @property
    def on_channel(self) -> bool:
        return isinstance(self._call, channel.Connection)

    def send(self, frames: Iterable[bytes]) -> None:
        if self._call is not None and not self.on_channel and self._out is None:
            self.reset()  # half torn down by a reset from another thread (stopping): start afresh
        if self._call is None:
            self._open()
        if self.on_channel:
            try:
                self._call.send(frames)  # the direct channel: on the socket, from this thread
            except channel.ChannelBroken:
                self.reset()
                raise
            return
        for frame in frames:
            self._out.put(frame)

    def _open(self) -> None:
        self._open_grpc()
        host = self._channel_host()
        if host is not None and self.worker_id:
            self._enter_channel(host, CHANNEL_SETUP_S)

    def _open_grpc(self) -> None:
        out = queue.SimpleQueue()

        def requests():
            while (frame := out.get()) is not None:
                yield frame
        self._out = out
        self._call = self._method(requests())

    def _enter_channel(self, host: str, timeout: float) -> None:
        """Ask for a direct channel on the gRPC stream just opened and move there; stay on
        gRPC when the server offers none or it cannot be reached."""
        self._out.put(stepframes.channel_open(self.worker_id))
        try:
            offer = self.answer(None, timeout)  # a broken stream raises: the caller's retry opens another
        except PsgridError as exc:
            self._say(f"no direct step channel, staying on gRPC: {exc}")
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # A server from before the channel ends the stream at the frame it does not know.
            self._unreachable(f"the server does not know the direct step channel (an older psgrid?), "
                              f"staying on gRPC: {exc.details()}")
            self._open_grpc()
            return
        try:
            connection = channel.connect(host, offer.port, offer.ticket, CHANNEL_CONNECT_S, CHANNEL_IO_S)
        except TimeoutError as exc:  # dropped on the way: a firewall, most likely, and it will stay
            self._unreachable(f"the direct step channel at {host}:{offer.port} cannot be reached, "
                              f"staying on gRPC: {exc or 'timed out'}")
            return
        except OSError as exc:
            self._say(f"the direct step channel at {host}:{offer.port} did not take this stream, "
                      f"staying on gRPC: {exc}")
            return
        # The gRPC stream ends with a half-close (the server's handler returns); the call is
        # kept until then, as dropping it would cancel it.
        self._retired, out = self._call, self._out
        self._call, self._out = connection, None
        out.put(None)
        logger.debug("step stream of %s on a direct channel to %s:%d", self.worker_id, host, offer.port)

    def answer(self, buffer_for: Callable[[int], torch.Tensor] | None, timeout: float):
        """The answer to the oldest request not answered yet (its error raised).

        A broken stream raises grpc.RpcError (DEADLINE_EXCEEDED after ``timeout``) and
        is dropped, to be opened again by the next send.
        """
        call = self._call
        alarm = self._watchdog.arm(call, timeout, "the answer on a step stream")
        try:
            reply = stepframes.read_reply(call, buffer_for, shm=self.shm[1].data if self.shm else None,
                                          store=self.store)
        except grpc.RpcError:
            self.reset()
            if alarm.fired:
                raise DeadlineExceeded(f"no answer on the step stream within {timeout:.0f}s") from None
            raise
        except BaseException:
            self.reset()  # out of step with the server: start afresh
            raise
        finally:
            alarm.disarm()
        if isinstance(reply, PsgridError):  # that request failed; the stream goes on
            raise reply
        if isinstance(reply, Pulled) and reply.intact is not None:
            return dataclasses.replace(reply, intact=functools.partial(self._intact, reply.intact))
        return reply

    def _intact(self, check: Callable[[], bool]) -> bool:
        ok = check()
        self.torn = self.torn or not ok
        return ok

    def pull_frame(self, job_id: str, worker_id: str, clock: int, final: bool, max_wait_s: float) -> bytes:
        """A pull request on this stream (in shared memory when it has it; a copy after a torn read)."""
        frame = stepframes.pull_request(job_id, worker_id, clock, final, max_wait_s,
                                        shm=self.shm is not None and self.shm_job == job_id, copy=self.torn)
        self.torn = False
        return frame

    def open_shm(self, job_id: str, worker_id: str, timeout: float) -> None:
        """Ask for the shared-memory path; on any failure say why once and stay on the stream."""
        self.shm_job = job_id
        self.send([stepframes.shm_open(job_id, worker_id)])
        try:
            offer = self.answer(None, timeout)
        except PsgridError as exc:
            logger.info("job %s: no shared memory with the server, using the stream: %s", job_id, exc)
            return
        try:
            segments = (shm.Segment.attach(offer.push_path, offer.nbytes, offer.push_nonce),
                        shm.Segment.attach(offer.pull_path, offer.nbytes, offer.pull_nonce))
            store = shm.SharedStore.attach(offer.store_path, offer.nbytes, offer.store_nonce) \
                if offer.store_path else None
        except shm.Unavailable as exc:
            logger.info("job %s: no shared memory with the server, using the stream: %s", job_id, exc)
            self.send([stepframes.shm_open(job_id, worker_id, decline=True)])  # the server drops them
            try:
                self.answer(None, timeout)
            except PsgridError:
                pass  # the expected answer: declined
            return
        for path in [s.path for s in segments] + ([pathlib.Path(offer.store_path)] if store else []):
            path.unlink(missing_ok=True)  # mapped by both sides now: nothing is left behind, however they end
        self.shm, self.store = segments, store
        logger.info("job %s: tensors move through shared memory (%d bytes each way%s)", job_id, offer.nbytes,
                    "; the weights read where the server keeps them" if store else "")

    def reset(self) -> None:
        """End the stream (the server's handler ends too); the next send opens another."""
        self.prefetched = None
        self.shm, self.shm_job, self.store = None, "", None  # the server unlinks them with the stream; the mappings go with us
        call, out, self._call, self._out = self._call, self._out, None, None
        self._retired = None
        if call is None:
            return
        if isinstance(call, channel.Connection):  # the direct channel: this thread owns it
            call.close()
            return
        call.cancel()
        if out is not None:  # (None: a reset from another thread came between the two)
            out.put(None)


def _host_of(address: str) -> str | None:
    """The host a gRPC target names ("host:port", "[v6]:port", "dns:///host:port"); None
    for one that names no TCP host (a Unix socket)."""
    if address.startswith("unix:"):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(scheme):
            address = address[len(scheme):]
            break
    return address.rsplit(":", 1)[0].strip("[]") or None


class ParameterServerClient(rpc.ServiceClient):
    """Calls a parameter server; every call has a deadline and retries UNAVAILABLE.

    Once ``stop`` is set, every call raises Stopping instead of trying or
    retrying (see :func:`psgrid.rpc.call`); closing the client cancels the calls
    in flight.
    """

    service = "psgrid.v1.ParameterServer"

    def __init__(self, address: str, timeout_s: float = 30.0, retry_for_s: float = 60.0,
                 security: Security | None = None, stop: threading.Event | None = None,
                 shared_memory: bool = True, wait_for_server: bool = False, direct_channel: bool = True):
        super().__init__(address, timeout_s, retry_for_s, security)
        self.stop = stop or threading.Event()
        #: A worker process's own server: registration waits for it however long it
        #: takes (it may start after the worker, or be restarting), and says what it
        #: waits for, with the likely cause and fix, at once and every ``remind_every_s``.
        self.wait_for_server = wait_for_server
        self.remind_every_s = REMIND_EVERY_S
        #: Try the shared-memory path of the step stream: only when the server's address is
        #: one of this host's (the nonce check in psgrid.shm then confirms it).
        self.shared_memory = shared_memory and shm.is_local(address)
        #: Ask for direct step channels (psgrid.channel) on the server's host; never under TLS.
        self.channel_host = _host_of(address) if direct_channel and not self.security.tls else None
        self._channel_said = False
        unary = self._unary
        self._register = unary("RegisterWorker", ps.RegisterWorkerRequest, ps.RegisterWorkerResponse)
        self._heartbeat = unary("Heartbeat", ps.HeartbeatRequest, ps.HeartbeatResponse)
        self._report = unary("ReportMetrics", ps.ReportMetricsRequest, ps.ReportMetricsResponse)
        self._open = unary("OpenPartition", ps.OpenPartitionRequest, ps.OpenPartitionResponse)
        self._close = unary("ClosePartition", ps.ClosePartitionRequest, ps.ClosePartitionResponse)
        self._points = unary("ListRestorePoints", ps.ListRestorePointsRequest, ps.ListRestorePointsResponse)
        self._roll_back = unary("RollBack", ps.RollBackRequest, ps.RollBackResponse)
        self._pull_rows = unary("PullRows", ps.PullRowsRequest, ps.PullRowsResponse)
        self._push_rows = unary("PushRows", ps.PushRowsRequest, ps.PushRowsResponse)
        self._pull = self.channel.unary_stream(
            self._method("Pull"), request_serializer=ps.PullRequest.SerializeToString,
            response_deserializer=rpc.identity)
        self._push = self.channel.stream_unary(
            self._method("Push"), request_serializer=rpc.identity,
            response_deserializer=ps.PushResponse.FromString)
        self._step = self.channel.stream_stream(
            self._method("Step"), request_serializer=rpc.identity, response_deserializer=rpc.identity)
        self._streams: collections.OrderedDict[str, StepStream] = collections.OrderedDict()
        self._streams_lock = threading.Lock()
        self._watchdog = _WATCHDOG

    def stream(self, worker_id: str) -> StepStream:
        """The step stream of ``worker_id`` (the least recently used one is closed past MAX_STREAMS)."""
        with self._streams_lock:
            stream = self._streams.get(worker_id)
            if stream is None:
                stream = self._streams[worker_id] = StepStream(
                    self._step, self._watchdog, worker_id, lambda: self.channel_host, self._say_channel,
                    self._channel_unreachable)
                while len(self._streams) > MAX_STREAMS:
                    self._streams.popitem(last=False)[1].reset()
            self._streams.move_to_end(worker_id)
            return stream

    def _say_channel(self, message: str) -> None:
        """Why a stream stays on gRPC: once at INFO, then at DEBUG."""
        (logger.debug if self._channel_said else logger.info)("%s: %s", self.address, message)
        self._channel_said = True

    def _channel_unreachable(self, message: str) -> None:
        """A channel's port cannot be reached from here: no stream of this client asks again."""
        self.channel_host = None
        self._say_channel(message)

    def close_streams(self) -> None:
        """End every step stream (a job ended: the server frees their handlers)."""
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), collections.OrderedDict()
        for stream in streams:
            with stream.lock:
                stream.reset()

    def close(self) -> None:
        for stream in list(self._streams.values()):
            stream.reset()
        super().close()

    def _call(self, fn, request, **kw):
        return rpc.call(fn, request, timeout=kw.pop("timeout", self.timeout_s),
                        retry_for=kw.pop("retry_for", self.retry_for_s), stop=self.stop, **kw)

    def register(self, name: str, host: str, pid: int, device: str) -> tuple[str, float]:
        """(worker id, heartbeat interval). Retries UNAVAILABLE for ``retry_for_s``, or,
        with ``wait_for_server``, until the server answers or stopping (Stopping)."""
        request = ps.RegisterWorkerRequest(name=name, host=host, pid=pid, device=device)
        if not self.wait_for_server:
            reply = self._call(self._register, request)
            return reply.worker_id, reply.heartbeat_interval_s
        reminder, backoff = Reminder(self.remind_every_s), Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                reply = self._call(self._register, request, retry_for=0.0)
                return reply.worker_id, reply.heartbeat_interval_s
            except (Unavailable, DeadlineExceeded) as exc:
                if reminder.due(time.monotonic()):
                    logger.warning("[worker %s] waiting for the parameter server at %s: %s", name, self.address,
                                   self.connection_problem() or exc)
                delay = backoff.next_delay()
                logger.debug("retrying RegisterWorker after %s in %.2fs", type(exc).__name__, delay)
            if self.stop.wait(delay):
                raise Stopping("stopping: registration given up")

    def heartbeat(self, worker_id: str, job_id: str,
                  wait_s: float = 0.0) -> tuple[Assignment | None, JobState | None]:
        """Liveness; an idle worker (``job_id`` "") may let the server hold the reply up to
        ``wait_s`` until a job is assigned to it."""
        reply = self._call(self._heartbeat, ps.HeartbeatRequest(worker_id=worker_id, job_id=job_id, wait_s=wait_s),
                           timeout=10.0 + wait_s, retry_for=0.0)
        assignment = None
        if reply.HasField("assignment"):
            a = reply.assignment
            assignment = Assignment(a.job_id, a.rank, a.world_size, messages.spec_from_proto(a.spec),
                                    a.start_step, tuple(a.shards), tuple(a.worker_names))
        return assignment, messages.state_from_proto(reply.job_state)

    def push_segment(self, job_id: str, worker_id: str) -> torch.Tensor | None:
        """The push segment of the worker's step stream in shared memory (psgrid.shm) for
        ``job_id``, if it has one now: a gradient written there is pushed without a copy.
        The server reads it only while it answers a push, so the worker writes the next
        one once the push was answered."""
        stream = self.stream(worker_id)
        return stream.shm[0].data if stream.shm is not None and stream.shm_job == job_id else None

    def pull(self, job_id: str, worker_id: str, clock: int, final: bool,
             buffer_for: Callable[[int], torch.Tensor], wait_s: float | None = None) -> Pulled:
        """Weights for step ``clock``; waits until they may be had, or until stopping (Stopping).

        On the worker's step stream. The server is asked to wait at most
        PULL_SLICE_S at a time, and asked again when a wait ends (an unreachable
        server is retried). With ``wait_s``, it waits at most about that long and
        NotReady is raised after, and an unreachable server is retried for about as
        long before Unavailable is raised: the caller looks around and asks again.
        A pull sent ahead with the last push (``push(..., then_pull_s=)``) is
        answered first.
        """
        stream = self.stream(worker_id)
        slice_s = PULL_SLICE_S if wait_s is None else wait_s

        def once(_, timeout):
            with stream.lock:
                stream.check()
                if stream.prefetched == (job_id, final):
                    stream.prefetched = None
                else:
                    if stream.prefetched:  # an answer nobody will read: start afresh
                        stream.reset()
                    stream.send([stream.pull_frame(job_id, worker_id, clock, final, slice_s)])
                pulled = stream.answer(buffer_for, timeout)
                if self.shared_memory and stream.shm_job != job_id and pulled.layout is not None:
                    stream.open_shm(job_id, worker_id, self.timeout_s)
                return pulled

        if wait_s is not None:
            return self._call(once, None, timeout=wait_s + self.timeout_s + 60.0, retry_for=wait_s)
        while True:
            try:
                return self._call(once, None, timeout=PULL_SLICE_S + self.timeout_s + 60.0, retry_for=1e9,
                                  retry_codes={grpc.StatusCode.UNAVAILABLE})
            except NotReady:  # the server waited a whole slice: ask again (it held the call, no back-off)
                continue

    def push(self, header: ps.PushHeader, payload: torch.Tensor, then_pull_s: float | None = None) -> tuple[int, bool]:
        """Send a gradient (or initial parameters) on the worker's step stream; a retry
        is deduplicated by the server.

        ``then_pull_s``: also ask for the next step's weights right behind it (the
        server waits at most that long for them); the next :meth:`pull` reads the
        answer, so a step costs one exchange.
        """
        stream = self.stream(header.worker_id)
        nbytes = header.payload_bytes or header.tensors.total_bytes

        def once(frames_header, timeout):
            with stream.lock:
                stream.check()
                if stream.prefetched:
                    stream.reset()
                segments = stream.shm if stream.shm_job == header.job_id else None
                if segments is not None and nbytes <= segments[0].data.numel():
                    if payload.data_ptr() != segments[0].data.data_ptr():  # else computed in place
                        segments[0].data[:nbytes].copy_(payload[:nbytes])
                    frames_header = ps.PushHeader()
                    frames_header.CopyFrom(header)
                    frames_header.shm = True
                    frames = [codec.header_frame(frames_header.SerializeToString(), None)]
                else:
                    frames = list(codec.encode_push(frames_header, payload, pieces=stream.on_channel))
                if then_pull_s is not None:  # in the same send: one wake-up of the server, not two
                    frames.append(stream.pull_frame(header.job_id, header.worker_id, header.seq + 1, False,
                                                    then_pull_s))
                stream.send(frames)
                if then_pull_s is not None:
                    stream.prefetched = (header.job_id, False)
                return stream.answer(None, timeout)

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

    def pull_rows(self, job_id: str, worker_id: str, table: TableSpec, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` (int64, held by this server) of ``table``: float32 [len(ids), dim],
        asked for sparse.ROWS_BYTES of rows at a time."""
        per_call = max(1, sparse.ROWS_BYTES // table.row_bytes)
        out = []
        for start in range(0, max(1, ids.numel()), per_call):
            some = ids[start:start + per_call]
            reply = self._call(self._pull_rows, ps.PullRowsRequest(
                job_id=job_id, worker_id=worker_id, table=table.name, ids=sparse.ids_to_bytes(some)))
            out.append(sparse.rows_from_bytes(reply.rows, some.numel(), table))
        return out[0] if len(out) == 1 else torch.cat(out)

    def push_rows(self, job_id: str, worker_id: str, seq: int,
                  rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Stage row gradients ({table: (unique ids, rows)}) for this worker's push of ``seq``,
        in parts of at most sparse.ROWS_BYTES each."""
        parts = sparse.split_rows(rows, sparse.ROWS_BYTES)
        for index, part in enumerate(parts):
            self._call(self._push_rows, ps.PushRowsRequest(
                job_id=job_id, worker_id=worker_id, seq=seq, part=index, parts=len(parts),
                tables=[ps.TableRows(table=name, ids=sparse.ids_to_bytes(ids), grads=sparse.rows_to_bytes(grads))
                        for name, (ids, grads) in part.items()]))

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
                layout: Layout, init: bool = False, ranks: tuple[int, ...] = (),
                encoding: Encoding | None = None, payload_bytes: int = 0,
                tables: Iterable[TableSpec] = (), row_tables: int = 0) -> ps.PushHeader:
    """The header of a push: a gradient for step ``seq`` on ``ranks``' data (empty: the worker's own),
    its payload ``payload_bytes`` long when ``encoding`` (the job's compression) encodes it.
    ``tables``: an init push's embedding tables; ``row_tables``: the tables whose row
    gradients were staged for this push (PushRows)."""
    header = ps.PushHeader(
        job_id=job_id, worker_id=worker_id, seq=seq, base_version=base_version,
        base_step=base_step, init=init, tensors=codec.layout_to_proto(layout), ranks=ranks,
        tables=[messages.table_to_proto(t) for t in tables], row_tables=row_tables,
    )
    if encoding is not None and encoding.lossy:
        codec.encoding_to_proto(encoding, header)
        header.payload_bytes = payload_bytes
    return header


__all__ = ["Assignment", "ParameterServerClient", "push_header", "NotFound"]
