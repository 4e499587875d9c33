"""Job vocabulary between Python and protobuf: specs, states, info, events, history rows, workers.

The other half of the one converter (tensor sets and stream frames are in
:mod:`psgrid.codec`): every :mod:`psgrid.spec` type crosses the wire here and
nowhere else. ``*_from_proto`` raise InvalidSpec for a value out of range.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import json
import dataclasses

from psgrid.errors import InvalidArgument, InvalidSpec
from psgrid.limits import MAX_KWARGS_JSON_BYTES, quote
from psgrid.spec import HistoryRow, JobEvent, JobInfo, JobSpec, JobState, OptimizerSpec, WorkerStatus
from psgrid.v1 import job_pb2, parameter_server_pb2

if TYPE_CHECKING:
    from psgrid.sparse import TableSpec

_STATE_TO_PROTO = {s: getattr(job_pb2, f"JOB_STATE_{s.value}") for s in JobState}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def state_to_proto(state: JobState) -> int:
    return _STATE_TO_PROTO[state]


def state_from_proto(value: int) -> JobState | None:
    return _STATE_FROM_PROTO.get(value)


def _optimizer_to_proto(opt: OptimizerSpec) -> job_pb2.OptimizerSpec:
    return job_pb2.OptimizerSpec(
        name=opt.name, lr=opt.lr, momentum=opt.momentum, dampening=opt.dampening,
        nesterov=opt.nesterov, weight_decay=opt.weight_decay,
        beta1=opt.betas[0], beta2=opt.betas[1], eps=opt.eps,
    )


def _optimizer_from_proto(o: job_pb2.OptimizerSpec) -> OptimizerSpec:
    defaults = OptimizerSpec()
    return OptimizerSpec(
        name=o.name or defaults.name, lr=o.lr or defaults.lr, momentum=o.momentum,
        dampening=o.dampening, nesterov=o.nesterov, weight_decay=o.weight_decay,
        betas=(o.beta1 or defaults.betas[0], o.beta2 or defaults.betas[1]),
        eps=o.eps or defaults.eps,
    )


def spec_to_proto(spec: JobSpec) -> job_pb2.JobSpec:
    msg = job_pb2.JobSpec(
        name=spec.name, model=spec.model, model_kwargs_json=json.dumps(spec.model_kwargs),
        dataset=spec.dataset, dataset_kwargs_json=json.dumps(spec.dataset_kwargs),
        optimizer=_optimizer_to_proto(spec.optimizer),
        batch_size=spec.batch_size, epochs=spec.epochs, steps=spec.steps,
        num_workers=spec.num_workers, seed=spec.seed, device=spec.device, eval_every=spec.eval_every,
        sync_every=spec.sync_every, compression="" if spec.compression == "none" else spec.compression,
        no_error_feedback=not spec.error_feedback, pull_dtype="" if spec.pull_dtype == "full" else spec.pull_dtype,
        scale_stale=spec.scale_stale,
    )
    if spec.staleness is not None:
        msg.staleness = spec.staleness
    if spec.local_optimizer is not None:
        msg.local_optimizer.CopyFrom(_optimizer_to_proto(spec.local_optimizer))
    return msg


def _kwargs(text: str, field: str) -> dict:
    """The JSON object ``text``; InvalidSpec for anything else, before parsing when it is
    over MAX_KWARGS_JSON_BYTES (nesting too deep or a number too long to parse included)."""
    if len(text) > MAX_KWARGS_JSON_BYTES:
        raise InvalidSpec(f"{field} is {len(text)} characters of JSON, limit {MAX_KWARGS_JSON_BYTES}")
    try:
        value = json.loads(text) if text else {}
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError, as is a huge int
        raise InvalidSpec(f"{field} is not valid JSON: {type(exc).__name__}: {quote(str(exc))}") from None
    if not isinstance(value, dict):
        raise InvalidSpec(f"{field} must be a JSON object")
    return value


def spec_from_proto(msg: job_pb2.JobSpec) -> JobSpec:
    """Raises InvalidSpec for any value out of range."""
    optimizer = _optimizer_from_proto(msg.optimizer)
    return JobSpec(
        name=msg.name, model=msg.model, dataset=msg.dataset,
        model_kwargs=_kwargs(msg.model_kwargs_json, "model_kwargs"),
        dataset_kwargs=_kwargs(msg.dataset_kwargs_json, "dataset_kwargs"),
        optimizer=optimizer, batch_size=msg.batch_size, epochs=msg.epochs, steps=msg.steps,
        staleness=msg.staleness if msg.HasField("staleness") else None,
        num_workers=msg.num_workers, seed=msg.seed, device=msg.device, eval_every=msg.eval_every,
        sync_every=msg.sync_every or 1,
        local_optimizer=_optimizer_from_proto(msg.local_optimizer) if msg.HasField("local_optimizer") else None,
        compression=msg.compression or "none", error_feedback=not msg.no_error_feedback,
        pull_dtype=msg.pull_dtype or "full", scale_stale=msg.scale_stale,
    )


#: JobInfo's traffic counters, the same names on both sides.
_TRAFFIC = ("pushes", "bytes_pushed", "dense_bytes_pushed", "pulls", "bytes_pulled", "rows_pulled", "rows_pushed",
            "rows_held")


def info_to_proto(info: JobInfo) -> job_pb2.JobInfo:
    return job_pb2.JobInfo(
        job_id=info.job_id, spec=spec_to_proto(info.spec), state=state_to_proto(info.state),
        step=info.step, total_steps=info.total_steps, version=info.version,
        loss=info.loss, samples_per_sec=info.samples_per_sec, metrics=info.metrics,
        error=info.error, worker_ids=info.worker_ids,
        created_unix=info.created_unix, updated_unix=info.updated_unix, shards=info.shards,
        waiting=info.waiting, **{k: getattr(info, k) for k in _TRAFFIC},
    )


def info_from_proto(msg: job_pb2.JobInfo) -> JobInfo:
    return JobInfo(
        job_id=msg.job_id, spec=spec_from_proto(msg.spec),
        state=state_from_proto(msg.state) or JobState.PENDING,
        step=msg.step, total_steps=msg.total_steps, version=msg.version, loss=msg.loss,
        samples_per_sec=msg.samples_per_sec, metrics=dict(msg.metrics), error=msg.error,
        worker_ids=tuple(msg.worker_ids), created_unix=msg.created_unix,
        updated_unix=msg.updated_unix, shards=tuple(msg.shards), waiting=msg.waiting,
        **{k: getattr(msg, k) for k in _TRAFFIC},
    )


def event_to_proto(event: JobEvent) -> job_pb2.JobEvent:
    return job_pb2.JobEvent(
        seq=event.seq, time_unix=event.time_unix, kind=event.kind, job=info_to_proto(event.job)
    )


def event_from_proto(msg: job_pb2.JobEvent) -> JobEvent:
    return JobEvent(seq=msg.seq, time_unix=msg.time_unix, kind=msg.kind, job=info_from_proto(msg.job))


def history_to_proto(row: HistoryRow) -> job_pb2.HistoryRow:
    return job_pb2.HistoryRow(step=row.step, time_unix=row.time_unix, loss=row.loss,
                              samples_per_sec=row.samples_per_sec, metrics=row.metrics,
                              bytes_pushed=row.bytes_pushed, bytes_pulled=row.bytes_pulled)


def history_from_proto(msg: job_pb2.HistoryRow) -> HistoryRow:
    return HistoryRow(msg.step, msg.time_unix, msg.loss, msg.samples_per_sec, dict(msg.metrics),
                      msg.bytes_pushed, msg.bytes_pulled)


def worker_to_proto(w: WorkerStatus) -> job_pb2.WorkerStatus:
    return job_pb2.WorkerStatus(**dataclasses.asdict(w))


def worker_from_proto(msg: job_pb2.WorkerStatus) -> WorkerStatus:
    return WorkerStatus(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(WorkerStatus)})


def table_to_proto(table: "TableSpec") -> parameter_server_pb2.EmbeddingTable:
    return parameter_server_pb2.EmbeddingTable(
        name=table.name, num_rows=table.num_rows, dim=table.dim, init=table.init, init_scale=table.init_scale,
        optimizer=table.optimizer, lr=table.lr, eps=table.eps, beta1=table.betas[0], beta2=table.betas[1],
        initial_accumulator_value=table.initial_accumulator_value)


def table_from_proto(msg: parameter_server_pb2.EmbeddingTable) -> "TableSpec":
    """The table ``msg`` declares; InvalidArgument naming what is out of range."""
    from psgrid.sparse import TableSpec

    try:
        return TableSpec(msg.name, msg.num_rows, msg.dim, init=msg.init, init_scale=msg.init_scale,
                         optimizer=msg.optimizer, lr=msg.lr, eps=msg.eps, betas=(msg.beta1, msg.beta2),
                         initial_accumulator_value=msg.initial_accumulator_value)
    except ValueError as exc:
        raise InvalidArgument(f"embedding table {quote(msg.name)}: {exc}") from None


def table_to_json(table: "TableSpec") -> dict:
    """``table`` as a checkpoint's meta keeps it."""
    return {**dataclasses.asdict(table), "betas": list(table.betas)}


def table_from_json(value: object) -> "TableSpec":
    """The table a checkpoint's meta describes; ValueError when it is malformed."""
    from psgrid.sparse import TableSpec

    if type(value) is not dict:
        raise ValueError("a table must be an object")
    fields = {f.name for f in dataclasses.fields(TableSpec)}
    if set(value) != fields:
        raise ValueError(f"a table has the fields {sorted(fields)}")
    betas = value["betas"]
    if type(betas) is not list or len(betas) != 2:
        raise ValueError("a table's betas are two numbers")
    try:
        return TableSpec(**{**value, "betas": tuple(betas)})
    except TypeError as exc:
        raise ValueError(str(exc)) from None
