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
from psgrid.dataset import ShardSampler
from psgrid.errors import FailedPrecondition, InvalidArgument, PushAhead
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
    want_dense, want_tables = torch_reference(spec)
    for name, value in want_dense.items():
        torch.testing.assert_close(dense[name], value, atol=1e-5, rtol=0)
    torch.testing.assert_close(users, want_tables["users"], atol=1e-5, rtol=0)
    torch.testing.assert_close(items, want_tables["items"], atol=1e-5, rtol=0)
    # Both shards hold rows, and only touched ones.
    held = [app.core.job(job.job_id).tables.touched for app in cluster.apps]
    assert all(h > 0 for h in held) and sum(held) <= USERS + ITEMS, held
