"""Click bags over one large embedding table: the workload of ``scripts/bench_sparse.py`` (issue 14).

``click_bags``: each example is a bag of ``bag`` item ids drawn with power-law
popularity (Zipf exponent ``zipf``: id 0 the most clicked, id ``num_rows - 1``
the least), and a binary label planted from hidden per-id weights: the mean of
the bag's weights (scaled to unit variance) plus Gaussian noise of std
``noise``, thresholded at its training median (half the labels are 1). The ids
are drawn by the inverse CDF of the continuous power law and the hidden weights
are :func:`psgrid.sparse.initial_rows` of the ids drawn, so nothing of size
``num_rows`` is ever allocated: a 10-million-row table costs what a
10-thousand-row one does.

``bag_model``: an :class:`psgrid.sparse.EmbeddingBag` (mean over the bag; its
rows on the parameter servers) and a small dense head (``dim -> hidden -> 2``).
``torch_bag_model`` is the same model on ``torch.nn.EmbeddingBag`` (dense or
``sparse=True`` gradients), the baselines' version: its table is allocated whole.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from psgrid.dataset import Dataset
from psgrid.sparse import EmbeddingBag, TableSpec, initial_rows


def zipf_ids(num_rows: int, shape: tuple[int, ...], zipf: float, generator: torch.Generator) -> torch.Tensor:
    """int64 ids in [0, num_rows) of ``shape``, P(id = k) ~ (k + 1) ** -zipf (continuous
    inverse CDF, floored): O(ids drawn), not O(num_rows)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    top = float(num_rows + 1)
    if abs(zipf - 1.0) < 1e-9:
        x = top ** u
    else:
        a = 1.0 - zipf
        x = (1.0 + u * (top ** a - 1.0)) ** (1.0 / a)
    return (x.floor().to(torch.int64) - 1).clamp_(0, num_rows - 1)


def click_bags(num_rows: int = 100_000, n: int = 50_000, test_n: int = 2_000, bag: int = 30,
               zipf: float = 1.05, noise: float = 0.5, seed: int = 0) -> Dataset:
    """[n, bag] int64 id bags -> a click (0 or 1) planted from hidden per-id weights."""
    if num_rows < 1 or n < 1 or test_n < 0 or bag < 1 or zipf <= 0 or noise < 0:
        raise ValueError(f"click_bags: bad arguments num_rows={num_rows} n={n} test_n={test_n} bag={bag} "
                         f"zipf={zipf} noise={noise}")
    g = torch.Generator().manual_seed(seed)
    total = n + test_n
    ids = zipf_ids(num_rows, (total, bag), zipf, g)
    unique, inverse = torch.unique(ids, return_inverse=True)
    hidden = initial_rows(unique, TableSpec("truth.clicks", num_rows, 1), seed)[:, 0]
    score = hidden[inverse].mean(1) * math.sqrt(bag)  # unit variance, whatever the bag size
    noisy = score + noise * torch.randn(total, generator=g)
    # Thresholded at the median, not 0: the most popular ids sit in most bags and shift every mean.
    labels = (noisy > noisy[:n].median()).to(torch.int64)
    return Dataset(train_x=ids[:n], train_y=labels[:n], test_x=ids[n:] if test_n else None,
                   test_y=labels[n:] if test_n else None, loss="cross_entropy")


def _head(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))


class ClickModel(nn.Module):
    """A bag of ids -> the mean of their rows -> a dense head -> two logits."""

    def __init__(self, bag: nn.Module, head: nn.Module):
        super().__init__()
        self.bag = bag
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(ids))


def bag_model(num_rows: int = 100_000, dim: int = 64, hidden: int = 64, optimizer: str = "sgd",
              lr: float = 20.0, init_scale: float = 0.1) -> nn.Module:
    """The model with its table on the parameter servers (psgrid.sparse.EmbeddingBag)."""
    head = _head(dim, hidden)  # first: the same draws as torch_bag_model's head
    return ClickModel(EmbeddingBag(num_rows, dim, mode="mean", optimizer=optimizer, lr=lr,
                                   init_scale=init_scale), head)


def torch_bag_model(num_rows: int = 100_000, dim: int = 64, hidden: int = 64, sparse: bool = False,
                    init_scale: float = 0.1) -> nn.Module:
    """The same model on ``nn.EmbeddingBag`` (the whole table in this process), rows
    drawn from N(0, init_scale^2) as the servers' "normal" rows are (not the same values)."""
    head = _head(dim, hidden)
    table = nn.EmbeddingBag(num_rows, dim, mode="mean", sparse=sparse)
    with torch.no_grad():
        table.weight.normal_(0.0, init_scale)
    return ClickModel(table, head)
