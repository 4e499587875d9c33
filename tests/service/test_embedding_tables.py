"""Embedding tables on the servers (issue 14): real gRPC servers on 127.0.0.1:0, real
``psgrid.worker.runner.Worker``s in threads, rows pulled and pushed over the wire.

The BSP job must equal single-process torch (``nn.Embedding(sparse=True)`` with the
matching optimizer, the dense head with the job's, on the union of the workers'
batches) to 1e-5.
"""
from __future__ import annotations

import threading

import grpc
import pytest
import torch
from torch import nn

from psgrid import sparse
from psgrid.build import build_dataset, build_model, trainable
from psgrid.client import Client
from psgrid.client.status import job_lines, table_traffic
from psgrid.dataset import ShardSampler
from psgrid.errors import FailedPrecondition, PushAhead
from psgrid.server.app import ParameterServerApp
from psgrid.server.config import ServerConfig
from psgrid.spec import JobSpec, JobState, OptimizerSpec
from psgrid.v1 import parameter_server_pb2 as ps
from psgrid.worker.ps_client import ParameterServerClient
from psgrid.worker.runner import Worker

from helpers.wait import wait_until

USERS, ITEMS = 300, 120


def table_spec(optimizer: str, workers: int = 2, steps: int = 50) -> JobSpec:
    lr = {"sgd": 0.5, "adagrad": 0.1, "sparse_adam": 0.01, "rowwise_adagrad": 0.1}[optimizer]
    return JobSpec(model="psgrid.examples.recsys:two_tower",
                   model_kwargs={"num_users": USERS, "num_items": ITEMS, "dim": 8, "hidden": 16,
                                 "optimizer": optimizer, "lr": lr},
                   dataset="psgrid.examples.recsys:planted_ratings",
                   dataset_kwargs={"num_users": USERS, "num_items": ITEMS, "n": 4000, "test_n": 500},
                   steps=steps, batch_size=32, staleness=0, num_workers=workers, seed=5,
                   optimizer=OptimizerSpec("sgd", lr=0.05))


class Cluster:
    """``shards`` servers (the first coordinates) and ``workers`` worker threads."""

    def __init__(self, shards: int, workers: int):
        self.apps = [ParameterServerApp(ServerConfig(port=0, shard_name=f"shard-{k}", allowed_modules=("psgrid.examples",))).start() for k in range(1, shards)]
        others = tuple(app.address for app in self.apps)
        self.coordinator = ParameterServerApp(ServerConfig(port=0, shards=others, allowed_modules=("psgrid.examples",))).start()
        self.apps.insert(0, self.coordinator)
        self.clients = [ParameterServerClient(self.coordinator.address) for _ in range(workers)]
        self.workers = [Worker(c, name=f"w{i}", allowed_modules=("psgrid.examples",)) for i, c in enumerate(self.clients)]
        self.threads = [threading.Thread(target=w.run, daemon=True) for w in self.workers]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        for c in self.clients:
            c.stop.set()
        for t in self.threads:
            t.join(30)
        for app in self.apps:
            app.stop(grace=0.2)


@pytest.fixture
def cluster(request):
    shards, workers = getattr(request, "param", (2, 2))
    c = Cluster(shards, workers)
    yield c
    c.close()


