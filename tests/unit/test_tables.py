"""Embedding tables on the servers: deterministic lazy rows, placement, and sparse
optimizers equal to torch's on nn.Embedding(sparse=True) (to 1e-6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from psgrid.errors import InvalidArgument, NonFiniteGradient
from psgrid.server.tables import JobTables, Table
from psgrid.sparse import Embedding, EmbeddingBag, RowIndex, TableSpec, initial_rows, rows_from, shard_of, tables

ROWS, DIM = 40, 6


def torch_optimizer(spec: TableSpec, params):
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr)
    if spec.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=spec.lr, eps=spec.eps,
                                   initial_accumulator_value=spec.initial_accumulator_value)
    return torch.optim.SparseAdam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps)


def rowwise_adagrad_reference(weight: torch.Tensor, acc: torch.Tensor, ids, grad_rows, lr, eps):
    """The row-wise Adagrad step, written out: one accumulator per row."""
    for i, g in zip(ids.tolist(), grad_rows):
        acc[i] += (g * g).mean()
        weight[i] -= lr * g / (acc[i].sqrt() + eps)


SPECS = [
    TableSpec("t", ROWS, DIM, optimizer="sgd", lr=0.1),
    TableSpec("t", ROWS, DIM, optimizer="adagrad", lr=0.05),
    TableSpec("t", ROWS, DIM, optimizer="adagrad", lr=0.05, initial_accumulator_value=0.1, eps=1e-8),
    TableSpec("t", ROWS, DIM, optimizer="sparse_adam", lr=0.01),
    TableSpec("t", ROWS, DIM, optimizer="sparse_adam", lr=0.02, betas=(0.8, 0.99), eps=1e-6),
    TableSpec("t", ROWS, DIM, optimizer="rowwise_adagrad", lr=0.05, eps=1e-8),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.optimizer}-lr{s.lr}")
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 25))
def test_a_table_matches_torch_on_a_sparse_embedding(spec, seed, steps):
    g = torch.Generator().manual_seed(seed)
    ours = Table(spec, seed=3)
    ref = torch.nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(initial_rows(torch.arange(ROWS), spec, seed=3))
    acc = torch.zeros(ROWS)
    opt = None if spec.optimizer == "rowwise_adagrad" else torch_optimizer(spec, ref.parameters())
    for _ in range(steps):
        ids = torch.randint(0, ROWS, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)  # repeats
        target = torch.randn(ids.numel(), DIM, generator=g)
        ref.zero_grad()
        (ref(ids) * target).sum().backward()
        grad = ref.weight.grad.coalesce()  # duplicates summed, as a worker pushes them
        unique, rows = grad.indices()[0], grad.values()
        ours.apply(unique, rows.clone())
        if opt is None:
            with torch.no_grad():
                rowwise_adagrad_reference(ref.weight, acc, unique, rows, spec.lr, spec.eps)
        else:
            opt.step()
    torch.testing.assert_close(ours.lookup(torch.arange(ROWS)), ref.weight.detach(), rtol=1e-6, atol=1e-6)
    assert ours.touched <= ROWS


def test_untouched_rows_are_a_pure_function_of_seed_table_and_id():
    spec = TableSpec("users", 0, 16)
    ids = torch.tensor([5, 10**12, 0, 5])
    rows = initial_rows(ids, spec, seed=1)
    assert torch.equal(rows[0], rows[3]) and not torch.equal(rows[0], rows[2])
    assert torch.equal(rows, initial_rows(ids, spec, seed=1))
    assert not torch.equal(rows, initial_rows(ids, spec, seed=2))
    assert not torch.equal(rows, initial_rows(ids, TableSpec("items", 0, 16), seed=1))
    big = initial_rows(torch.arange(20000), spec, seed=0)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1.0) < 0.01  # N(0, 1) as nn.Embedding
    uniform = initial_rows(torch.arange(20000), TableSpec("u", 0, 4, init="uniform", init_scale=0.5), seed=0)
    assert float(uniform.abs().max()) <= 0.5 and abs(float(uniform.mean())) < 0.01


def test_a_lookup_writes_nothing_and_a_huge_table_costs_only_its_touched_rows():
    spec = TableSpec("big", 50_000_000, 64, optimizer="adagrad", lr=0.1)
    table = Table(spec, seed=0)
    ids = torch.tensor([49_999_999, 7, 123_456])
    before = table.lookup(ids)
    assert table.touched == 0 and table.nbytes == 0
    table.apply(ids, torch.ones(3, 64))
    assert table.touched == 3 and table.nbytes < 1 << 20  # not 50M x 64 floats
    assert not torch.equal(table.lookup(ids), before)


def test_placement_spreads_rows_evenly_and_is_stable():
    spec = TableSpec("items", 0, 8)
    ids = torch.arange(100_000)
    shards = shard_of(ids, spec, 4)
    counts = torch.bincount(shards, minlength=4)
    assert counts.min() > 0.97 * 25_000 and torch.equal(shards, shard_of(ids, spec, 4))
    hot = shard_of(torch.arange(1000), spec, 4)  # the most popular ids are often the smallest
    assert torch.bincount(hot, minlength=4).min() > 200


@pytest.mark.parametrize("ids, grads, error", [
    (torch.tensor([-1]), torch.zeros(1, DIM), "negative row id"),
    (torch.tensor([ROWS]), torch.zeros(1, DIM), "out of range"),
    (torch.tensor([1, 1]), torch.zeros(2, DIM), "duplicate"),
    (torch.tensor([1, 2]), torch.zeros(3, DIM), "gradient rows"),
    (torch.tensor([1.0]), torch.zeros(1, DIM), "int64"),
    (torch.tensor([1]), torch.zeros(1, DIM, dtype=torch.float64), "float32"),
])
def test_bad_updates_are_refused_and_change_nothing(ids, grads, error):
    table = Table(SPECS[1], seed=0)
    table.apply(torch.tensor([3]), torch.ones(1, DIM))
    before = table.tensors()
    with pytest.raises(InvalidArgument, match=error):
        table.apply(ids, grads)
    after = table.tensors()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_nan_rows_are_refused():
    table = Table(SPECS[0], seed=0)
    with pytest.raises(NonFiniteGradient):
        table.apply(torch.tensor([1]), torch.full((1, DIM), float("nan")))
    assert table.touched == 0 and table.steps == 0


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.optimizer)
def test_checkpoint_tensors_round_trip_bit_exact(spec):
    table = Table(spec, seed=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.unique(torch.randint(0, ROWS, (12,), generator=g))
        table.apply(ids, torch.randn(ids.numel(), DIM, generator=g))
    copy = Table.from_tensors(spec, 5, table.tensors())
    assert torch.equal(copy.lookup(torch.arange(ROWS)), table.lookup(torch.arange(ROWS)))
    ids = torch.tensor([1, 2, 39])
    grads = torch.randn(3, DIM, generator=g)
    table.apply(ids, grads)
    copy.apply(ids, grads.clone())
    assert torch.equal(copy.lookup(torch.arange(ROWS)), table.lookup(torch.arange(ROWS)))


# --- the modules a model uses, trained against a table in memory ------------------------------------


class InMemory:
    """A RowSource over server-side Tables in this process (what a worker's pulls return)."""

    def __init__(self, specs: dict[str, TableSpec], seed: int):
        self.tables = {name: Table(spec, seed) for name, spec in specs.items()}

    def rows(self, table: TableSpec, ids: torch.Tensor) -> torch.Tensor:
        return self.tables[table.name].lookup(ids)


class Tower(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.users = table
        self.head = nn.Linear(DIM, 1)

    def forward(self, ids):
        return self.head(self.users(ids).mean(1)).squeeze(1)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "sparse_adam"])
