"""The step path: what a worker calls every step (pull, push, report).

:class:`StepPath` hands a worker the weights once it may compute a step,
receives, validates and applies its gradients, and records its progress,
ending the job when the last report says so. :class:`PushHeader` and
:class:`PullResult` are what a push brings and a pull streams.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

import torch

from psgrid.codec import Layout, PayloadAssembler
from psgrid.compression import PULL_DTYPES, cast_layout, decode, wire_layout
from psgrid.device import use_threads
from psgrid.errors import InvalidArgument, MalformedPayload, NotReady, PsgridError, PushAhead
from psgrid.limits import check_count, check_rows_reply, quote
from psgrid.server.jobs import Job
from psgrid.server.scheduler import Scheduler
from psgrid.server.state import ServerState
from psgrid.server.store import check_finite
from psgrid.shm import SharedStore
from psgrid.spec import Encoding, JobState
from psgrid.server.tables import MAX_PARTS, Rows, StagedRows
from psgrid.sparse import TableSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PushHeader:
    """What a push says about the gradient (or initial weights) that follows it."""

    job_id: str
    worker_id: str
    seq: int
    base_version: int
    base_step: int
    init: bool
    layout: Layout
    #: Examples the gradient averages over (BSP weight); 0: not given, counts as 1.
    samples: int = 1
    #: The ranks whose data it was computed on; empty: the worker's own.
    ranks: tuple[int, ...] = ()
    #: How the payload is encoded (the job's compression; initial weights never are).
    encoding: Encoding = Encoding()
    #: Bytes of the payload as sent; 0: ``layout.total_bytes``.
    payload_bytes: int = 0
    #: With ``init``: the job's embedding tables by name.
    tables: tuple[TableSpec, ...] = ()
    #: A gradient: how many tables' row gradients the worker staged for this seq (PushRows).
    row_tables: int = 0

    def __post_init__(self) -> None:
        for field in ("seq", "base_version", "base_step", "samples", "payload_bytes", "row_tables"):
            check_count(getattr(self, field), field)

    @property
    def wire_bytes(self) -> int:
        """Bytes of the payload as it travels."""
        return self.payload_bytes or self.layout.total_bytes


@dataclasses.dataclass(frozen=True)
class PullResult:
    """What a pull streams: the payload is None when the job is over."""

    state: JobState
    version: int
    step: int
    layout: Layout | None
    payload: torch.Tensor | None
    #: The step the server expects this worker to compute next.
    clock: int = 0
    #: The data shards (ranks) the worker computes this step on.
    ranks: tuple[int, ...] = ()
    #: BSP: digest of who contributed to each round so far (see Job.lineage).
    lineage: str = ""
    #: The payload is the job's parameters in shared memory (psgrid.shm.SharedStore), at
    #: write sequence number ``seq``: a worker that mapped them reads them there.
    shared: SharedStore | None = None
    seq: int = 0


def in_place(job: Job, final: bool) -> bool:
    """Whether a worker on this host may read the job's parameters in shared memory where
    they are (psgrid.shm.SharedStore) rather than get a copy. A BSP job's do not change
    until the worker pushes again (but for a round applied without it, dropped from the
    barrier), nor any job's while it is evaluated; others' do, and the worker checks its
    copy out was not torn, so only a job whose workers read them once per pull: not local
    SGD's, which reads them again at the end of its round."""
    return job.spec.pull_dtype == "full" and (job.spec.synchronous or final or job.spec.sync_every == 1)


