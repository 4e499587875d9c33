"""Embedding tables that live on the parameter servers: what worker and server share.

A table is declared in a model by :class:`TableSpec` (name, rows, width, how
rows start, how they are updated). Its rows are never held whole anywhere:

* **Placement** (:func:`shard_of`): row ``id`` of a table lives on shard
  ``mix(id, table) % shards``. A hash, not ranges: ids are often assigned by
  popularity or time (id 0..999 the most clicked items), and ranges would put
  every hot row on one shard. Rows of one table are all the same size, so an
  even spread of ids is an even spread of bytes.
* **Lazy, deterministic rows** (:func:`initial_rows`): a row that was never
  written is a pure function of (job seed, table name, row id): the same on
  every shard, in every run and after every restore, so a 100M-row table costs
  nothing until touched and a pull of an untouched row needs no write.
* **Ids** (:func:`check_ids`): int64, ``0 <= id < num_rows`` (``num_rows`` 0:
  any non-negative id), checked where they enter.

A model uses a table through :class:`Embedding` or :class:`EmbeddingBag`, as it
would ``nn.Embedding``: the module holds no rows. In a forward pass it asks the
:class:`RowSource` bound around the step (:func:`rows_from`) for the rows of the
unique ids it was given, and after the backward pass the source's
:meth:`Step.gradients` are each table's (unique ids, summed row gradients):
what a worker pushes. No gRPC here: :mod:`psgrid.server.tables` keeps the rows
and applies the sparse optimizers; the worker binds a source that pulls rows.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import math
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch import nn

from psgrid.errors import InvalidArgument

#: Sparse optimizers a table may name (applied on the servers to the touched rows only).
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "sparse_adam")
INITS = ("normal", "uniform", "zeros")

_MASK = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table: ``num_rows`` x ``dim`` float32, its initial rows and optimizer.

    ``init``: "normal" (N(0, ``init_scale``^2), as ``nn.Embedding``'s N(0, 1) when
    the scale is 1), "uniform" (U(-scale, scale)) or "zeros". ``num_rows`` 0 leaves
    ids unbounded (hashed feature ids). The optimizer mirrors its torch counterpart
    on ``nn.Embedding(sparse=True)``: "sgd" (SGD), "adagrad" (Adagrad), "sparse_adam"
    (SparseAdam); "rowwise_adagrad" keeps one accumulator per row (the mean of the
    row's squared gradient), as production recommenders do.
    """

    name: str
    num_rows: int
    dim: int
    init: str = "normal"
    init_scale: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.01
    eps: float = 1e-10
    betas: tuple[float, float] = (0.9, 0.999)
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"table name must be letters, digits, '_' and '.', got {self.name!r}")
        if isinstance(self.num_rows, bool) or not isinstance(self.num_rows, int) or self.num_rows < 0:
            raise ValueError(f"num_rows must be an int >= 0 (0: unbounded), got {self.num_rows!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 1 <= self.dim <= 65536:
            raise ValueError(f"dim must be an int in 1..65536, got {self.dim!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for field in ("init_scale", "lr", "eps", "initial_accumulator_value"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
        if self.eps <= 0 and self.optimizer != "sgd":
            raise ValueError(f"eps must be > 0 for {self.optimizer}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")

    @property
    def row_bytes(self) -> int:
        return self.dim * 4

    @property
    def key(self) -> int:
        """A 64-bit number standing for the table's name in hashes (stable across runs)."""
        return int.from_bytes(hashlib.blake2b(self.name.encode(), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 (wrapping arithmetic): a bijection that scatters bits."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def shard_of(ids: torch.Tensor, table: TableSpec, shards: int) -> torch.Tensor:
    """The shard (0..shards-1) holding each row of ``ids`` (int64)."""
    if shards == 1:
        return torch.zeros(ids.shape, dtype=torch.int64)
    with np.errstate(over="ignore"):
        h = _mix(ids.numpy().astype(np.uint64) ^ np.uint64(table.key))
    return torch.from_numpy((h % np.uint64(shards)).astype(np.int64))


def initial_rows(ids: torch.Tensor, table: TableSpec, seed: int) -> torch.Tensor:
    """The rows ``ids`` hold before any update: float32 [len(ids), dim], a pure function
    of (seed, table, id).

    Each pair of values comes from one counter-based 64-bit hash (splitmix64 of the
    row's base and the pair's index): two 24-bit uniforms, which Box-Muller turns
    into two normals (cos and sin), or which are the two uniform values. One hash
    per two values, in float32: a pull of thousands of rows never written costs
    milliseconds (the server computes them on every read until they are written).
    """
    n, dim = ids.numel(), table.dim
    if table.init == "zeros" or n == 0:
        return torch.zeros(n, dim, dtype=torch.float32)
    pairs = (dim + 1) // 2
    with np.errstate(over="ignore"):
        base = _mix(ids.numpy().astype(np.uint64) ^ np.uint64(table.key)) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK)
        h = _mix(base[:, None] + np.arange(pairs, dtype=np.uint64)[None, :])
    # 24 bits each, + 1/2: uniforms in (0, 1), exact in float32, never 0 (log stays finite).
    step = np.float32(1.0 / (1 << 24))
    u1 = ((h >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * step
    u2 = (((h >> np.uint64(8)) & np.uint64(0xFFFFFF)).astype(np.float32) + np.float32(0.5)) * step
    out = np.empty((n, 2 * pairs), dtype=np.float32)
    if table.init == "uniform":
        out[:, 0::2], out[:, 1::2] = u1 * 2 - 1, u2 * 2 - 1
    else:
        radius = np.sqrt(np.float32(-2.0) * np.log(u1))
        angle = np.float32(2.0 * math.pi) * u2
        out[:, 0::2], out[:, 1::2] = radius * np.cos(angle), radius * np.sin(angle)
    rows = out[:, :dim]
    if table.init_scale != 1.0:
        rows = rows * np.float32(table.init_scale)
    return torch.from_numpy(np.ascontiguousarray(rows))


def check_ids(ids: torch.Tensor, table: TableSpec, unique: bool = False) -> None:
    """InvalidArgument unless ``ids`` is a 1-D int64 tensor of valid row ids (``unique``:
    and without repeats, as a push of row gradients must be)."""
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise InvalidArgument(f"table {table.name}: ids must be a 1-D int64 tensor, got "
                              f"{str(ids.dtype).removeprefix('torch.')}{list(ids.shape)}")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise InvalidArgument(f"table {table.name}: negative row id {lo}")
    if table.num_rows and hi >= table.num_rows:
        raise InvalidArgument(f"table {table.name}: row id {hi} out of range (num_rows {table.num_rows})")
    if unique and torch.unique(ids).numel() != ids.numel():
        raise InvalidArgument(f"table {table.name}: duplicate row ids in one push (sum them first)")


# --- on the wire: ids as little-endian int64, rows as little-endian float32 ------------------

#: Bytes of rows one PullRows, PushRows or LookupRows call carries at most (gRPC's
#: messages stop at 4 MiB; the rest is room for the message's other fields): a
#: step's rows travel in as many calls as they need.
ROWS_BYTES = 3 << 20



def ids_to_bytes(ids: torch.Tensor) -> bytes:
    return ids.to(torch.int64).contiguous().numpy().tobytes()


def ids_from_bytes(data: bytes, table: str) -> torch.Tensor:
    """The int64 ids ``data`` holds; InvalidArgument when it is not whole ids."""
    if len(data) % 8:
        raise InvalidArgument(f"table {table}: {len(data)} bytes of ids is not a whole number of int64 ids")
    return torch.frombuffer(bytearray(data), dtype=torch.int64) if data else torch.empty(0, dtype=torch.int64)


def rows_to_bytes(rows: torch.Tensor) -> bytes:
    return rows.detach().to(torch.float32).contiguous().numpy().tobytes()


def rows_from_bytes(data: bytes, count: int, table: TableSpec) -> torch.Tensor:
    """float32 [count, dim] from ``data``; InvalidArgument when its length is not that."""
    if len(data) != count * table.row_bytes:
        raise InvalidArgument(f"table {table.name}: {count} ids need {count * table.row_bytes} bytes of "
                              f"float32 rows of width {table.dim}, got {len(data)}")
    if not data:
        return torch.empty(0, table.dim)
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(count, table.dim)


def split_rows(rows: dict[str, tuple[torch.Tensor, torch.Tensor]],
               limit: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``rows`` ({table: (ids, grads)}) cut into parts of at most about ``limit`` bytes
    (ids and rows), each row in one part; always at least one part."""
    parts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{}]
    room = limit
    for name, (ids, grads) in rows.items():
        per_row = 8 + 4 * (grads.shape[1] if grads.dim() == 2 else 1)
        start, n = 0, ids.numel()
        while True:
            take = min(n - start, max(0, room) // per_row)
            if take == 0 and start < n:  # no room left in this part
                if parts[-1]:
                    parts.append({})
                    room = limit
                    continue
                take = 1  # a row larger than the limit goes alone
            parts[-1][name] = (ids[start:start + take], grads[start:start + take])
            room -= take * per_row
            start += take
            if start >= n:
                break
            parts.append({})
            room = limit
    return parts


# --- the modules a model uses ------------------------------------------------------------------


class RowSource(Protocol):
    """Where a step's rows come from: the servers (a worker), or a table in memory."""

    def rows(self, table: TableSpec, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), dim]: the current rows of the unique ``ids``."""


class RowIndex:
    """Row id -> slot for a table's held rows, looked up and grown a batch at a time.

    An open-addressing hash table (linear probing, load at most a half) in two
    numpy arrays, probed for every id of a batch at once: a batch of ids costs
    a few vector operations per probe round, however many rows are held, where
    a Python dict costs a call per id. Ids are non-negative (checked before),
    so -1 marks an empty place. Nothing is ever removed.
    """

    EMPTY = -1
    _MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits of id * 2^64/phi

    def __init__(self, ids: np.ndarray | None = None):
        self._keys = np.full(1 << 10, self.EMPTY, dtype=np.int64)
        self._vals = np.empty(1 << 10, dtype=np.int64)
        self._size = 0
        if ids is not None and len(ids):
            self.add(ids, np.arange(len(ids), dtype=np.int64))

    def __len__(self) -> int:
        return self._size

    def _home(self, ids: np.ndarray) -> np.ndarray:
        shift = np.uint64(64 - (self._keys.size.bit_length() - 1))
        return ((ids.astype(np.uint64) * self._MIX) >> shift).astype(np.int64)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """The slot of each id, -1 for ids not held."""
        out = np.full(len(ids), -1, dtype=np.int64)
        mask = self._keys.size - 1
        todo, pos = np.arange(len(ids)), self._home(ids)
        while todo.size:
            keys = self._keys[pos]
            hit = keys == ids[todo]
            out[todo[hit]] = self._vals[pos[hit]]
            go = ~hit & (keys != self.EMPTY)
            todo, pos = todo[go], (pos[go] + 1) & mask
        return out

    def add(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Hold ``ids`` (unique, none held yet) at ``slots``."""
        if 2 * (self._size + len(ids)) > self._keys.size:
            held = self._keys != self.EMPTY
            old_ids, old_slots = self._keys[held], self._vals[held]
            size = self._keys.size
            while 2 * (self._size + len(ids)) > size:
                size *= 2
            self._keys = np.full(size, self.EMPTY, dtype=np.int64)
            self._vals = np.empty(size, dtype=np.int64)
            self._place(old_ids, old_slots)
        self._place(ids, slots)
        self._size += len(ids)

    def _place(self, ids: np.ndarray, slots: np.ndarray) -> None:
        mask = self._keys.size - 1
        todo, pos = np.arange(len(ids)), self._home(ids)
        while todo.size:
            free = np.flatnonzero(self._keys[pos] == self.EMPTY)
            places, first = np.unique(pos[free], return_index=True)  # one id per free place
            won = free[first]
            self._keys[places], self._vals[places] = ids[todo[won]], slots[todo[won]]
            left = np.ones(todo.size, dtype=bool)
            left[won] = False
            todo, pos = todo[left], (pos[left] + 1) & mask  # the place is taken now: probe on


class MemoryRows:
    """Rows held in memory, whole: ``weights`` by table name, float32 [num_rows, dim]."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights

    def rows(self, table: TableSpec, ids: torch.Tensor) -> torch.Tensor:
        return self.weights[table.name][ids]


#: Where a job's checkpoint keeps its tables: meta["tables"] lists their specs, and the
#: optimizer-state tensors "tables/<table>/ids" and ".../rows" hold the touched rows.
CHECKPOINT_PREFIX = "tables/"


class SavedRows:
    """The rows a checkpoint holds: touched rows as saved, every other row its
    deterministic initial value (for serving a checkpoint: read-only)."""

    def __init__(self, specs: dict[str, TableSpec], seed: int, tensors: dict[str, torch.Tensor]):
        self.seed = seed
        self._held: dict[str, tuple[RowIndex, torch.Tensor]] = {}
        for name, spec in specs.items():
            ids = tensors.get(f"{CHECKPOINT_PREFIX}{name}/ids")
            rows = tensors.get(f"{CHECKPOINT_PREFIX}{name}/rows")
            if ids is None or rows is None or tuple(rows.shape) != (ids.numel(), spec.dim):
                raise InvalidArgument(f"table {name}: the checkpoint's rows do not fit the table")
            self._held[name] = (RowIndex(ids.numpy()), rows)

    def rows(self, table: TableSpec, ids: torch.Tensor) -> torch.Tensor:
        index, held = self._held[table.name]
        slots = torch.from_numpy(index.get(ids.numpy()))
        out = initial_rows(ids, table, self.seed)
        found = slots >= 0
        out[found] = held[slots[found]]
        return out


class Step:
    """The rows one step used, per table, and (after backward) their gradients."""

    def __init__(self, source: RowSource):
        self.source = source
        self._used: dict[str, list[tuple[TableSpec, torch.Tensor, torch.Tensor]]] = {}

    def rows(self, table: TableSpec, ids: torch.Tensor, grad: bool) -> torch.Tensor:
        rows = self.source.rows(table, ids).detach().requires_grad_(grad)
        self._used.setdefault(table.name, []).append((table, ids, rows))
        return rows

    def gradients(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per table: (unique ids, their gradient rows summed over every use in the step).
        Rows a loss did not reach get zero gradients; a table no backward reached is left out."""
        out = {}
        for name, uses in self._used.items():
            grads = [(ids, rows.grad) for _, ids, rows in uses if rows.grad is not None]
            if not grads:
                continue
            if len(grads) == 1:  # one use: its ids are unique already (Embedding.lookup)
                out[name] = grads[0]
                continue
            ids = torch.cat([i for i, _ in grads])
            values = torch.cat([g for _, g in grads])
            unique, inverse = torch.unique(ids, return_inverse=True)
            summed = torch.zeros(unique.numel(), values.shape[1]).index_add_(0, inverse, values)
            out[name] = (unique, summed)
        return out

    def ids(self) -> dict[str, torch.Tensor]:
        """Per table, the unique ids the step read."""
        return {name: torch.unique(torch.cat([ids for _, ids, _ in uses])) for name, uses in self._used.items()}


_STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar("psgrid_sparse_step", default=None)


@contextlib.contextmanager
def rows_from(source: RowSource) -> Iterator[Step]:
    """Bind ``source`` for the forward and backward passes of one step."""
    step = Step(source)
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)


class Embedding(nn.Module):
    """``nn.Embedding(num_rows, dim)`` whose table lives on the parameter servers.

    It holds no rows and no parameters: each forward pass fetches the rows of
    the unique ids it is given from the step's :class:`RowSource`. ``optimizer``,
    ``lr`` and the rest describe the table (:class:`TableSpec`); its name is the
    module's path in the model (:func:`tables`).
    """

    def __init__(self, num_rows: int, dim: int, **table: object):
        super().__init__()
        self.table = TableSpec("unnamed", num_rows, dim, **table)
        #: Where rows come from outside a training step (a trained model: :meth:`bind`).
        self.source: RowSource | None = None

    def bind(self, source: RowSource | None) -> "Embedding":
        """Read rows from ``source`` whenever no step binds them (inference on a trained
        model: ``Job.model()`` binds the servers, or rows held in memory)."""
        self.source = source
        return self

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any shape) -> [*ids.shape, dim], differentiable in the rows."""
        step = _STEP.get()
        if step is None and self.source is None:
            raise RuntimeError(f"table {self.table.name}: a psgrid.sparse table needs its rows bound "
                               "(psgrid.sparse.rows_from, or Embedding.bind); a worker binds them around "
                               "each step, Job.model() binds the servers")
        ids = ids.to(torch.int64)
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        unique = unique.cpu()
        check_ids(unique, self.table)
        if step is None:
            rows = self.source.rows(self.table, unique).detach()
        else:
            rows = step.rows(self.table, unique, grad=torch.is_grad_enabled())  # on the CPU, as they came
        return rows.to(ids.device)[inverse].reshape(*ids.shape, self.table.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)

    def extra_repr(self) -> str:
        return f"{self.table.name}: {self.table.num_rows or 'unbounded'} x {self.table.dim}, {self.table.optimizer}"


class EmbeddingBag(Embedding):
    """``nn.EmbeddingBag`` (mode "sum" or "mean") on a server-side table: ``ids`` is 2-D
    [bags, ids per bag], or 1-D with ``offsets`` (each bag's start), as in torch."""

    def __init__(self, num_rows: int, dim: int, mode: str = "mean", **table: object):
        super().__init__(num_rows, dim, **table)
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        self.mode = mode

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() == 2:
            rows = self.lookup(ids)
            return rows.sum(1) if self.mode == "sum" else rows.mean(1)
        if offsets is None:
            raise ValueError("1-D ids need offsets")
        rows = self.lookup(ids)
        bags = torch.bucketize(torch.arange(ids.numel()), offsets[1:], right=True)
        out = torch.zeros(offsets.numel(), self.table.dim).index_add_(0, bags, rows)
        if self.mode == "mean":
            counts = torch.bincount(bags, minlength=offsets.numel()).clamp_(min=1)
            out = out / counts.unsqueeze(1)
        return out


def tables(model: nn.Module) -> dict[str, TableSpec]:
    """Name each server-side table of ``model`` by its module path; return them by name."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, Embedding):
            module.table = dataclasses.replace(module.table, name=path or "table")
            found[module.table.name] = module.table
    return found