def test_a_model_with_a_server_table_trains_as_torch_with_a_sparse_embedding(optimizer):
    seed, lr = 7, 0.05
    ours = Tower(Embedding(ROWS, DIM, optimizer=optimizer, lr=lr))
    specs = tables(ours)
    assert list(specs) == ["users"] and not any("users" in n for n, _ in ours.named_parameters())
    source = InMemory(specs, seed)
    ref = Tower(nn.Embedding(ROWS, DIM, sparse=True))
    with torch.no_grad():
        ref.users.weight.copy_(initial_rows(torch.arange(ROWS), specs["users"], seed))
        ref.head.load_state_dict(ours.head.state_dict())
    ref_opts = [torch_optimizer(specs["users"], [ref.users.weight]), torch.optim.SGD(ref.head.parameters(), lr=lr)]
    head_opt = torch.optim.SGD(ours.head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, ROWS, (8, 3), generator=g)
        y = torch.randn(8, generator=g)
        for opt in ref_opts:
            opt.zero_grad()
        nn.functional.mse_loss(ref(ids), y).backward()
        for opt in ref_opts:
            opt.step()
        head_opt.zero_grad()
        with rows_from(source) as step:
            nn.functional.mse_loss(ours(ids), y).backward()
        for name, (unique, grads) in step.gradients().items():
            assert torch.equal(unique, torch.unique(ids))
            source.tables[name].apply(unique, grads)
        head_opt.step()
    torch.testing.assert_close(source.tables["users"].lookup(torch.arange(ROWS)), ref.users.weight.detach(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.head.weight, ref.head.weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_an_embedding_bag_pools_as_torchs(mode):
    bag = EmbeddingBag(ROWS, DIM, mode=mode)
    specs = tables(bag)
    source = InMemory(specs, 1)
    ref = nn.EmbeddingBag(ROWS, DIM, mode=mode)
    with torch.no_grad():
        ref.weight.copy_(initial_rows(torch.arange(ROWS), specs["table"], 1))
    ids, offsets = torch.tensor([3, 3, 9, 1, 0, 7]), torch.tensor([0, 2, 5])
    with rows_from(source):
        torch.testing.assert_close(bag(ids, offsets), ref(ids, offsets))
        torch.testing.assert_close(bag(ids.view(2, 3)), ref(ids.view(2, 3)))


def test_a_table_outside_a_bound_step_says_what_is_missing():
    table = Embedding(10, 2)
    source = InMemory(tables(table), 0)
    with pytest.raises(RuntimeError, match="rows_from"):
        table(torch.tensor([1]))
    with rows_from(source), pytest.raises(InvalidArgument, match="out of range"):
        table(torch.tensor([10]))


# --- a synchronous round over several workers ----------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "sparse_adam", "rowwise_adagrad"])
def test_a_round_of_two_workers_equals_one_process_on_the_union_of_their_batches(optimizer):
    spec = TableSpec("users", ROWS, DIM, optimizer=optimizer, lr=0.05)
    shard = JobTables({"users": spec}, seed=2)
    ref = nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(initial_rows(torch.arange(ROWS), spec, 2))
    acc = torch.zeros(ROWS)
    opt = None if optimizer == "rowwise_adagrad" else torch_optimizer(spec, [ref.weight])
    g = torch.Generator().manual_seed(1)
    for seq in range(15):
        batches = [torch.randint(0, ROWS, (n,), generator=g) for n in (5, 9)]  # unequal batches
        targets = [torch.randn(len(b), DIM, generator=g) for b in batches]
        pushed = {}
        for w, (ids, target) in enumerate(zip(batches, targets)):  # each worker: the mean loss of its batch
            local = nn.Embedding(ROWS, DIM, sparse=True)
            with torch.no_grad():
                local.weight.copy_(shard.table("users").lookup(torch.arange(ROWS)))
            ((local(ids) - target) ** 2).mean().backward()
            grad = local.weight.grad.coalesce()
            pushed[f"w{w}"] = {"users": (grad.indices()[0], grad.values())}
            shard.stage(f"w{w}", seq, len(ids), pushed[f"w{w}"])
        if seq == 3:  # a retried push replaces the first: nothing counted twice
            shard.stage("w0", seq, len(batches[0]), pushed["w0"])
        assert shard.staged(seq) == {"w0", "w1"}
        shard.apply_round(seq)
        ref.zero_grad()
        ((ref(torch.cat(batches)) - torch.cat(targets)) ** 2).mean().backward()
        if opt is None:
            union = ref.weight.grad.coalesce()
            with torch.no_grad():
                rowwise_adagrad_reference(ref.weight, acc, union.indices()[0], union.values(), spec.lr, spec.eps)
        else:
            opt.step()
    torch.testing.assert_close(shard.table("users").lookup(torch.arange(ROWS)), ref.weight.detach(),
                               rtol=1e-5, atol=1e-6)


def test_a_round_refuses_a_bad_table_or_rows_before_staging_anything():
    shard = JobTables({"users": TableSpec("users", ROWS, DIM)}, seed=0)
    with pytest.raises(InvalidArgument, match="no table 'items'"):
        shard.stage("w0", 0, 4, {"items": (torch.tensor([1]), torch.zeros(1, DIM))})
    with pytest.raises(InvalidArgument, match="duplicate"):
        shard.stage("w0", 0, 4, {"users": (torch.tensor([1, 1]), torch.zeros(2, DIM))})
    assert shard.staged(0) == set()


def test_an_update_that_would_make_a_row_or_its_state_non_finite_changes_nothing():
    from psgrid.errors import NonFiniteGradient

    for optimizer in ("sgd", "adagrad"):
        table = Table(TableSpec("t", 10, 2, optimizer=optimizer, lr=1.0), seed=0)
        ids, huge, every = torch.tensor([1, 2]), torch.full((2, 2), 3e38), torch.arange(10)

        def seen():  # what a reader sees (a row never written may be held at its initial value)
            return table.lookup(every), {k: v[:table.touched].clone() for k, v in table.state.items()}, table.steps

        before = seen()
        with pytest.raises(NonFiniteGradient):
            for _ in range(3):  # sgd overflows on the third push; adagrad's sum on the first
                table.apply(ids, huge)
                before = seen()
        rows, state, steps = seen()
        assert torch.equal(rows, before[0]) and steps == before[2], optimizer
        assert all(torch.equal(state[k][:len(before[1][k])], before[1][k]) for k in state), optimizer
        assert all(bool(torch.isfinite(v).all()) for v in state.values())


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 2**62), max_size=300), min_size=1, max_size=8),
       small=st.booleans())
def test_the_row_index_answers_as_a_dict_through_growth_and_collisions(batches, small):
    """RowIndex against a dict: batches of new ids added in turn (growing it several
    times), every id looked up after each batch, held and never held alike."""
    index, truth, seen = RowIndex(), {}, []
    for batch in batches:
        ids = [i % 1500 for i in batch] if small else batch  # small: crowded, colliding homes
        new = list(dict.fromkeys(i for i in ids if i not in truth))
        slots = np.arange(len(truth), len(truth) + len(new), dtype=np.int64)
        index.add(np.array(new, dtype=np.int64), slots)
        truth.update(zip(new, slots.tolist()))
        seen.extend(ids)
        probe = np.array(seen + [i + 1 for i in seen], dtype=np.int64)
        assert index.get(probe).tolist() == [truth.get(i, -1) for i in probe.tolist()]
        assert len(index) == len(truth)
