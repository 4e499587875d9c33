"""A worker's links to every parameter-server shard of its current job.

Shard 0 is the coordinator the worker registered with; the others come with
the assignment. The worker is registered on each under the same name, so a
restarted worker takes its rank back everywhere. Pulls and pushes go to all
shards at once.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from psgrid import sparse
from psgrid.codec import Layout, Pulled
from psgrid.errors import PsgridError, ShardsDiverged, UnknownCheckpoint, UnknownWorker
from psgrid.security import Security
from psgrid.sparse import TableSpec
from psgrid.spec import Encoding, JobState
from psgrid.worker.ps_client import Assignment, ParameterServerClient, push_header

logger = logging.getLogger(__name__)

#: Listings of the shards' snapshots one realignment makes at most (one per bad snapshot met).
REALIGN_LISTINGS = 3


def diverged(pulled: list[Pulled], synchronous: bool) -> bool:
    """In BSP every shard serves step t, with the same lineage and the same clock
    for the worker, to a pull for step t. Anything else means the shards drifted
    apart (one restarted from an older checkpoint, one applied a round without a
    worker that another waited for, or a worker's push reached some shards
    only), and computing on the mix would be wrong."""
    return synchronous and len({(p.step, p.lineage, p.clock) for p in pulled if p.layout is not None}) > 1


class ShardLinks:
    """Clients and per-shard worker ids for one job; shard 0 is the coordinator."""

    def __init__(self, coordinator: ParameterServerClient, worker_id: Callable[[], str],
                 name: str, register_args: tuple, security: Security | None):
        self.coordinator = coordinator
        self._coordinator_id = worker_id
        self.name = name
        self._register_args = register_args
        self._security = security
        self._clients: dict[str, ParameterServerClient] = {}
        self._ids: dict[str, str] = {}
        self.addresses: tuple[str, ...] = ()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def count(self) -> int:
        return 1 + len(self.addresses)

    def client(self, shard: int) -> ParameterServerClient:
        return self.coordinator if shard == 0 else self._clients[self.addresses[shard - 1]]

    def worker_id(self, shard: int) -> str:
        return self._coordinator_id() if shard == 0 else self._ids[self.addresses[shard - 1]]

    def open(self, a: Assignment) -> None:
        """Register with every other shard of ``a`` and make each hold its part."""
        addresses = tuple(a.shards)
        for index, address in enumerate(addresses, start=1):
            if address not in self._clients:
                self._clients[address] = ParameterServerClient(
                    address, security=self._security, stop=self.coordinator.stop,
                    shared_memory=getattr(self.coordinator, "shared_memory", True))
            self._ids[address] = self._clients[address].register(self.name, *self._register_args)[0]
            self._clients[address].open_partition(a.job_id, a.spec, list(a.worker_names), index,
                                                  1 + len(addresses))
        # Published last: the heartbeat thread reads it, and every id is known by now.
        self.addresses = addresses
        if self.count > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="shard-io")

    def _each(self, fn: Callable[[int], object]) -> list:
        if self.count == 1:
            return [fn(0)]
        return list(self._pool.map(fn, range(self.count)))

    def pull(self, job_id: str, clock: int, buffer_for: Callable[[int], Callable[[int], torch.Tensor]],
             first: int = 0, wait_s: float | None = None) -> list[Pulled]:
        """Weights for step ``clock`` from every shard from ``first`` on; with ``wait_s``,
        NotReady from a shard that cannot serve it within about that long."""
        def one(shard: int) -> Pulled:
            return self.client(shard).pull(job_id, self.worker_id(shard), clock, False, buffer_for(shard),
                                           wait_s=wait_s)
        if first >= self.count:
            return []
        if self.count - first == 1:
            return [one(first)]
        return list(self._pool.map(one, range(first, self.count)))

    def push_buffer(self, job_id: str, shard: int, nbytes: int) -> torch.Tensor | None:
        """Where shard ``shard``'s next push of ``nbytes`` is best written: its step stream's
        push segment in shared memory, when it has one that large (None: anywhere)."""
        segment = self.client(shard).push_segment(job_id, self.worker_id(shard))
        return segment[:nbytes] if segment is not None and segment.numel() >= nbytes else None

    def push(self, job_id: str, seq: int, pulled: list[Pulled], layouts: tuple[Layout, ...],
             payloads: list[torch.Tensor], init: bool = False, samples: int = 0,
             ranks: tuple[int, ...] = (), then_pull_s: float | None = None,
             encoding: Encoding | None = None, tables: tuple[TableSpec, ...] = (),
             row_tables: list[int] | None = None) -> None:
        """Push step ``seq``'s gradient (computed on ``ranks``' data) to every shard at once;
        ``then_pull_s``: ask each for the next step's weights right behind it. ``encoding``:
        the payloads are encoded as the job's compression says. ``tables``: an init push's
        embedding tables; ``row_tables``: per shard, the tables whose rows :meth:`push_rows`
        staged for this push."""
        def one(shard: int) -> object:
            base = pulled[shard] if pulled else None
            # Each shard's own clock: in SSP and async a restarted shard may be behind.
            header = push_header(job_id, self.worker_id(shard), self._seq(pulled, shard, seq),
                                 base.version if base else 0, base.step if base else 0, layouts[shard], init=init,
                                 ranks=ranks, encoding=encoding, payload_bytes=payloads[shard].numel(),
                                 tables=tables, row_tables=row_tables[shard] if row_tables else 0)
            header.samples = samples
            return self.client(shard).push(header, payloads[shard], then_pull_s)
        self._each(one)

    @staticmethod
    def _seq(pulled: list[Pulled], shard: int, seq: int) -> int:
        return pulled[shard].clock if pulled else seq

    # --- embedding tables: each row on the shard psgrid.sparse.shard_of names -----------------

    def rows(self, job_id: str, table: TableSpec, ids: torch.Tensor) -> torch.Tensor:
        """The current rows of the unique ``ids`` of ``table``: one call per shard holding
        some of them, all at once."""
        if self.count == 1:
            return self.client(0).pull_rows(job_id, self.worker_id(0), table, ids)
        where = sparse.shard_of(ids, table, self.count)
        out = torch.empty(ids.numel(), table.dim)

        def one(shard: int) -> None:
            mine = where == shard
            if mine.any():
                out[mine] = self.client(shard).pull_rows(job_id, self.worker_id(shard), table, ids[mine])
        self._each(one)
        return out

    def row_source(self, job_id: str) -> sparse.RowSource:
        """The servers as the source of a step's rows (psgrid.sparse.rows_from)."""
        links = self

        class ServerRows:
            def rows(self, table: TableSpec, ids: torch.Tensor) -> torch.Tensor:
                return links.rows(job_id, table, ids)
        return ServerRows()

    def push_rows(self, job_id: str, seq: int, pulled: list[Pulled], tables: dict[str, TableSpec],
                  rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
        """Stage step ``seq``'s row gradients on the shards holding the rows, all at once;
        return the tables staged on each shard (every table the step reached, on every
        shard: one whose rows all live elsewhere is staged there with none)."""
        per_shard: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(self.count)]
        for name, (ids, grads) in rows.items():
            where = sparse.shard_of(ids, tables[name], self.count)
            for shard in range(self.count):
                mine = where == shard
                per_shard[shard][name] = (ids[mine], grads[mine]) if self.count > 1 else (ids, grads)

        def one(shard: int) -> None:
            self.client(shard).push_rows(job_id, self.worker_id(shard), self._seq(pulled, shard, seq),
                                         per_shard[shard])
        self._each(one)
        return [len(p) for p in per_shard]

    def split(self, job_id: str) -> bool:
        """Whether the shards disagree on where the job is for this worker: step, lineage
        or its clock (a push that reached some shards only, then a restart, can leave a
        pull waiting for ever on a shard where this worker already pushed)."""
        at = self._each(lambda shard: self.client(shard).restore_points(job_id, self.worker_id(shard)))
        return len({(a.step, a.lineage, a.clock) for a in at}) > 1

    def realign(self, job_id: str) -> int:
        """Put every shard of a BSP job back to the newest step-aligned snapshot all
        of them hold (same step, same lineage); return its step.

        Every shard goes back, the ones already at that step too: that also drops
        whatever each had gathered for the round after it. Raise ShardsDiverged
        when they hold no snapshot in common. Each roll-back is a compare-and-set
        on the timeline seen here, so workers realigning at once move each shard
        back once. A snapshot that turns out unreadable is deleted by its shard,
        and the snapshots are listed again.
        """
        for _ in range(REALIGN_LISTINGS - 1):
            try:
                return self._realign_once(job_id)
            except UnknownCheckpoint as exc:
                logger.warning("[worker %s] %s; looking again", self.name, exc)
        return self._realign_once(job_id)

    def _realign_once(self, job_id: str) -> int:
        at = self._each(lambda shard: self.client(shard).restore_points(job_id, self.worker_id(shard)))
        if len({(a.step, a.lineage, a.clock) for a in at}) == 1:
            # In step already: another worker realigned them since this one pulled,
            # or a round is half gathered. Pull again rather than undo more.
            return at[0].step
        common = set.intersection(*(set(a.points) for a in at))
        if not common:
            raise ShardsDiverged(f"the shards of job {job_id} are at steps {[a.step for a in at]} and hold "
                                 f"no snapshot in common to go back to: {[a.points for a in at]}")
        target = max(common)
        self._each(lambda shard: self.client(shard).roll_back(job_id, self.worker_id(shard), target,
                                                              at[shard].timeline))
        logger.warning("[worker %s] the shards of job %s were at steps %s: all put back to step %d",
                       self.name, job_id, [a.step for a in at], target[0])
        return target[0]

    def heartbeat_others(self, job_id: str) -> None:
        """Keep this worker alive on the other shards' liveness checks."""
        for address in self.addresses:
            if address not in self._ids:
                continue
            try:
                self._clients[address].heartbeat(self._ids[address], job_id)
            except UnknownWorker:  # that shard restarted: take our rank back there
                self._ids[address] = self._clients[address].register(self.name, *self._register_args)[0]
            except PsgridError as exc:
                logger.warning("[worker %s] heartbeat to shard %s failed: %s", self.name, address, exc)

    def close(self, job_id: str, state: JobState) -> None:
        """End the job's parts on the other shards (rank 0, once the job ended)."""
        for index in range(1, self.count):
            try:
                self.client(index).close_partition(job_id, self.worker_id(index), state)
            except PsgridError as exc:
                logger.warning("[worker %s] could not close shard %d of %s: %s", self.name, index, job_id, exc)

    def close_streams(self) -> None:
        """End this worker's step streams to every shard (its job ended)."""
        self.coordinator.close_streams()
        for client in list(self._clients.values()):
            client.close_streams()

    def hang_up(self) -> None:
        """Cancel every call in flight to the other shards (the worker is stopping:
        its clients' ``stop`` is set, so nothing calls them again)."""
        for client in list(self._clients.values()):
            client.close()
