"""The user-facing SDK: :class:`Client` and :class:`Job`."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from psgrid.client.job_client import JobServiceClient
from psgrid.client.progress import Progress
from psgrid.errors import JobCancelled, JobFailed
from psgrid.security import Security
from psgrid.spec import HistoryRow, JobEvent, JobInfo, JobSpec, JobState, WorkerStatus

if TYPE_CHECKING:  # torch loads when parameters are fetched: `psgrid jobs` answers in a blink
    import torch
    from torch import nn


class Job:
    """A handle on one submitted job."""

    def __init__(self, client: "Client", info: JobInfo):
        self._client = client
        self.job_id = info.job_id
        self.spec = info.spec
        self._info = info

    def __repr__(self) -> str:
        return f"Job({self.job_id!r}, {self._info.state.value})"

    def status(self) -> JobInfo:
        """A fresh snapshot from the server."""
        self._info = self._client._rpc.get(self.job_id)
        return self._info

    def shard_infos(self) -> list[JobInfo]:
        """The job as each server holding part of it sees it (the coordinator first):
        each counts its own traffic and embedding-table rows."""
        info = self.status()
        clients = self._client._shard_clients(info.shards)
        return [info, *(rpc.get(self.job_id) for rpc in clients[1:])]

    def events(self, from_seq: int = 0, timeout: float | None = None) -> Iterator[JobEvent]:
        """Progress events (step, loss, samples/s, state changes) until the job ends."""
        yield from self._client._rpc.watch(self.job_id, from_seq, timeout)

    def history(self) -> list[HistoryRow]:
        """The job's training curve as rows: step, time, loss, samples/s, metrics."""
        return self._client._rpc.history(self.job_id)

    def write_tensorboard(self, logdir: str) -> int:
        """Write the job's curve as TensorBoard event files under ``logdir``; return the row count."""
        from psgrid.client.curves import write_tensorboard

        return write_tensorboard(self.history(), logdir, self.job_id)

    def cancel(self) -> JobInfo:
        self._info = self._client._rpc.cancel(self.job_id)
        return self._info

    def wait(self, timeout: float | None = None, progress: bool = True,
             stream: TextIO | None = None) -> JobInfo:
        """Block until the job ends; show progress. Raises JobFailed / JobCancelled."""
        bar = Progress(self.job_id, stream) if progress else None
        info = self._info
        try:
            for event in self.events(timeout=timeout):
                info = event.job
                if bar:
                    bar.update(info)
            info = self.status()
        finally:
            if bar:
                bar.close(info)
        self._info = info
        if info.state is JobState.FAILED:
            raise JobFailed(f"job {self.job_id} failed: {info.error}")
        if info.state is JobState.CANCELLED:
            raise JobCancelled(f"job {self.job_id} was cancelled")
        return info

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The job's current parameters, by name (copies; safe to keep).

        For a sharded job every shard's part is fetched and the whole tensors
        are put back together.
        """
        from psgrid.partition import assemble

        parts = []
        for rpc in self._client._shard_clients(self.status().shards):
            pulled = rpc.fetch(self.job_id)
            parts.append({k: v.clone() for k, v in pulled.layout.views(pulled.buffer).items()})
        return assemble(parts)

    def model(self, tables_in_memory: bool = False) -> nn.Module:
        """The job's model built from its import path, with the trained weights loaded.

        Its embedding tables (psgrid.sparse) read their rows from the servers as it
        runs, or, with ``tables_in_memory``, are fetched whole now (each needs its
        ``num_rows``; for tables that fit in this process's memory).
        """
        from psgrid import sparse
        from psgrid.build import build_model

        model = build_model(self.spec)
        # The server holds trainable parameters only; buffers keep their initial values.
        result = model.load_state_dict(self.state_dict(), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"the job's parameters do not fit {self.spec.model}: {result.unexpected_keys}")
        tables = sparse.tables(model)
        if tables_in_memory:
            import torch

            unbounded = [name for name, t in tables.items() if not t.num_rows]
            if unbounded:
                raise ValueError(f"tables {unbounded} have no num_rows: they cannot be fetched whole")
            source = sparse.MemoryRows({name: self.embedding(name).lookup(torch.arange(t.num_rows))
                                        for name, t in tables.items()})
        else:
            source = _ServerRows(self)
        for module in model.modules():
            if isinstance(module, sparse.Embedding):
                module.bind(source)
        model.eval()
        return model

    def row_source(self) -> "_ServerRows":
        """The job's servers as the source of its tables' rows (psgrid.sparse.RowSource):
        rows as they are when read."""
        return _ServerRows(self)

    def embedding(self, name: str) -> "TableRows":
        """Read access to the job's embedding table ``name`` (its module path in the model)."""
        return TableRows(self, name)


class TableRows:
    """Rows of one embedding table of a job, by id, from the servers holding them."""

    def __init__(self, job: Job, name: str, shards: tuple[str, ...] | None = None):
        #: The job's other shards; None: asked for at each lookup (a served model passes them once).
        self.job, self.name, self.shards = job, name, shards
        self._spec = None

    def lookup(self, ids) -> torch.Tensor:
        """float32 [*ids.shape, dim]: the rows of ``ids`` as the servers hold them now."""
        import torch

        from psgrid import sparse

        ids = torch.as_tensor(ids, dtype=torch.int64)
        flat = ids.reshape(-1)
        unique, inverse = torch.unique(flat, return_inverse=True)
        shards = self.shards if self.shards is not None else self.job.status().shards
        clients = self.job._client._shard_clients(shards)
        where = sparse.shard_of(unique, sparse.TableSpec(self.name, 0, 1), len(clients))
        if self._spec is None:  # the rows' width, from an empty lookup: it sets how many ids a call takes
            self._spec, _ = clients[0].lookup_rows(self.job.job_id, self.name, unique[:0])
        out = torch.empty(unique.numel(), self._spec.dim)
        per_call = max(1, sparse.ROWS_BYTES // self._spec.row_bytes)
        for shard, rpc in enumerate(clients):
            mine = (where == shard).nonzero().reshape(-1)
            start = 0
            while start < mine.numel():
                some = mine[start:start + per_call]
                out[some] = rpc.lookup_rows(self.job.job_id, self.name, unique[some])[1]
                start += some.numel()
        return out[inverse].reshape(*ids.shape, out.shape[1])


class _ServerRows:
    """A trained model's rows, read from the job's servers as it runs (psgrid.sparse.RowSource)."""

    def __init__(self, job: Job):
        self.job = job
        self._shards = job.status().shards  # a job's shards never change
        self._tables: dict[str, TableRows] = {}

    def rows(self, table, ids):
        if table.name not in self._tables:
            self._tables[table.name] = TableRows(self.job, table.name, self._shards)
        return self._tables[table.name].lookup(ids)


class Client:
    """Talks to a psgrid cluster's JobService at ``address`` ("host:port").

    ``security`` carries the cluster token and TLS files
    (``Security.from_files(token_file=..., ca=..., cert=..., key=...)``).
    A server that cannot be reached at the first call is a mistake, raised at
    once with its cause and fix (``ServerNotRunning``, ``TlsMismatch``,
    ``CertificateProblem``, all ``psgrid.errors.Unavailable``); once connected,
    calls ride through a server restart.
    """

    def __init__(self, address: str, timeout: float = 30.0, security: Security | None = None):
        self.address = address
        self._security = security
        self._rpc = JobServiceClient(address, timeout_s=timeout, security=security, check_first=True)
        self._shards: dict[str, JobServiceClient] = {}

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._rpc.close()
        for rpc in self._shards.values():
            rpc.close()

    def _shard_clients(self, shards: tuple[str, ...]) -> list[JobServiceClient]:
        """The coordinator's client, then one per other shard (kept for reuse)."""
        for address in shards:
            if address not in self._shards:
                self._shards[address] = JobServiceClient(address, timeout_s=self._rpc.timeout_s,
                                                         security=self._security, check_first=True)
        return [self._rpc, *(self._shards[a] for a in shards)]

    def submit(self, spec: JobSpec) -> Job:
        return Job(self, self._rpc.submit(spec))

    def job(self, job_id: str) -> Job:
        """A handle on an existing job; NotFound when there is none."""
        return Job(self, self._rpc.get(job_id))

    def list_jobs(self) -> list[JobInfo]:
        return self._rpc.list()

    def workers(self) -> list[WorkerStatus]:
        """Every worker registered with the server, and what it is doing."""
        return self._rpc.workers()
