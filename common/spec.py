"""The vocabulary of jobs: what a user submits and the states a job moves through.

Pure Python; :mod:`psgrid.codec` converts these to and from protobuf.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import pathlib
import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from psgrid.errors import InvalidSpec, PermissionDenied
from psgrid.limits import MAX_COUNT, MAX_IMPORT_PATH_CHARS, MAX_JOB_NAME_CHARS, MAX_KWARGS_JSON_BYTES, quote

OPTIMIZERS = ("sgd", "adam", "adamw")
#: What a push may carry (JobSpec.compression); "topk" takes a ratio: "topk:0.01".
ENCODINGS = ("none", "fp16", "bf16", "int8", "topk")
#: The largest top-k ratio: above it (index, value) pairs are no smaller than the tensor.
MAX_TOPK_RATIO = 0.5
#: Dtypes a job's training pulls may be sent in (JobSpec.pull_dtype); "full": the parameters' own.
PULL_DTYPES = ("full", "fp16", "bf16")
#: Module prefixes a cluster runs by default: psgrid's own examples.
DEFAULT_ALLOWED_MODULES = ("psgrid.examples",)
# Dotted identifiers (no empty part: "a..b" and "a." are no module), a colon, an identifier.
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_DEVICE = re.compile(r"^(|auto|cpu|cuda(:\d+)?|mps)$")
#: The largest per-worker batch: sample weights (batch x ranks) stay well inside int64.
MAX_BATCH_SIZE = 2**31 - 1


def module_allowed(module: str, allowed: tuple[str, ...]) -> bool:
    """True when ``module`` is one of ``allowed`` or inside one ("*" allows all)."""
    return any(p == "*" or module == p or module.startswith(p + ".") for p in allowed)


def parse_allowed(text: str | None) -> tuple[str, ...]:
    """A comma-separated allow-list; the default one when empty."""
    items = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    return items or DEFAULT_ALLOWED_MODULES


class JobState(str, enum.Enum):
    """Life of a job.

    PENDING -> RUNNING -> EVALUATING -> SUCCEEDED; any non-terminal state can
    go to FAILED or CANCELLED. Terminal states never change again.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    EVALUATING = "EVALUATING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A server-side optimizer with torch.optim's defaults and semantics."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InvalidSpec(f"optimizer {quote(self.name)} is not one of {OPTIMIZERS}")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise InvalidSpec(f"betas must be a pair of numbers, got {quote(self.betas)}")
        object.__setattr__(self, "betas", tuple(self.betas))
        # Every number finite: one NaN or Inf here turns the parameters non-finite at the first step.
        for field, value in (("lr", self.lr), ("momentum", self.momentum), ("dampening", self.dampening),
                             ("weight_decay", self.weight_decay), ("beta1", self.betas[0]),
                             ("beta2", self.betas[1]), ("eps", self.eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidSpec(f"optimizer {field} must be a finite number, got {quote(value)}")
        if not self.lr > 0:
            raise InvalidSpec(f"optimizer lr must be > 0, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0 or self.dampening < 0:
            raise InvalidSpec("momentum, dampening and weight_decay must be >= 0")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise InvalidSpec("nesterov needs momentum > 0 and dampening 0")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise InvalidSpec(f"betas must lie in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise InvalidSpec(f"eps must be > 0, got {self.eps}")


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How a worker encodes what it pushes: one of ENCODINGS; ``ratio`` is top-k's
    fraction of each tensor's values sent. ``str()`` is the spelling :meth:`parse` reads."""

    kind: str = "none"
    ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ENCODINGS:
            raise InvalidSpec(f"compression must be none, fp16, bf16, int8 or topk:RATIO, got {quote(self.kind)}")
        if self.kind == "topk":
            if (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                    or not 0 < self.ratio <= MAX_TOPK_RATIO):
                raise InvalidSpec(f"the top-k ratio must be in (0, {MAX_TOPK_RATIO}], got {quote(self.ratio)}")
            object.__setattr__(self, "ratio", float(self.ratio))
        elif self.ratio:
            raise InvalidSpec(f"only topk takes a ratio, not {self.kind}")

    @classmethod
    def parse(cls, text: str) -> "Encoding":
        """``none`` (or empty), ``fp16``, ``bf16``, ``int8`` or ``topk:RATIO``; InvalidSpec otherwise."""
        if not isinstance(text, str):
            raise InvalidSpec(f"compression must be a string, got {quote(text)}")
        kind, colon, ratio = (text or "none").strip().lower().partition(":")
        if kind != "topk":
            if colon:
                raise InvalidSpec(f"only topk takes a ratio, as in topk:0.01; got {quote(text)}")
            return cls(kind)
        try:
            value = float(ratio)
        except ValueError:
            raise InvalidSpec(f"topk needs a ratio, as in topk:0.01; got {quote(text)}") from None
        if not math.isfinite(value):
            raise InvalidSpec(f"the top-k ratio must be finite, got {quote(text)}")
        return cls("topk", value)

    def __str__(self) -> str:
        return f"topk:{self.ratio!r}" if self.kind == "topk" else self.kind

    @property
    def lossy(self) -> bool:
        return self.kind != "none"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A training job. Model and dataset are ``package.module:factory`` import paths.

    ``batch_size`` is per worker. Exactly one of ``epochs`` and ``steps`` is set:
    ``steps`` counts each worker's pushes, ``epochs`` passes over its shard.
    ``staleness``: 0 synchronous (BSP), n > 0 stale-synchronous (SSP), None
    asynchronous.

    Slow links (docs/design.md, "Training over slow links"): ``sync_every`` H > 1
    is local SGD (each worker takes H steps of ``local_optimizer``, then pushes
    its model delta, which the server applies with ``optimizer``, the outer one);
    ``steps`` and ``epochs`` then count local steps, and the job's step counts
    rounds. ``compression`` encodes every push (with ``error_feedback`` for the
    lossy ones); ``pull_dtype`` sends training pulls in 16 bits.
    """

    model: str
    dataset: str
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)
    batch_size: int = 32
    epochs: int = 0
    steps: int = 0
    staleness: int | None = 0
    num_workers: int = 1
    seed: int = 0
    name: str = ""
    device: str = ""
    #: Rank 0 evaluates every this many steps (0: only at the end).
    eval_every: int = 0
    #: Local SGD: local steps each worker takes between two pushes of its model delta (1: a
    #: gradient every step).
    sync_every: int = 1
    #: The workers' optimizer of their local steps (torch.optim); set exactly when sync_every > 1.
    local_optimizer: OptimizerSpec | None = None
    #: What a push carries: "none", "fp16", "bf16", "int8" or "topk:RATIO".
    compression: str = "none"
    #: Lossy compression: what a push leaves out is added to the worker's next push.
    error_feedback: bool = True
    #: Training pulls in "fp16" or "bf16" ("full": the parameters' own dtype).
    pull_dtype: str = "full"
    #: SSP and asynchronous: a push computed on weights s steps old is applied scaled by 1/(1+s).
    scale_stale: bool = False

    def __post_init__(self) -> None:
        self._coerce()
        if self.eval_every < 0:
            raise InvalidSpec(f"eval_every must be >= 0, got {self.eval_every}")
        for field in ("model", "dataset"):
            value = getattr(self, field)
            if (not isinstance(value, str) or len(value) > MAX_IMPORT_PATH_CHARS
                    or not _IMPORT_PATH.fullmatch(value)):
                raise InvalidSpec(f"{field} must be 'package.module:factory' (at most "
                                  f"{MAX_IMPORT_PATH_CHARS} characters), got {quote(value)}")
        for field in ("model_kwargs", "dataset_kwargs"):
            value = getattr(self, field)
            if not isinstance(value, dict):
                raise InvalidSpec(f"{field} must be a mapping, got {type(value).__name__}")
            try:
                size = len(json.dumps(value))
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidSpec(f"{field} must be JSON-serialisable: {type(exc).__name__}: "
                                  f"{quote(str(exc))}") from None
            if size > MAX_KWARGS_JSON_BYTES:
                raise InvalidSpec(f"{field} is {size} bytes as JSON, limit {MAX_KWARGS_JSON_BYTES}")
        if len(self.name) > MAX_JOB_NAME_CHARS or not self.name.isprintable():
            raise InvalidSpec(f"name must be at most {MAX_JOB_NAME_CHARS} printable characters, "
                              f"got {quote(self.name)}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InvalidSpec(f"batch_size must be in 1..{MAX_BATCH_SIZE}, got {self.batch_size}")
        if (self.epochs > 0) == (self.steps > 0) or self.epochs < 0 or self.steps < 0:
            raise InvalidSpec(
                f"set exactly one of epochs and steps (> 0), got epochs={self.epochs} steps={self.steps}"
            )
        if max(self.epochs, self.steps, self.eval_every) >= MAX_COUNT:
            raise InvalidSpec("epochs, steps and eval_every must be below 2**62")
        if self.staleness is not None and not 0 <= self.staleness < MAX_COUNT:
            raise InvalidSpec(f"staleness must be in [0, 2**62) or None, got {self.staleness}")
        if not 1 <= self.num_workers <= 4096:
            raise InvalidSpec(f"num_workers must be in 1..4096, got {self.num_workers}")
        if not 0 <= self.seed < 2**63:
            raise InvalidSpec(f"seed must be in [0, 2**63), got {self.seed}")
        if not _DEVICE.fullmatch(self.device):
            raise InvalidSpec(f"device must be auto, cpu, cuda or cuda:N, got {quote(self.device)}")
        self._check_slow_link_knobs()

    def _check_slow_link_knobs(self) -> None:
        if not 1 <= self.sync_every < MAX_COUNT:
            raise InvalidSpec(f"sync_every must be in [1, 2**62), got {self.sync_every}")
        if (self.sync_every > 1) != (self.local_optimizer is not None):
            raise InvalidSpec("local SGD needs both sync_every > 1 and a local_optimizer (the workers' "
                              f"optimizer of their local steps); got sync_every={self.sync_every} and "
                              f"local_optimizer={'set' if self.local_optimizer else 'none'}")
        object.__setattr__(self, "compression", str(Encoding.parse(self.compression)))
        if self.pull_dtype not in PULL_DTYPES:
            raise InvalidSpec(f"pull_dtype must be one of {PULL_DTYPES}, got {quote(self.pull_dtype)}")
        if self.scale_stale and self.synchronous:
            raise InvalidSpec("scale_stale is for staleness > 0 or 'inf': BSP pushes are never stale")

    _INT_FIELDS = ("batch_size", "epochs", "steps", "num_workers", "seed", "eval_every", "sync_every")

    def _coerce(self) -> None:
        """The same spellings on every path (constructor, :meth:`replace`, :meth:`from_dict`).

        ``staleness`` "inf"/"async"/"none"/"unbounded" means None (asynchronous);
        ``epochs``/``steps`` None means unset (0); every count must be an int
        (not a bool, float or string): InvalidSpec naming the field otherwise.
        """
        staleness = self.staleness
        if isinstance(staleness, str):
            if staleness.lower() not in ("inf", "async", "none", "unbounded"):
                raise InvalidSpec(f"staleness must be an integer or 'inf', got {quote(staleness)}")
            object.__setattr__(self, "staleness", None)
        elif staleness is not None and (isinstance(staleness, bool) or not isinstance(staleness, int)):
            raise InvalidSpec(f"staleness must be an integer or 'inf', got {quote(staleness)}")
        for field in ("epochs", "steps"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, 0)
        for field in self._INT_FIELDS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidSpec(f"{field} must be an integer, got {quote(value)}")
        for field in ("error_feedback", "scale_stale"):
            if not isinstance(getattr(self, field), bool):
                raise InvalidSpec(f"{field} must be true or false, got {quote(getattr(self, field))}")
        if self.local_optimizer is not None and not isinstance(self.local_optimizer, OptimizerSpec):
            raise InvalidSpec(f"local_optimizer must be an OptimizerSpec, got {type(self.local_optimizer).__name__}")
        for field in ("name", "device", "compression", "pull_dtype"):
            if not isinstance(getattr(self, field), str):
                raise InvalidSpec(f"{field} must be a string, got {quote(getattr(self, field))}")
        if not isinstance(self.optimizer, OptimizerSpec):
            raise InvalidSpec(f"optimizer must be an OptimizerSpec, got {type(self.optimizer).__name__}")

    @property
    def synchronous(self) -> bool:
        return self.staleness == 0

    @property
    def encoding(self) -> Encoding:
        """How every push of the job is encoded (``compression``)."""
        return Encoding.parse(self.compression)

    def check_modules(self, allowed: tuple[str, ...]) -> None:
        """Raise PermissionDenied unless model and dataset live under an allowed prefix."""
        for field in ("model", "dataset"):
            module = getattr(self, field).partition(":")[0]
            if not module_allowed(module, allowed):
                raise PermissionDenied(
                    f"{field} module {quote(module)} is not in the allow-list {list(allowed)}; "
                    "the operator can add its package with --allow-modules")

    def replace(self, **changes: Any) -> "JobSpec":
        """A copy with ``changes``, coerced and checked as :meth:`from_dict` does (InvalidSpec)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidSpec(f"unknown job spec keys: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        """Build a spec from a plain mapping (a parsed TOML file, say)."""
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidSpec(f"unknown job spec keys: {sorted(unknown)}")
        optimizer = _optimizer_from_dict(data.pop("optimizer", {}), "optimizer")
        if data.get("local_optimizer") is not None:
            data["local_optimizer"] = _optimizer_from_dict(data["local_optimizer"], "local_optimizer")
        return cls(optimizer=optimizer, **data)

    @classmethod
    def from_toml(cls, path: str | pathlib.Path) -> "JobSpec":
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))


def _optimizer_from_dict(opt: Any, what: str) -> OptimizerSpec:
    """An OptimizerSpec from a TOML table (or just its name)."""
    if isinstance(opt, OptimizerSpec):
        return opt
    if isinstance(opt, str):
        opt = {"name": opt}
    if not isinstance(opt, dict):
        raise InvalidSpec(f"{what} must be a table or a name, got {quote(opt)}")
    opt = dict(opt)
    if "betas" in opt:
        opt["betas"] = tuple(opt["betas"])
    unknown = set(opt) - {f.name for f in dataclasses.fields(OptimizerSpec)}
    if unknown:
        raise InvalidSpec(f"unknown {what} keys: {sorted(unknown)}")
    return OptimizerSpec(**opt)


@dataclasses.dataclass(frozen=True)
class JobInfo:
    """A snapshot of one job as the server sees it."""

    job_id: str
    spec: JobSpec
    state: JobState
    step: int = 0
    total_steps: int = 0
    version: int = 0
    loss: float = float("nan")
    samples_per_sec: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str = ""
    worker_ids: tuple[str, ...] = ()
    created_unix: float = 0.0
    updated_unix: float = 0.0
    #: Addresses of the other parameter-server shards holding part of the job.
    shards: tuple[str, ...] = ()
    #: Why a PENDING job has not started yet; empty once it runs.
    waiting: str = ""
    #: Training traffic on this server since the job started here: pushes accepted and their
    #: payload bytes as sent (and uncompressed), pulls served with weights and their bytes.
    pushes: int = 0
    bytes_pushed: int = 0
    dense_bytes_pushed: int = 0
    pulls: int = 0
    bytes_pulled: int = 0
    #: Embedding tables: rows read and row gradients received on this server, rows it holds.
    rows_pulled: int = 0
    rows_pushed: int = 0
    rows_held: int = 0

    @property
    def push_bytes_per_step(self) -> float:
        """Payload bytes of one worker's push (per step; per round under local SGD)."""
        return self.bytes_pushed / self.pushes if self.pushes else 0.0

    @property
    def pull_bytes_per_step(self) -> float:
        """Payload bytes of one worker's pull (per step; per round under local SGD)."""
        return self.bytes_pulled / self.pulls if self.pulls else 0.0

    @property
    def compression_ratio(self) -> float:
        """Uncompressed push bytes over the bytes sent (1.0: none; 0.0: nothing pushed yet)."""
        return self.dense_bytes_pushed / self.bytes_pushed if self.bytes_pushed else 0.0

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        if self.state is JobState.SUCCEEDED:
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclasses.dataclass(frozen=True)
class JobEvent:
    """One entry of a job's progress log: ``kind`` is submitted, state, progress or metrics."""

    seq: int
    time_unix: float
    kind: str
    job: JobInfo


@dataclasses.dataclass(frozen=True)
class HistoryRow:
    """One point of a job's training curve."""

    step: int
    time_unix: float
    loss: float = float("nan")
    samples_per_sec: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    #: The job's push and pull payload bytes so far (JobInfo.bytes_pushed, bytes_pulled).
    bytes_pushed: int = 0
    bytes_pulled: int = 0


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    """One registered worker as the parameter server sees it."""

    worker_id: str
    name: str
    host: str
    pid: int
    device: str
    job_id: str = ""
    rank: int = 0
    step: int = 0
    samples_per_sec: float = 0.0
    last_seen_s: float = 0.0
    lost: bool = False


@dataclasses.dataclass(frozen=True)
class Assignment:
    """A job given to a worker: rank ``rank`` of ``world_size``, resuming at
    ``start_step``, on the coordinator and the other ``shards``."""

    job_id: str
    rank: int
    world_size: int
    spec: JobSpec
    start_step: int = 0
    shards: tuple[str, ...] = ()
    worker_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RestorePoints:
    """Where a sharded BSP job is on one parameter server, and the step-aligned
    snapshots that server can put it back to (see ``ListRestorePoints``)."""

    step: int
    lineage: str
    #: Counts the server's roll-backs of the job; a roll-back names the one it saw.
    timeline: int
    #: (step, lineage) of each snapshot held, ascending.
    points: tuple[tuple[int, str], ...] = ()
    #: The asking worker's clock on that server (the step it is to compute next).
    clock: int = 0
