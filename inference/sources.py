"""Where new model versions come from, and the loop that rolls them in.

A :class:`ModelSource` is polled; each poll returns what is new since the
last one: :class:`~psgrid.inference.models.Candidate` versions to check and
serve, and :class:`Unusable` notes for versions that could not even be read
(a checkpoint that fails verification). Two sources:

* :class:`JobSource` follows a job on a parameter server: ``GetJob`` tells
  its parameter version, ``FetchParameters`` streams the weights when it grew.
* :class:`CheckpointSource` follows a checkpoint directory written by
  ``psgrid server --checkpoint-dir``: a new complete checkpoint is a new version.

Version 0 (parameters before their first update) is never offered.

:class:`Follower` polls a source every ``interval_s`` and offers what it finds
to a :class:`~psgrid.inference.models.ModelRegistry`.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import pathlib
import re
import threading
from collections.abc import Callable

from google.protobuf import json_format

from psgrid import messages
from psgrid.client import Client
from psgrid.security import Security
from psgrid.errors import FailedPrecondition, PsgridError
from psgrid.inference.models import Candidate, ModelRegistry
from psgrid.checkpoints import CheckpointReader
from psgrid.limits import check_id, quote
from psgrid.v1 import job_pb2

logger = logging.getLogger(__name__)

_MANIFEST = re.compile(r"ckpt-(\d{8,})\.json")


@dataclasses.dataclass(frozen=True)
class Unusable:
    """A version that could not be read at all (``version`` 0 when even that is unknown)."""

    version: int
    origin: str
    reason: str


class ModelSource(abc.ABC):
    """Something that publishes model versions.

    Contract: :meth:`poll` returns only what appeared since the previous call
    (each version once), newest last, and raises a psgrid error or OSError
    when the source cannot be reached (the caller retries on its next tick).
    """

    @abc.abstractmethod
    def poll(self) -> list[Candidate | Unusable]:
        """What is new since the last poll."""

    def close(self) -> None:
        """Release connections; the default has none."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where versions come from, for logs."""


class JobSource(ModelSource):
    """The parameters of a job on a parameter server, whenever its version grows."""

    def __init__(self, address: str, job_id: str, timeout_s: float = 30.0, security: Security | None = None):
        self.address, self.job_id = address, job_id
        self._client = Client(address, timeout=timeout_s, security=security)
        self._last = 0

    @property
    def description(self) -> str:
        return f"job {self.job_id} on {self.address}"

    def poll(self) -> list[Candidate | Unusable]:
        """The job's parameters when its version grew; version 0 (no update yet) is never served."""
        job = self._client.job(self.job_id)
        info = job.status()
        if info.version <= self._last:
            return []
        try:
            params = job.state_dict()  # every shard's part, put back together
        except FailedPrecondition:  # the job has no parameters yet
            return []
        version = job.status().version
        if version <= self._last or not params:
            return []
        self._last = version
        return [Candidate(version, info.spec, params, f"{self.description} (version {version})",
                          job.row_source())]

    def close(self) -> None:
        self._client.close()


