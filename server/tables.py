"""The rows of one shard's part of an embedding table, and the sparse optimizers.

:class:`Table` holds only the rows that were ever updated (and their optimizer
state), in tensors that grow by doubling; a row never written is computed by
:func:`psgrid.sparse.initial_rows` when it is read. Nothing here allocates
``num_rows x dim``.

Each optimizer updates the touched rows only and mirrors its torch counterpart
on ``nn.Embedding(sparse=True)`` (same operations in the same order): "sgd" is
``torch.optim.SGD``, "adagrad" ``torch.optim.Adagrad`` (its sparse path),
"sparse_adam" ``torch.optim.SparseAdam`` (lazy: a row's moments move only when
the row is touched; the bias correction counts every step of the table).
"rowwise_adagrad" keeps one accumulator per row, the running sum of the row's
mean squared gradient. ``apply`` takes unique ids and their summed gradients.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from psgrid.errors import InvalidArgument, NonFiniteGradient, PayloadTooLarge
from psgrid.server.optim import magnitude
from psgrid.sparse import RowIndex, TableSpec, check_ids, initial_rows

#: Bytes of initial values of rows never written that a table keeps from pulls for the next update.
FRESH_CACHE_BYTES = 64 << 20

#: State rows each optimizer keeps, with their width ("dim" or 1) and start value.
_STATE = {"sgd": {}, "adagrad": {"sum": "dim"}, "rowwise_adagrad": {"sum": 1},
          "sparse_adam": {"exp_avg": "dim", "exp_avg_sq": "dim"}}


def _finite(*tensors: torch.Tensor) -> bool:
    return math.isfinite(magnitude(tensors))  # one pass each: faster than isfinite().all()


class Table:
    """One shard's rows of a table: touched rows, their optimizer state, the step count."""

    def __init__(self, spec: TableSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.index = RowIndex()
        self.ids = torch.empty(0, dtype=torch.int64)  # slot -> id
        self.rows = torch.empty(0, spec.dim)
        self.state = {name: torch.empty(0, spec.dim if width == "dim" else 1)
                      for name, width in _STATE[spec.optimizer].items()}
        #: Optimizer steps applied to this table (SparseAdam's bias correction counts them).
        self.steps = 0
        #: Initial values of rows never written that pulls computed since the last update.
        self._fresh: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fresh_count = 0

    @property
    def touched(self) -> int:
        """Rows held (ever updated)."""
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return (self.rows.numel() + sum(s.numel() for s in self.state.values())) * 4 + self.ids.numel() * 8

    # --- reading ---------------------------------------------------------------------------

    def _slots_of(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.index.get(ids.numpy()))

    def lookup(self, ids: torch.Tensor, remember: bool = False) -> torch.Tensor:
        """The current rows of ``ids`` (float32 [n, dim]); writes nothing. ``remember``: keep
        the initial values computed for rows never written, for the update that follows
        (a worker's pull: its push will touch the same rows)."""
        check_ids(ids, self.spec)
        slots = self._slots_of(ids)
        fresh = torch.from_numpy(np.flatnonzero(slots.numpy() < 0))
        if fresh.numel() == ids.numel():
            out = torch.empty(ids.numel(), self.spec.dim)
        else:
            out = self.rows.index_select(0, slots.clamp_(min=0))  # fresh rows' places filled below
        if fresh.numel():
            fresh_ids = ids.index_select(0, fresh)
            rows = initial_rows(fresh_ids, self.spec, self.seed)
            out.index_copy_(0, fresh, rows)
            if remember:
                self._remember(fresh_ids, rows)
        return out

    def _remember(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        if (self._fresh_count + ids.numel()) * self.spec.row_bytes > FRESH_CACHE_BYTES:
            self._fresh.clear()
            self._fresh_count = 0
        self._fresh.append((ids, rows))
        self._fresh_count += ids.numel()

    def _initial(self, ids: torch.Tensor) -> torch.Tensor:
        """Initial rows of ``ids`` (never written), from the pulls' cache where it has them."""
        if not self._fresh:
            return initial_rows(ids, self.spec, self.seed)
        known = torch.cat([i for i, _ in self._fresh])
        rows = torch.cat([r for _, r in self._fresh])
        order = torch.argsort(known)
        known = known[order]
        at = torch.searchsorted(known, ids).clamp_(max=known.numel() - 1)
        hit = known[at] == ids
        out = torch.empty(ids.numel(), self.spec.dim)
        out[hit] = rows[order[at[hit]]]
        if not bool(hit.all()):
            out[~hit] = initial_rows(ids[~hit], self.spec, self.seed)
        return out

    # --- updating --------------------------------------------------------------------------

    def _materialise(self, ids: torch.Tensor) -> torch.Tensor:
        """Slots of ``ids`` (unique), creating the missing rows at their initial values."""
        slots = self._slots_of(ids)
        missing = slots < 0
        if missing.any():
            new_ids = ids[missing]
            first, end = len(self.index), len(self.index) + new_ids.numel()
            self._reserve(end)
            new_slots = torch.arange(first, end)
            self.ids[first:end] = new_ids
            self.rows[first:end] = self._initial(new_ids)
            start = self.spec.initial_accumulator_value if self.spec.optimizer == "adagrad" else 0.0
            for name, tensor in self.state.items():
                tensor[first:end] = start if name == "sum" else 0.0
            self.index.add(new_ids.numpy(), new_slots.numpy())
            slots[missing] = new_slots
        return slots

    def _reserve(self, size: int) -> None:
        capacity = self.rows.shape[0]
        if size <= capacity:
            return
        grown = max(size, 2 * capacity, 1024)

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty((grown, *t.shape[1:]), dtype=t.dtype)
            out[:capacity] = t
            return out

        self.ids, self.rows = grow(self.ids), grow(self.rows)
        self.state = {name: grow(t) for name, t in self.state.items()}

    def check_update(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """InvalidArgument (nothing changed) unless ``ids`` are valid unique row ids and
        ``grads`` their finite float32 [len(ids), dim] gradients."""
        check_ids(ids, self.spec, unique=True)
        if grads.dtype != torch.float32 or tuple(grads.shape) != (ids.numel(), self.spec.dim):
            raise InvalidArgument(f"table {self.spec.name}: {ids.numel()} ids need float32 gradient rows "
                                  f"[{ids.numel()}, {self.spec.dim}], got {str(grads.dtype).removeprefix('torch.')}"
                                  f"{list(grads.shape)}")
        if not _finite(grads):
            raise NonFiniteGradient(f"table {self.spec.name}: gradient rows hold NaN or Inf")

    def apply(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """One optimizer step on the rows ``ids`` (unique) with their gradients; NonFiniteGradient
        (nothing changed) when the rows or their state would not be finite."""
        self.prepare(ids, grads)()

    def prepare(self, ids: torch.Tensor, grads: torch.Tensor) -> Callable[[], None]:
        """Compute one optimizer step aside and check it; return what writes it.

        NonFiniteGradient when a row or its state would not be finite: then nothing
        changed (rows never written may now be held, at their initial values, which
        read the same). The returned call writes the step; nothing in between may
        touch this table (the caller holds the job's lock)."""
        self.check_update(ids, grads)
        steps = self.steps + 1
        if ids.numel() == 0:
            return lambda: self._commit(steps, None, None, {})
        slots = self._materialise(ids)
        w = self.rows.index_select(0, slots)  # a copy: written back by the commit
        spec, kind, state = self.spec, self.spec.optimizer, {}
        if kind == "sgd":
            w.add_(grads, alpha=-spec.lr)
        elif kind in ("adagrad", "rowwise_adagrad"):
            squares = grads.pow(2) if kind == "adagrad" else grads.pow(2).mean(dim=1, keepdim=True)
            state["sum"] = total = self.state["sum"].index_select(0, slots).add_(squares)
            w.add_(grads / total.sqrt().add_(spec.eps), alpha=-spec.lr)
        else:  # sparse_adam, as torch.optim.SparseAdam computes it
            b1, b2 = spec.betas
            old_avg, old_sq = self.state["exp_avg"].index_select(0, slots), self.state["exp_avg_sq"].index_select(0, slots)
            avg_update = grads.sub(old_avg).mul_(1 - b1)
            sq_update = grads.pow(2).sub_(old_sq).mul_(1 - b2)
            state["exp_avg"] = numer = avg_update.add(old_avg)
            state["exp_avg_sq"] = sq = sq_update.add(old_sq)
            denom = sq.sqrt().add_(spec.eps)
            step_size = spec.lr * math.sqrt(1 - b2 ** steps) / (1 - b1 ** steps)
            w.add_(-step_size * numer.div(denom))
        if not _finite(w, *state.values()):
            raise NonFiniteGradient(f"table {spec.name}: this update would make rows or their optimizer "
                                    "state non-finite; nothing was applied")
        return lambda: self._commit(steps, slots, w, state)

    def _commit(self, steps: int, slots: torch.Tensor | None, rows: torch.Tensor | None,
                state: dict[str, torch.Tensor]) -> None:
        self.steps = steps
        if slots is not None:
            self.rows.index_copy_(0, slots, rows)
            for name, value in state.items():
                self.state[name].index_copy_(0, slots, value)
        self._fresh.clear()
        self._fresh_count = 0

    # --- checkpoints -----------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the held ids, their rows and state (copies, trimmed)."""
        n = len(self.index)
        out = {"ids": self.ids[:n].clone(), "rows": self.rows[:n].clone()}
        out.update({f"state.{name}": t[:n].clone() for name, t in self.state.items()})
        out["steps"] = torch.tensor([self.steps], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, spec: TableSpec, seed: int, tensors: dict[str, torch.Tensor]) -> "Table":
        """The table a checkpoint's :meth:`tensors` describe; InvalidArgument when they do not fit ``spec``."""
        table = cls(spec, seed)
        if set(tensors) != {"ids", "rows", "steps", *(f"state.{s}" for s in table.state)}:
            raise InvalidArgument(f"table {spec.name}: checkpoint tensors do not fit the table")
        ids, rows = tensors["ids"], tensors["rows"]
        n = ids.numel()
        check_ids(ids, spec, unique=True)
        if tuple(rows.shape) != (n, spec.dim) or rows.dtype != torch.float32 \
                or any(tuple(tensors[f"state.{s}"].shape) != (n, t.shape[1]) for s, t in table.state.items()):
            raise InvalidArgument(f"table {spec.name}: checkpoint tensors do not fit the table")
        table._reserve(n)
        table.ids[:n], table.rows[:n] = ids, rows
        for name, t in table.state.items():
            t[:n] = tensors[f"state.{name}"]
        table.index = RowIndex(ids.numpy())
        if tensors["steps"].numel() != 1:
            raise InvalidArgument(f"table {spec.name}: checkpoint tensors do not fit the table")
        table.steps = int(tensors["steps"].reshape(-1)[0])
        return table


#: Parts one step's row gradients may come in (PushRowsRequest.parts).
MAX_PARTS = 4096
#: Bytes of row gradients (ids and values) one worker may have staged at once on a server.
MAX_STAGED_BYTES = 1 << 30

Rows = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class StagedRows:
    """One worker's row gradients of step ``seq`` as their parts arrive (PushRows)."""

    seq: int
    parts: int
    received: dict[int, Rows] = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.received) == self.parts

    def receive(self, part: int, rows: Rows) -> None:
        """Keep part ``part`` (replacing itself if sent again); PayloadTooLarge past MAX_STAGED_BYTES."""
        size = _nbytes(rows)
        held = sum(_nbytes(r) for p, r in self.received.items() if p != part)
        if held + size > MAX_STAGED_BYTES:
            raise PayloadTooLarge(f"{held + size} bytes of row gradients staged for one push; at most "
                                  f"{MAX_STAGED_BYTES}")
        self.received[part] = rows

    def merged(self, tables: "JobTables") -> Rows:
        """Every part's rows by table; InvalidArgument when two parts carry the same row."""
        by_table: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for part in sorted(self.received):
            for name, pair in self.received[part].items():
                by_table.setdefault(name, []).append(pair)
        out = {}
        for name, pairs in by_table.items():
            if len(pairs) == 1:  # checked whole when its part came (PushRows)
                out[name] = pairs[0]
                continue
            ids, grads = torch.cat([i for i, _ in pairs]), torch.cat([g for _, g in pairs])
            tables.table(name).check_update(ids, grads)  # a row in two parts
            out[name] = (ids, grads)
        return out


def _nbytes(rows: Rows) -> int:
    return sum(ids.numel() * 8 + grads.numel() * 4 for ids, grads in rows.values())


class JobTables:
    """One shard's tables of a job, and the row gradients of the round being gathered.

    Synchronous jobs stage each worker's row gradients of round ``seq``
    (:meth:`stage`) and apply them all with the dense update of that round
    (:meth:`apply_round`): every row update of round t lands before anyone
    reads round t+1, and the combination is the dense one, the mean over
    workers weighted by their examples. A worker's second push of a round
    replaces its first (a retry), so nothing is counted twice. Asynchronous
    jobs apply a push's rows on arrival (:meth:`apply_now`).
    """

    def __init__(self, specs: dict[str, TableSpec], seed: int):
        self.seed = seed
        self.tables = {name: Table(spec, seed) for name, spec in specs.items()}
        #: worker -> (seq, samples, {table: (ids, grads)}) of the round being gathered.
        self._staged: dict[str, tuple[int, int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}

    def specs(self) -> dict[str, TableSpec]:
        return {name: table.spec for name, table in self.tables.items()}

    @property
    def touched(self) -> int:
        """Rows held, over every table."""
        return sum(table.touched for table in self.tables.values())

    def reset(self) -> None:
        """Forget the round being gathered (its workers compute it again)."""
        self._staged.clear()

    # --- checkpoints: every table's tensors under "<table>/<tensor>" ---------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{key}": t for name, table in self.tables.items() for key, t in table.tensors().items()}

    @classmethod
    def from_tensors(cls, specs: dict[str, TableSpec], seed: int, tensors: dict[str, torch.Tensor]) -> "JobTables":
        """The tables a checkpoint's :meth:`tensors` describe; InvalidArgument when they do not fit."""
        out = cls({}, seed)
        for name, spec in specs.items():
            prefix = f"{name}/"
            own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            out.tables[name] = Table.from_tensors(spec, seed, own)
        if len(tensors) != sum(len(t.tensors()) for t in out.tables.values()):
            raise InvalidArgument("checkpoint table tensors name a table the job does not have")
        return out

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise InvalidArgument(f"no table {name!r} in this job (tables: {sorted(self.tables)})") from None

    def check(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """InvalidArgument unless every (ids, grads) fits its table; nothing is changed."""
        for name, (ids, grads) in rows.items():
            self.table(name).check_update(ids, grads)

    def stage(self, worker: str, seq: int, samples: int, rows: dict[str, tuple[torch.Tensor, torch.Tensor]],
              checked: bool = False) -> None:
        """Hold ``worker``'s row gradients of round ``seq`` (computed on ``samples`` examples).
        ``checked``: they passed :meth:`check` already and are this table's to keep (no copy)."""
        if checked:
            self._staged[worker] = (seq, samples, dict(rows))
            return
        self.check(rows)
        self._staged[worker] = (seq, samples, {n: (i.clone(), g.clone()) for n, (i, g) in rows.items()})

    def staged(self, seq: int) -> set[str]:
        return {w for w, (s, _, _) in self._staged.items() if s == seq}

    def apply_round(self, seq: int) -> None:
        """Apply round ``seq``: per table, the examples-weighted mean of the staged gradients."""
        self.prepare_round(seq)()

    def prepare_round(self, seq: int) -> Callable[[], None]:
        """Compute round ``seq``'s update of every table aside (NonFiniteGradient, nothing
        changed, when one would not be finite); return what writes them and forgets the round."""
        entries = [(samples, rows) for s, samples, rows in self._staged.values() if s == seq]
        total = sum(samples for samples, _ in entries)
        commits = []
        for name, table in self.tables.items():
            parts = [(rows[name][0], rows[name][1] * (samples / total)) for samples, rows in entries if name in rows]
            if not parts:  # no worker reached the table: torch skips a parameter without a gradient
                continue
            ids = torch.cat([i for i, _ in parts])
            unique, inverse = torch.unique(ids, return_inverse=True)
            summed = torch.zeros(unique.numel(), table.spec.dim).index_add_(0, inverse, torch.cat([g for _, g in parts]))
            commits.append(table.prepare(unique, summed))

        def commit() -> None:
            for write in commits:
                write()
            self.drop_round(seq)
        return commit

    def unstage(self, worker: str) -> None:
        """Forget what ``worker`` staged (its push was not counted after all)."""
        self._staged.pop(worker, None)

    def drop_round(self, seq: int) -> None:
        """Forget what was staged for ``seq`` and earlier (a round restarted or applied)."""
        self._staged = {w: entry for w, entry in self._staged.items() if entry[0] > seq}

    def apply_now(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0) -> None:
        """Asynchronous jobs: apply one push's rows as they arrive."""
        self.prepare_now(rows, scale)()

    def prepare_now(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    scale: float = 1.0) -> Callable[[], None]:
        """Asynchronous jobs: one push's update of every table, computed aside and checked
        (its gradients times ``scale``: ``scale_stale``); return what writes it."""
        self.check(rows)
        commits = [self.tables[name].prepare(ids, grads if scale == 1.0 else grads * scale)
                   for name, (ids, grads) in rows.items()]

        def commit() -> None:
            for write in commits:
                write()
        return commit
