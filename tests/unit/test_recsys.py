"""The recommendation example: planted structure with a known floor, and the two-tower
model learning it against server-side tables held in this process."""
from __future__ import annotations

import resource

import torch

from psgrid.examples.recsys import planted_ratings, two_tower
from psgrid.server.tables import Table
from psgrid.sparse import rows_from, tables


def test_the_data_has_its_planted_floor_and_power_law_items_and_costs_only_what_is_drawn():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = planted_ratings(num_users=50_000_000, num_items=1_000_000, n=50_000, test_n=5_000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: no 50M-row tensor
    assert data.train_x.dtype == torch.int64 and int(data.train_x[:, 0].max()) < 50_000_000
    counts = torch.bincount(data.train_x[:, 1]).sort(descending=True).values
    assert counts[:10_000].sum() > 0.5 * len(data.train_x)  # the top 1 % of items get most interactions
    zero = torch.nn.Module()
    zero.forward = lambda x: torch.zeros(len(x), 1)
    metrics = data.metrics(zero)
    assert abs(metrics["rmse_floor"] - 0.1) < 0.01 and metrics["rmse_of_mean"] > 0.8
    again = planted_ratings(num_users=50_000_000, num_items=1_000_000, n=50_000, test_n=5_000)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.train_y, data.train_y)


def test_the_two_tower_model_learns_with_its_tables_on_the_server_side():
    torch.manual_seed(0)
    data = planted_ratings(num_users=500, num_items=200, n=20_000, test_n=2_000)
    model = two_tower(500, 200, dim=8, hidden=16, lr=0.1)
    store = {name: Table(spec, seed=0) for name, spec in tables(model).items()}

    class Rows:
        def rows(self, table, ids):
            return store[table.name].lookup(ids)

    dense = torch.optim.Adam(model.parameters(), lr=0.003)
    for _ in range(3):
        for batch in torch.randperm(len(data.train_x)).split(256):
            dense.zero_grad()
            with rows_from(Rows()) as step:
                torch.nn.functional.mse_loss(model(data.train_x[batch]), data.train_y[batch]).backward()
            for name, (ids, grads) in step.gradients().items():
                store[name].apply(ids, grads)
            dense.step()
    with rows_from(Rows()):
        metrics = data.metrics(model)
    assert metrics["test_rmse"] < 0.6 * metrics["rmse_of_mean"], metrics
    assert store["users"].touched <= 500 and store["items"].touched <= 200