class CheckpointSource(ModelSource):
    """A job's checkpoints under a directory, as the parameter server writes them.

    ``directory`` is either one job's checkpoint folder (it holds
    ``ckpt-*.json`` files, or its name starts with ``job-`` as server job ids
    do) or the store's root; with a root, ``job_id`` picks the job or, when
    None, the only job there (FailedPrecondition when there are several).
    """

    def __init__(self, directory: str | pathlib.Path, job_id: str | None = None):
        directory = pathlib.Path(directory)
        if job_id is None and (any(directory.glob("ckpt-*.json")) or directory.name.startswith("job-")):
            directory, job_id = directory.parent, directory.name
        self.root, self.job_id = directory, job_id
        if job_id is not None:
            check_id(job_id)
        self._store = CheckpointReader(directory)
        self._last_seq = -1

    @property
    def description(self) -> str:
        return f"checkpoints of {self.job_id or 'the only job'} under {self.root}"

    def _resolve_job(self) -> str | None:
        if self.job_id is None:
            jobs = self._store.job_ids()
            if len(jobs) > 1:
                raise FailedPrecondition(f"{self.root} holds checkpoints of {len(jobs)} jobs; name one")
            self.job_id = jobs[0] if jobs else None
        return self.job_id

    def _newest_seq(self, job_id: str) -> int:
        seqs = [int(m[1]) for p in (self.root / job_id).glob("ckpt-*.json")
                if (m := _MANIFEST.fullmatch(p.name))]
        return max(seqs, default=-1)

    def poll(self) -> list[Candidate | Unusable]:
        job_id = self._resolve_job()
        if job_id is None:
            return []
        newest = self._newest_seq(job_id)
        if newest <= self._last_seq:
            return []
        ckpt = self._store.load_latest(job_id)  # verifies; skips damaged ones
        found: list[Candidate | Unusable] = []
        if ckpt is None or ckpt.seq < newest:
            found.append(Unusable(0, f"{self.root / job_id} checkpoint {newest}",
                                  "the checkpoint fails verification (see the log)"))
        if ckpt is not None and ckpt.seq > self._last_seq and (item := self._candidate(ckpt)):
            found.insert(0, item)
        # One written since the listing may have been loaded already: never offer it twice.
        self._last_seq = max(newest, ckpt.seq if ckpt is not None else -1)
        return found

    def _candidate(self, ckpt) -> Candidate | Unusable | None:
        origin = f"{self.root / ckpt.job_id} checkpoint {ckpt.seq}"
        try:
            spec = messages.spec_from_proto(json_format.Parse(ckpt.meta["spec"], job_pb2.JobSpec()))
            version = int(ckpt.meta["version"])
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, the checkpoint is unusable
            return Unusable(0, origin, f"the checkpoint has no usable spec and version: "
                                       f"{type(exc).__name__}: {quote(str(exc))}")
        if version == 0:  # saved before the first update: the untrained initialisation
            return None
        try:
            rows = checkpoint_rows(ckpt, spec)
        except Exception as exc:  # noqa: BLE001 - a table that does not load makes the checkpoint unusable
            return Unusable(version, origin, f"its embedding tables do not load: {type(exc).__name__}: "
                                             f"{quote(str(exc))}")
        return Candidate(version, spec, ckpt.params, origin, rows)


def checkpoint_rows(ckpt, spec) -> object | None:
    """The rows of the embedding tables a checkpoint holds (touched rows as saved, the
    others their deterministic initial values), or None when the job has none."""
    from psgrid import sparse

    specs = {t.name: t for t in map(messages.table_from_json, ckpt.meta.get("tables", ()))}
    if not specs:
        return None
    if ckpt.meta.get("shards") or ckpt.meta.get("partition"):
        raise ValueError("the job is sharded: each shard's checkpoint holds only its own rows; serve it "
                         "from the job (--follow-job) instead")
    return sparse.SavedRows(specs, spec.seed, ckpt.optimizer_state)


class Follower:
    """Polls a source (at once, then every ``interval_s``) and offers each new
    version to the registry; ``on_swap()`` runs after each version swapped in."""

    def __init__(self, source: ModelSource, registry: ModelRegistry, interval_s: float = 2.0,
                 on_swap: Callable[[], None] | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.source, self.registry, self.interval_s = source, registry, interval_s
        self._on_swap = on_swap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def tick(self) -> int:
        """Poll once; return how many versions were swapped in. Never raises: an outage,
        or anything else a poll runs into, is logged and the next tick tries again."""
        try:
            found = self.source.poll()
        except Exception as exc:  # noqa: BLE001 - the follow thread must outlive a bad poll
            message = f"{type(exc).__name__}: {str(exc)[:500]}"
            if message != self._last_error:  # log an outage once, not every tick
                logger.warning("[serve] cannot poll %s: %s", self.source.description, message,
                               exc_info=not isinstance(exc, (PsgridError, OSError)))
                self._last_error = message
            return 0
        self._last_error = ""
        swapped = 0
        for item in found:
            if isinstance(item, Unusable):
                self.registry.refuse(item.version, item.origin, item.reason)
            elif self.registry.offer(item):
                swapped += 1
                if self._on_swap is not None:
                    self._on_swap()
        return swapped

    def _run(self) -> None:
        self.tick()
        while not self._stop.wait(self.interval_s):
            self.tick()

    def start(self) -> "Follower":
        self._thread = threading.Thread(target=self._run, name="serve-follow", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.source.close()