def torch_reference(spec: JobSpec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The job run in one process: tables as nn.Embedding(sparse=True) starting from the
    servers' initial rows, each step on the union of the workers' batches."""
    model = build_model(spec)
    data = build_dataset(spec)
    tables = sparse.tables(model)
    embeddings = {}
    for name, table in tables.items():
        weight = sparse.initial_rows(torch.arange(table.num_rows), table, spec.seed)
        embeddings[name] = nn.Embedding(table.num_rows, table.dim, sparse=True, _weight=weight.clone())

    class Source:
        def rows(self, table, ids):
            return embeddings[table.name].weight[ids]

    make = {"sgd": lambda p, t: torch.optim.SGD(p, lr=t.lr),
            "adagrad": lambda p, t: torch.optim.Adagrad(p, lr=t.lr, eps=t.eps),
            "sparse_adam": lambda p, t: torch.optim.SparseAdam(p, lr=t.lr, betas=t.betas, eps=t.eps)}
    table_opts = [make[t.optimizer]([embeddings[n].weight], t) for n, t in tables.items()]
    dense = torch.optim.SGD([p for _, p in trainable(model)], lr=spec.optimizer.lr)
    samplers = [ShardSampler(len(data.train_x), r, spec.num_workers, spec.batch_size, spec.seed)
                for r in range(spec.num_workers)]

    class Bound(sparse.Step):
        """Rows straight from the nn.Embedding weights: autograd reaches them sparsely."""

        def rows(self, table, ids, grad):
            return embeddings[table.name](ids)

    for step in range(spec.steps):
        idx = torch.cat([s.indices(step) for s in samplers])
        for o in (*table_opts, dense):
            o.zero_grad()
        token = sparse._STEP.set(Bound(Source()))
        try:
            loss = data.loss_fn(model(data.train_x[idx]), data.train_y[idx])
        finally:
            sparse._STEP.reset(token)
        loss.backward()
        for o in (*table_opts, dense):
            o.step()
    return ({n: p.detach().clone() for n, p in trainable(model)},
            {n: e.weight.detach().clone() for n, e in embeddings.items()})


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "sparse_adam"])
def test_bsp_with_tables_on_two_shards_equals_single_process_torch(cluster, optimizer):
    spec = table_spec(optimizer)
    with Client(cluster.coordinator.address) as client:
        job = client.submit(spec)
        info = job.wait(timeout=120, progress=False)
        assert info.state is JobState.SUCCEEDED, info.error
        dense = job.state_dict()
        users, items = (job.embedding(name).lookup(torch.arange(n)) for name, n in (("users", USERS),
                                                                                    ("items", ITEMS)))
        infos = job.shard_infos()
        held, rate = table_traffic(infos[0], infos[1:])
        assert held == sum(i.rows_held for i in infos) > 0
        assert any("rows held on the servers" in line for line in job_lines(infos[0], infos[1:]))
        # the trained model reads its rows from the servers, or holds them whole
        x = build_dataset(spec).test_x[:64]
        with torch.no_grad():
            remote, local = job.model()(x), job.model(tables_in_memory=True)(x)
        torch.testing.assert_close(remote, local, atol=0, rtol=0)
    want_dense, want_tables = torch_reference(spec)
    for name, value in want_dense.items():
        torch.testing.assert_close(dense[name], value, atol=1e-5, rtol=0)
    torch.testing.assert_close(users, want_tables["users"], atol=1e-5, rtol=0)
    torch.testing.assert_close(items, want_tables["items"], atol=1e-5, rtol=0)
    # Both shards hold rows, and only touched ones.
    held = [app.core.job(job.job_id).tables.touched for app in cluster.apps]
    assert all(h > 0 for h in held) and sum(held) <= USERS + ITEMS, held


# --- bad input: the right status, and the table unchanged --------------------------------------

TABLE = sparse.TableSpec("emb", 100, 4, optimizer="sgd", lr=0.5)


def rows_request(rig, seq=0, ids=(1, 2), grads=None, table="emb", worker=0) -> ps.PushRowsRequest:
    ids = torch.tensor(ids, dtype=torch.int64)
    grads = torch.ones(len(ids), 4) if grads is None else grads
    return ps.PushRowsRequest(job_id=rig.job_id, worker_id=rig.workers[worker], seq=seq, tables=[
        ps.TableRows(table=table, ids=sparse.ids_to_bytes(ids), grads=sparse.rows_to_bytes(grads))])


def call(server, method: str, request):
    with grpc.insecure_channel(server.address) as channel:
        fn = channel.unary_unary(f"/psgrid.v1.ParameterServer/{method}", request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=lambda b: b)
        return fn(request, timeout=10)


@pytest.mark.parametrize("case", ["out of range", "negative", "duplicate", "count mismatch", "nan", "ragged ids",
                                  "unknown table", "table twice"])
def test_bad_rows_get_invalid_argument_and_leave_the_table_unchanged(server, case):
    from helpers.inproc import make_rig, small_params

    rig = make_rig(server.port, params=small_params(), tables=(TABLE,))
    job = server.core.job(rig.job_id)
    request = {
        "out of range": lambda: rows_request(rig, ids=(1, 100)),
        "negative": lambda: rows_request(rig, ids=(-1, 2)),
        "duplicate": lambda: rows_request(rig, ids=(3, 3)),
        "count mismatch": lambda: rows_request(rig, ids=(1, 2), grads=torch.ones(3, 4)),
        "nan": lambda: rows_request(rig, grads=torch.tensor([[float("nan")] * 4, [1.0] * 4])),
        "ragged ids": lambda: ps.PushRowsRequest(job_id=rig.job_id, worker_id=rig.workers[0], seq=0, tables=[
            ps.TableRows(table="emb", ids=b"\x01\x00\x00", grads=b"")]),
        "unknown table": lambda: rows_request(rig, table="nope"),
        "table twice": lambda: ps.PushRowsRequest(job_id=rig.job_id, worker_id=rig.workers[0], seq=0,
                                                  tables=list(rows_request(rig).tables) * 2),
    }[case]()
    with pytest.raises(grpc.RpcError) as info:
        call(server, "PushRows", request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert job.pending_rows == {} and job.tables.touched == 0
    # and a push that counts rows it did not stage is refused, changing nothing
    header = rig_header(rig, row_tables=1)
    with pytest.raises(PushAhead):
        rig.ps.push(header, rig.layout.pack({k: torch.ones_like(v) for k, v in small_params().items()}))
    assert rig.version() == 0 and job.tables.touched == 0


def rig_header(rig, seq=0, row_tables=0):
    from psgrid.worker.ps_client import push_header

    return push_header(rig.job_id, rig.workers[0], seq, 0, seq, rig.layout, row_tables=row_tables)


def test_pull_rows_refuses_bad_ids_and_unknown_tables(server):
    from helpers.inproc import make_rig

    rig = make_rig(server.port, tables=(TABLE,))
    for ids, table, code in (((5, 100), "emb", grpc.StatusCode.INVALID_ARGUMENT),
                             ((-3,), "emb", grpc.StatusCode.INVALID_ARGUMENT),
                             ((1,), "nope", grpc.StatusCode.INVALID_ARGUMENT)):
        request = ps.PullRowsRequest(job_id=rig.job_id, worker_id=rig.workers[0], table=table,
                                     ids=sparse.ids_to_bytes(torch.tensor(ids)))
        with pytest.raises(grpc.RpcError) as info:
            call(server, "PullRows", request)
        assert info.value.code() == code, info.value.details()
    plain = make_rig(server.port)  # a job without tables
    with pytest.raises(FailedPrecondition):
        plain.ps.pull_rows(plain.job_id, plain.workers[0], TABLE, torch.tensor([1]))


def test_staged_rows_are_applied_once_with_their_push_and_a_retry_is_a_duplicate(server):
    from helpers.inproc import make_rig, small_params

    rig = make_rig(server.port, params=small_params(), tables=(TABLE,))
    job = server.core.job(rig.job_id)
    initial = sparse.initial_rows(torch.tensor([1, 2, 7]), TABLE, job.spec.seed)
    grads = {k: torch.zeros_like(v) for k, v in small_params().items()}
    rig.ps.push_rows(rig.job_id, rig.workers[0], 0, {"emb": (torch.tensor([1, 2]), torch.ones(2, 4))})
    assert job.tables.touched == 0  # staged, not applied
    assert rig.ps.push(rig_header(rig, row_tables=1), rig.layout.pack(grads)) == (1, False)
    got = rig.ps.pull_rows(rig.job_id, rig.workers[0], TABLE, torch.tensor([1, 2, 7]))
    torch.testing.assert_close(got, torch.cat([initial[:2] - 0.5, initial[2:]]), atol=0, rtol=0)
    # the worker's retry of both calls changes nothing
    rig.ps.push_rows(rig.job_id, rig.workers[0], 0, {"emb": (torch.tensor([1, 2]), torch.ones(2, 4))})
    assert rig.ps.push(rig_header(rig, row_tables=1), rig.layout.pack(grads)) == (1, True)
    assert torch.equal(rig.ps.pull_rows(rig.job_id, rig.workers[0], TABLE, torch.tensor([1, 2, 7])), got)
    assert job.tables.touched == 2
    metrics = server.core.state.metrics.registry
    assert metrics.get_sample_value("psgrid_table_rows_pulled_total", {"job": rig.job_id}) == 6
    assert metrics.get_sample_value("psgrid_table_rows_pushed_total", {"job": rig.job_id}) == 2


def test_rows_in_many_parts_count_once_every_part_has_come(server, monkeypatch):
    from helpers.inproc import make_rig, small_params

    rig = make_rig(server.port, params=small_params(), tables=(TABLE,))
    job = server.core.job(rig.job_id)
    monkeypatch.setattr(sparse, "ROWS_BYTES", 3 * (8 + 16))  # three rows a call
    ids = torch.arange(10)
    rig.ps.push_rows(rig.job_id, rig.workers[0], 0, {"emb": (ids, torch.ones(10, 4))})
    assert job.pending_rows[rig.workers[0]].parts == 4 and job.pending_rows[rig.workers[0]].complete
    grads = {k: torch.zeros_like(v) for k, v in small_params().items()}
    assert rig.ps.push(rig_header(rig, row_tables=1), rig.layout.pack(grads)) == (1, False)
    assert job.tables.touched == 10
    want = sparse.initial_rows(ids, TABLE, job.spec.seed) - 0.5
    torch.testing.assert_close(rig.ps.pull_rows(rig.job_id, rig.workers[0], TABLE, ids), want, atol=0, rtol=0)


def test_row_gradients_staged_past_their_bound_are_resource_exhausted(server, monkeypatch):
    from helpers.inproc import make_rig, small_params
    from psgrid.server import tables

    rig = make_rig(server.port, params=small_params(), tables=(TABLE,))
    monkeypatch.setattr(tables, "MAX_STAGED_BYTES", 3 * (8 + 16))  # three rows
    request = rows_request(rig, ids=(1, 2))
    request.parts = 3
    call(server, "PushRows", request)
    request.part = 1  # two more rows: four in all
    with pytest.raises(grpc.RpcError) as info:
        call(server, "PushRows", request)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    request.part = 0  # the same part again replaces itself
    call(server, "PushRows", request)


def test_a_checkpoint_round_trips_a_table_bit_exact(tmp_path):
    from psgrid.server import recovery
    from psgrid.server.checkpoint import CheckpointStore
    from psgrid.server.tables import JobTables

    spec = table_spec("sparse_adam")
    tables = JobTables({"users": sparse.TableSpec("users", 0, 8, optimizer="sparse_adam", lr=0.01),
                        "items": sparse.TableSpec("items", 50, 8, optimizer="rowwise_adagrad")}, spec.seed)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.unique(torch.randint(0, 50, (20,), generator=g))
        tables.apply_now({name: (ids, torch.randn(ids.numel(), 8, generator=g)) for name in tables.tables})
    from psgrid.server.jobs import Job
    from psgrid.codec import Layout

    job = Job("job-tables", spec)
    params = {"w": torch.randn(3, 3, generator=g)}
    layout = Layout.of_tensors(params.items())
    store = CheckpointStore(tmp_path)
    with job.cond:
        job.initialize(layout, layout.pack(params), tables.specs())
        job.tables = tables
        store.save(recovery.snapshot(job, 0))
    back = recovery.restore(store.load("job-tables", 0))
    assert back.tables.specs() == tables.specs()
    for name, table in tables.tables.items():
        mine, theirs = table.tensors(), back.tables.tables[name].tensors()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), (name, key)
        ids = torch.arange(50)
        assert torch.equal(table.lookup(ids), back.tables.tables[name].lookup(ids))


def test_psgrid_serve_serves_a_model_with_tables_from_its_checkpoints_and_from_the_job(tmp_path):
    """The serving pipeline's registry takes a two-tower version from the job (rows read from
    the servers) and from a checkpoint (rows from the checkpoint's tables), and both answer
    as the trained model does."""
    from psgrid.inference.models import ModelRegistry
    from psgrid.inference.sources import CheckpointSource, JobSource

    app = ParameterServerApp(ServerConfig(port=0, allowed_modules=("psgrid.examples",),
                                          checkpoint_dir=str(tmp_path), checkpoint_interval_s=0.2)).start()
    worker = Worker(ParameterServerClient(app.address), name="w0", allowed_modules=("psgrid.examples",))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        spec = table_spec("adagrad", workers=1, steps=30)
        with Client(app.address) as client:
            job = client.submit(spec)
            assert job.wait(timeout=120, progress=False).state is JobState.SUCCEEDED
            x = build_dataset(spec).test_x[:32]
            with torch.no_grad():
                want = job.model(tables_in_memory=True)(x)
            final = job.status().version
        from_job = JobSource(app.address, job.job_id)
        registry = ModelRegistry("cpu")
        assert registry.offer(from_job.poll()[0]), registry.status().refusals
        with registry.lease() as served, torch.no_grad():
            torch.testing.assert_close(served.forward(x), want, atol=0, rtol=0)
        from_job.close()
        source = CheckpointSource(tmp_path / job.job_id)
        newest = wait_until(lambda: [c for c in source.poll() if getattr(c, "version", 0) == final] or None,
                            30, message="the final checkpoint")
        registry = ModelRegistry("cpu")
        assert registry.offer(newest[0]), registry.status().refusals
        with registry.lease() as served, torch.no_grad():
            torch.testing.assert_close(served.forward(x), want, atol=0, rtol=0)
    finally:
        worker.client.stop.set()
        thread.join(30)
        app.stop(grace=0.2)


def test_an_asynchronous_job_applies_each_pushs_rows_on_arrival(cluster):
    import dataclasses

    spec = dataclasses.replace(table_spec("sgd", steps=40), staleness=None)
    with Client(cluster.coordinator.address) as client:
        job = client.submit(spec)
        info = job.wait(timeout=120, progress=False)
        assert info.state is JobState.SUCCEEDED, info.error
        infos = job.shard_infos()
    # every push brought its rows: 2 workers x 40 steps, on each shard
    assert [i.pushes for i in infos] == [80, 80]
    assert sum(i.rows_held for i in infos) > 0
    assert info.metrics["test_rmse"] < info.metrics["rmse_of_mean"]


def test_the_sdk_reads_rows_of_a_wide_table_in_calls_that_fit(server):
    from helpers.inproc import make_rig

    wide = sparse.TableSpec("wide", 0, 1100)  # 4,400 bytes a row: ~710 rows a 3 MiB call
    rig = make_rig(server.port, tables=(wide,))
    with Client(server.address) as client:
        rows = client.job(rig.job_id).embedding("wide").lookup(torch.arange(1500).reshape(30, 50))
    assert rows.shape == (30, 50, 1100)
    want = sparse.initial_rows(torch.arange(1500), wide, server.core.job(rig.job_id).spec.seed)
    assert torch.equal(rows.reshape(1500, 1100), want)