class StepPath:
    """Pull, push and report for the workers of every job."""

    def __init__(self, state: ServerState, scheduler: Scheduler):
        self.state = state
        self.scheduler = scheduler

    def pull(self, job_id: str, worker_id: str, clock: int, final: bool, timeout_s: float,
             into: torch.Tensor | None = None, mapped: SharedStore | None = None) -> PullResult:
        """Wait until the worker may compute step ``clock``, then hand it the weights.

        ``into``: where a copy of the weights goes when one is needed (asynchronous
        jobs: they change while the reply is sent): the worker's shared-memory
        segment, so that the copy is the transfer. The result's payload is then it.
        ``mapped``: the job's parameters in shared memory as the worker maps them
        (psgrid.shm.SharedStore): it then reads them in place, no copy at all (the
        result's ``shared``), and checks no write tore what it copied out."""
        job, worker = self.state.member(job_id, worker_id)
        worker.last_seen = self.state.clock()
        self.state.mark_back(worker)
        use_threads(job.threads)  # for the copies here and the caller's
        with job.cond:
            if not job.cond.wait_for(lambda: job.ready_for(worker_id, clock, final), timeout_s):
                raise NotReady(f"step {clock} of {worker_id} is not ready yet")
            step = job.steps.global_step
            clock = job.steps.clocks[worker_id]  # the truth: ahead after a rejoin, behind after a restore
            if job.state.terminal or (final and (job.state is not JobState.EVALUATING
                                                 or worker_id != job.evaluator)):
                # Over, evaluated by another worker, or (final while RUNNING) this
                # worker has steps to compute again: no weights in this reply.
                return PullResult(job.state, job.store.version if job.store else 0, step, None, None, clock)
            store, layout = job.store, job.store.layout
            shared, seq = None, 0
            if job.spec.pull_dtype != "full" and not final:
                # Training pulls in 16 bits, converted under the lock (a consistent copy); the
                # evaluator's final pull and every fetch get the full-precision master copy.
                layout = cast_layout(store.layout, PULL_DTYPES[job.spec.pull_dtype])
                payload = job.pull_buffer(worker_id, layout.total_bytes)
                views = layout.views(payload)
                for name, value in store.params.items():
                    views[name].copy_(value)
            elif mapped is not None and store.shared is mapped and in_place(job, final):
                payload, shared, seq = store.flat, mapped, mapped.seq
            elif job.spec.synchronous or final:
                # Nothing writes the parameters until this worker pushes again.
                payload = store.flat
            else:
                if into is not None and into.numel() == store.layout.total_bytes:
                    payload = store.snapshot_into(into)
                else:
                    payload = job.snapshots[worker_id] = store.snapshot_into(job.snapshots.get(worker_id))
            self.state.metrics.pulls.labels(job_id).inc()
            self.state.metrics.bytes_out.inc(layout.total_bytes)
            if not final:
                job.traffic.pulls += 1
                job.traffic.bytes_pulled += layout.total_bytes
            return PullResult(job.state, store.version, step, layout, payload, clock,
                              tuple(job.coverage(worker_id)), job.lineage, shared, seq)

    def push(self, header: PushHeader, payload: Iterable[memoryview] | torch.Tensor,
             cancel: Callable[[], object] | None = None) -> tuple[int, bool]:
        """Receive, validate and apply one push; return (version, duplicate).

        ``payload``: the pieces as they arrive, or a uint8 tensor the payload already
        sits in (a shared-memory segment). Either is copied into the server's own
        buffer before it is checked: the sender must not be able to change a
        gradient between its check and its application.

        Nothing changes unless the whole payload arrived and passed every check.
        ``cancel`` ends this push's receipt (the call's ``context.cancel``): a
        later push of the same worker calls it, so that a stalled push (the
        worker's own, abandoned after a timeout, or anyone's with its id) never
        holds the worker's pushes up.
        """
        metrics = self.state.metrics
        try:
            version, duplicate = self._push(header, payload, cancel)
        except PsgridError as exc:
            metrics.rejected.labels(type(exc).__name__).inc()
            raise
        metrics.bytes_in.inc(header.wire_bytes)
        if not header.init:
            (metrics.duplicates if duplicate else metrics.pushes).labels(header.job_id).inc()
        return version, duplicate

    def _push(self, header: PushHeader, payload: Iterable[memoryview] | torch.Tensor,
              cancel: Callable[[], object] | None) -> tuple[int, bool]:
        job, worker = self.state.member(header.job_id, header.worker_id)
        _check_against_spec(job, header)
        wire = wire_layout(header.layout, header.encoding)
        if header.wire_bytes != wire.total_bytes:
            raise InvalidArgument(f"payload_bytes {header.wire_bytes} is not the {wire.total_bytes} bytes of the "
                                  f"declared tensors encoded as {header.encoding}")
        # A worker dropped from the barrier rejoins before its push counts: a late
        # gradient for a round applied without it is then a duplicate, not a
        # contribution to the next round.
        worker.last_seen = self.state.clock()
        self.state.mark_back(worker)
        if header.init:
            if isinstance(payload, torch.Tensor):
                payload = [memoryview(payload.numpy())]
            return self._push_init(job, header, payload)
        use_threads(job.threads)
        with job.cond:
            job.require_running()
            job.require_store().layout.check_identical(header.layout)  # before a byte is allocated
            self._check_order(job, header)
            _staged_rows(job, header)
        with job.receiving(header.worker_id, cancel) as buffer:
            # An encoded payload lands in a buffer of its own and is decoded into the staging one.
            received = job.wire_buffer(header.worker_id, wire.total_bytes) if header.encoding.lossy else buffer
            if isinstance(payload, torch.Tensor):  # in memory the sender can still write to
                if payload.numel() != wire.total_bytes:
                    raise MalformedPayload(f"{payload.numel()} bytes in memory for a payload of {wire.total_bytes}")
                received[: payload.numel()].copy_(payload)
            else:
                _receive(wire, received, payload)
            with job.cond:
                job.require_running()
                if job.steps.is_duplicate(header.worker_id, header.seq):
                    return job.store.version, True
                self._check_order(job, header)  # again: the job may have moved while the bytes came
            if header.encoding.lossy:  # InvalidArgument for scales or indices a decoder must not trust
                decode(header.layout, header.encoding, received, buffer)
            grads, flat = header.layout.lazy_views(buffer), header.layout.flat(buffer)
            grad_max = check_finite(grads, flat=flat)
            started = time.perf_counter()
            with job.cond:
                job.require_running()
                if job.steps.is_duplicate(header.worker_id, header.seq):
                    return job.store.version, True
                rows = _staged_rows(job, header)
                record = job.accept_gradient(
                    header.worker_id, header.seq, header.base_version, header.base_step, grads,
                    header.samples, grad_max, header.ranks, rows, flat,
                )
                job.pending_rows.pop(header.worker_id, None)
                job.traffic.pushes += 1
                job.traffic.bytes_pushed += header.wire_bytes
                job.traffic.dense_bytes_pushed += header.layout.total_bytes
                self.state.log_applied(job)
        self.state.metrics.apply_seconds.observe(time.perf_counter() - started)
        self.state.metrics.staleness.observe(record.staleness)
        return record.version, False

    @staticmethod
    def _check_order(job: Job, header: PushHeader) -> None:
        """PushAhead or StaleClock unless ``header`` is a duplicate or the worker's next step
        (caller holds job.cond)."""
        if job.steps.is_duplicate(header.worker_id, header.seq):
            return
        job.steps.check_push(header.worker_id, header.seq)
        if job.spec.synchronous and header.base_step != header.seq:
            raise PushAhead(f"step {header.seq} of {header.worker_id} was computed on the weights "
                            f"of step {header.base_step}; pull again")

    def _push_init(self, job: Job, header: PushHeader, payload: Iterable[memoryview]) -> tuple[int, bool]:
        # The job's layout is the declared tensors' own (dense, no padding), so the
        # buffer is what they need, not what the header claims.
        header.layout.dense().check_identical(header.layout)
        with job.cond:
            if job.store is None:
                job.require_running()
            else:  # a restarted rank 0 pushes them again, whatever the job's state: a duplicate
                job.store.layout.check_identical(header.layout)
        buffer = torch.empty(header.layout.total_bytes, dtype=torch.uint8)
        try:
            _receive(header.layout, buffer, payload)
        except BaseException:
            del buffer  # a traceback kept by whoever reports it must not keep the buffer alive
            raise
        with job.cond:
            created = job.initialize(header.layout, buffer, {t.name: t for t in header.tables})
            version = job.store.version
        if created:
            logger.info("[ps] job %s initialised: %d tensors, %d bytes",
                        job.job_id, len(header.layout.tensors), header.layout.total_bytes)
        return version, not created

    # --- embedding tables -----------------------------------------------------------------

    def pull_rows(self, job_id: str, worker_id: str, table: str, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The current rows of ``ids`` of ``table`` on this server, and the job's version."""
        job, worker = self.state.member(job_id, worker_id)
        worker.last_seen = self.state.clock()
        use_threads(job.threads)
        with job.cond:  # read-only: in any state (the evaluator reads them after training)
            t = job.require_tables().table(table)
            check_rows_reply(ids.numel(), t.spec)
            rows = t.lookup(ids, remember=job.state is JobState.RUNNING)  # its push will write them
            job.traffic.rows_pulled += ids.numel()
            self.state.metrics.rows_pulled.labels(job_id).inc(ids.numel())
            return rows, job.store.version

    def push_rows(self, job_id: str, worker_id: str, seq: int, rows: Rows, part: int = 0, parts: int = 1) -> None:
        """Stage part ``part`` of ``parts`` of ``worker_id``'s row gradients of step ``seq``
        for its push of ``seq`` (checked here: nothing is staged unless all of them fit
        their tables; rows repeated across parts are refused when the push comes)."""
        check_count(seq, "seq")
        if not 1 <= parts <= MAX_PARTS or not 0 <= part < parts:
            raise InvalidArgument(f"part {part} of {parts}: parts must be 1..{MAX_PARTS} and part < parts")
        job, worker = self.state.member(job_id, worker_id)
        worker.last_seen = self.state.clock()
        use_threads(job.threads)
        with job.cond:
            job.require_running()
            job.require_tables().check(rows)
            if job.steps.is_duplicate(worker_id, seq):
                return  # its push was counted already: a retry
            job.steps.check_push(worker_id, seq)
            staged = job.pending_rows.get(worker_id)
            if staged is None or (staged.seq, staged.parts) != (seq, parts):
                staged = job.pending_rows[worker_id] = StagedRows(seq, parts)
            staged.receive(part, rows)
            count = sum(ids.numel() for ids, _ in rows.values())
            job.traffic.rows_pushed += count
            self.state.metrics.rows_pushed.labels(job_id).inc(count)

    def report(self, worker_id: str, job_id: str, phase: str, step: int, total_steps: int,
               loss: float, samples: int, seconds: float, metrics: dict[str, float],
               error: str) -> JobState:
        """Record a worker's progress; move the job on when it finished or failed."""
        job, _ = self.state.member(job_id, worker_id)
        ended = False
        with job.cond:
            if phase == "FAILED":
                ended = job.set_state(JobState.FAILED, f"worker {worker_id}: {error}")
            elif not job.state.terminal:
                job.report(worker_id, step, total_steps, loss, samples, seconds,
                           metrics if phase == "TRAINING" else None)
                if phase == "FINISHED":
                    job.worker_finished(worker_id)
                elif phase == "EVALUATED":
                    if worker_id != job.evaluator or job.state is not JobState.EVALUATING:
                        raise InvalidArgument("only the designated evaluator reports evaluation, after training")
                    job.evaluated(metrics)
                    ended = True
            state = job.state
        if ended:
            logger.info("[ps] job %s %s", job_id, state.value)
            self.scheduler.release(job)
        return state


def _check_against_spec(job: Job, header: PushHeader) -> None:
    """A gradient averages over at most a batch of each rank its worker may cover: its
    own and, when others are gone, theirs (see Job.coverage), so batch_size x num_workers."""
    spec = job.spec
    most = spec.batch_size * spec.num_workers
    if header.samples > most:
        raise InvalidArgument(f"samples must be at most {most} (batch_size x num_workers), got {header.samples}")
    if len(header.ranks) > spec.num_workers or any(r >= spec.num_workers for r in header.ranks):
        raise InvalidArgument(f"ranks must be at most {spec.num_workers} ranks of the job's "
                              f"{spec.num_workers}, got {quote(list(header.ranks))}")
    if header.init and header.encoding.lossy:
        raise InvalidArgument(f"initial parameters are sent as they are, not encoded as {header.encoding}")
    if not header.init and header.encoding != spec.encoding:
        raise InvalidArgument(f"the push is encoded as {header.encoding}; job {job.job_id}'s pushes are "
                              f"{spec.compression} (its compression)")


def _staged_rows(job: Job, header: PushHeader) -> dict | None:
    """The row gradients ``header``'s worker staged for its push (None: the job has no
    tables); PushAhead when fewer are staged here than the push says (caller holds job.cond)."""
    if job.tables is None:
        if header.row_tables:
            raise InvalidArgument(f"job {job.job_id} has no embedding tables; row_tables must be 0")
        return None
    if header.row_tables > len(job.tables.tables):
        raise InvalidArgument(f"row_tables {header.row_tables}: job {job.job_id} has {len(job.tables.tables)} "
                              "embedding tables")
    if job.steps.is_duplicate(header.worker_id, header.seq):
        return {}  # counted already, with its rows
    staged = job.pending_rows.get(header.worker_id)
    rows = staged.merged(job.tables) if staged and staged.seq == header.seq and staged.complete else {}
    if len(rows) != header.row_tables:
        raise PushAhead(f"step {header.seq} of {header.worker_id}: its push counts the rows of "
                        f"{header.row_tables} tables, {len(rows)} are staged here (this server restarted "
                        "since?); compute the step again")
    return rows


def _receive(layout: Layout, buffer: torch.Tensor, payload: Iterable[memoryview]) -> None:
    """Copy the whole payload into ``buffer``; MalformedPayload unless its length is the layout's."""
    assembler = PayloadAssembler(layout, buffer)
    for piece in payload:
        assembler.feed(piece)
    assembler.finish()
