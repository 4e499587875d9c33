"""A job's server-side state to and from a checkpoint.

What a checkpoint holds: the parameters, the optimizer's state and step count,
the version, the job's state, metrics and event position, and each worker's
position in its data (its clock, by worker name). What it does not hold: BSP
gradients accumulated for a round not yet applied (their workers compute that
step again) and the pushes accepted after it was taken. So the recovery point
is the last checkpoint: acknowledged updates after it are lost, and none is
ever applied twice, because restored clocks make workers redo exactly the
steps the parameters do not contain.
"""
from __future__ import annotations

import logging

from google.protobuf import json_format

from psgrid import limits, messages, sparse
from psgrid.codec import Layout
from psgrid.server.checkpoint import JobCheckpoint
from psgrid.server.consistency import StepClock
from psgrid.server.jobs import AWAY, Job
from psgrid.server.store import GradientAccumulator, ParameterStore
from psgrid.server.tables import JobTables
from psgrid.spec import HistoryRow, JobSpec, JobState
from psgrid.v1 import job_pb2

logger = logging.getLogger(__name__)

#: Newest training-curve points a checkpoint keeps.
HISTORY_IN_CHECKPOINT = 5000
#: Prefix of the embedding tables' tensors among a checkpoint's optimizer state.
TABLES = sparse.CHECKPOINT_PREFIX


def snapshot(job: Job, seq: int, aligned: bool = False) -> JobCheckpoint:
    """The job's state as a checkpoint; call under ``job.cond`` (copies the tensors).
    ``aligned`` marks a step-aligned snapshot of a sharded BSP job (a restore point)."""
    store = job.store
    clocks = job.steps.checkpoint_clocks() if job.steps else {}
    names = dict(zip(job.workers, job.worker_names))
    meta = {
        "spec": json_format.MessageToJson(messages.spec_to_proto(job.spec)),
        "state": job.state.value,
        "error": job.error,
        "metrics": dict(job.metrics),
        "version": store.version if store else 0,
        "optimizer_steps": store.optimizer.steps if store else 0,
        "global_step": job.steps.global_step if job.steps else 0,
        "worker_names": list(job.worker_names),
        "clocks": {names[w]: c for w, c in clocks.items()},
        "finished": [names[w] for w, p in job.progress.items() if p.finished],
        "total_steps": job.total_steps,
        "next_event": job.next_event,
        "created": job.created,
        "shards": list(job.shards),
        "partition": job.partition,
        "lineage": job.lineage,
        "aligned": aligned,
        "tables": [messages.table_to_json(t) for t in job.tables.specs().values()] if job.tables else [],
        "history": [[r.step, r.time_unix, r.loss, r.samples_per_sec, r.metrics]
                    for r in list(job.history)[-HISTORY_IN_CHECKPOINT:]],
    }
    params = dict(store.params) if store else {}
    optimizer_state = store.optimizer.state_tensors() if store else {}
    if job.tables is not None:
        optimizer_state.update({TABLES + name: t for name, t in job.tables.tensors().items()})
    return JobCheckpoint(job.job_id, seq, params, optimizer_state, meta).detached()


def tables_of(ckpt: JobCheckpoint, spec: JobSpec) -> JobTables | None:
    """The embedding tables ``ckpt`` holds (None: the job has none)."""
    specs = {t.name: t for t in map(messages.table_from_json, ckpt.meta.get("tables", ()))}
    if not specs:
        return None
    tensors = {k[len(TABLES):]: t for k, t in ckpt.optimizer_state.items() if k.startswith(TABLES)}
    return JobTables.from_tensors(specs, spec.seed, tensors)


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < limits.MAX_COUNT


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _is_names(value: object) -> bool:
    return type(value) is list and all(type(v) is str for v in value)


def _is_history_row(row: object) -> bool:
    return (type(row) is list and len(row) == 5 and _is_count(row[0]) and all(map(_is_number, row[1:4]))
            and type(row[4]) is dict and all(map(_is_number, row[4].values())))


#: What :func:`restore` reads from a checkpoint's meta, and the form each must have
#: (a manifest can verify and still hold anything; the optional keys came later).
_META = {
    "spec": lambda v: type(v) is str,
    "state": lambda v: v in {s.value for s in JobState},
    "error": lambda v: type(v) is str,
    "metrics": lambda v: type(v) is dict and all(map(_is_number, v.values())),
    "version": _is_count, "optimizer_steps": _is_count, "global_step": _is_count,
    "total_steps": _is_count, "next_event": _is_count, "created": _is_number,
    "worker_names": lambda v: _is_names(v) and len(set(v)) == len(v),
    "clocks": lambda v: type(v) is dict and all(map(_is_count, v.values())),
    "finished": _is_names,
}
_OPTIONAL_META = {
    "shards": _is_names, "partition": lambda v: type(v) is bool, "lineage": lambda v: type(v) is str,
    "history": lambda v: type(v) is list and all(map(_is_history_row, v)),
    "tables": lambda v: type(v) is list and all(_is_table(t) for t in v),
}


