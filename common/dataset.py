"""What a job trains on, and which rows each worker takes at each step."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

LOSSES = ("cross_entropy", "mse")


@dataclasses.dataclass
class Dataset:
    """In-memory training data a dataset factory returns; every worker builds the same one.

    ``loss`` names the training loss. ``evaluate(model, dataset)`` returns the
    job's final metrics; by default test accuracy (cross entropy) or test MSE.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    loss: str = "cross_entropy"
    evaluate: Callable[[nn.Module, "Dataset"], dict[str, float]] | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if len(self.train_x) != len(self.train_y) or len(self.train_x) == 0:
            raise ValueError("train_x and train_y must be non-empty and of equal length")

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss == "cross_entropy":
            return nn.functional.cross_entropy(output, target)
        return nn.functional.mse_loss(output, target)

    @torch.no_grad()
    def metrics(self, model: nn.Module) -> dict[str, float]:
        """The job's evaluation metrics for ``model`` (on the test split when there is one)."""
        if self.evaluate is not None:
            return {k: float(v) for k, v in self.evaluate(model, self).items()}
        x, y = (self.test_x, self.test_y) if self.test_x is not None else (self.train_x, self.train_y)
        device = next(model.parameters()).device
        x, y = x.to(device), y.to(device)
        model.eval()
        out = model(x)
        model.train()
        prefix = "test" if self.test_x is not None else "train"
        if self.loss == "cross_entropy":
            accuracy = (out.argmax(dim=1) == y).float().mean().item()
            return {f"{prefix}_accuracy": accuracy, f"{prefix}_loss": self.loss_fn(out, y).item()}
        return {f"{prefix}_mse": self.loss_fn(out, y).item()}


class ShardSampler:
    """Mini-batches of worker ``rank`` of ``world_size``, reproducible from the seed.

    The rows are permuted once with ``seed`` and dealt round-robin; every shard
    is cut to the same length ``N // world_size``, and every batch has the same
    size, so in BSP the averaged gradient equals that of the union of batches.
    Each epoch reshuffles the shard with (seed, rank, epoch).
    """

    def __init__(self, n_samples: int, rank: int, world_size: int, batch_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        shard_len = n_samples // world_size
        if shard_len == 0:
            raise ValueError(f"{n_samples} rows cannot feed {world_size} workers")
        perm = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
        self.shard = perm[rank::world_size][:shard_len]
        self.batch_size = min(batch_size, shard_len)
        self.steps_per_epoch = shard_len // self.batch_size
        self.seed, self.rank = seed, rank
        self._epoch, self._order = -1, self.shard

    def total_steps(self, epochs: int, steps: int) -> int:
        return steps if steps else epochs * self.steps_per_epoch

    def indices(self, step: int) -> torch.Tensor:
        """Row indices of this worker's batch for ``step`` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            mixed = (self.seed * 1_000_003 + self.rank) * 1_000_033 + epoch
            g = torch.Generator().manual_seed(mixed % (2**62))
            self._order = self.shard[torch.randperm(len(self.shard), generator=g)]
            self._epoch = epoch
        return self._order[pos * self.batch_size : (pos + 1) * self.batch_size]