def _is_table(value: object) -> bool:
    try:
        messages.table_from_json(value)
    except ValueError:
        return False
    return True


def check_meta(meta: dict) -> None:
    """Raise ValueError naming the first field of ``meta`` that :func:`restore` could not use."""
    for key, ok in (*_META.items(), *_OPTIONAL_META.items()):
        if key not in meta and key in _OPTIONAL_META:
            continue
        if key not in meta or not ok(meta[key]):
            raise ValueError(f"meta field {key!r} is missing or malformed")
    if not set(meta["finished"]) <= set(meta["worker_names"]):
        raise ValueError("meta field 'finished' names workers the job does not have")


def usable_meta(job_id: str, seq: int, meta: dict) -> bool:
    """Whether checkpoint ``seq`` of ``job_id`` may be read by its ``meta`` (:func:`check_meta`).

    A manifest can verify and still hold anything: every path that reads a
    checkpoint's meta asks here first. A bad one is logged at WARNING and left out.
    """
    try:
        check_meta(meta)
    except ValueError as exc:
        logger.warning("[ps] job %s checkpoint %d skipped: %s", job_id, seq, exc)
        return False
    return True


def restore(ckpt: JobCheckpoint) -> Job:
    """Rebuild a job; its workers are away until they register again by name.

    Raises for a checkpoint no job can be rebuilt from: ValueError for a malformed
    meta, InvalidSpec for a spec out of range, and whatever else a bad one runs into."""
    meta = ckpt.meta
    check_meta(meta)
    spec = messages.spec_from_proto(json_format.Parse(meta["spec"], job_pb2.JobSpec()))
    job = Job(ckpt.job_id, spec, next_event=meta["next_event"], shards=tuple(meta.get("shards", ())),
              partition=bool(meta.get("partition", False)))
    job.created = meta["created"]
    job.state = JobState(meta["state"])
    job.error, job.metrics, job.total_steps = meta["error"], dict(meta["metrics"]), meta["total_steps"]
    if ckpt.params:
        job.store = _store(ckpt, spec)
        job.accumulator = GradientAccumulator(job.store.layout) if spec.synchronous else None
        job.tables = tables_of(ckpt, spec)
    names = meta["worker_names"]
    if names:
        job.open_away(names)
        job.steps = StepClock.restored(
            spec.staleness, {AWAY + n: meta["clocks"].get(n, 0) for n in names}, meta["global_step"])
        for name in meta["finished"]:
            job.progress[AWAY + name].finished = True
    job.history.extend(HistoryRow(*row) for row in meta.get("history", ()))
    job.lineage = meta.get("lineage", "")
    with job.cond:
        job.emit("restored")
    return job


def _store(ckpt: JobCheckpoint, spec: JobSpec) -> ParameterStore:
    """The parameters, optimizer state, version and optimizer step count of ``ckpt``."""
    layout = Layout.of_tensors(ckpt.params.items())
    store = ParameterStore(layout, layout.pack(ckpt.params), spec.optimizer)
    for name, tensor in store.optimizer.state_tensors().items():
        tensor.copy_(ckpt.optimizer_state[name])
    store.version, store.optimizer.steps = ckpt.meta["version"], ckpt.meta["optimizer_steps"]
    return store


def roll_back(job: Job, ckpt: JobCheckpoint) -> None:
    """Put a running job back to ``ckpt``, one of its own checkpoints; call under
    ``job.cond``. Its workers keep their ids and ranks; each one's clock goes back
    to the checkpoint's, so it computes again exactly the steps undone."""
    meta = ckpt.meta
    store = _store(ckpt, job.spec)
    job.require_store().layout.check_matches(store.layout)
    # Every worker goes to the snapshot's step, including one dropped when it was
    # taken (its own clock then was frozen behind): BSP computes each step once.
    clocks = {worker: meta["global_step"] for worker in job.workers}
    job.roll_back(store, clocks, meta["global_step"], set(meta["finished"]), meta.get("lineage", ""),
                  tables_of(ckpt, job.spec))
