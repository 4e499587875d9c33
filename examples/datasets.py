"""Dataset factories for the examples.

``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images),
standardised, with a held-out test split. ``linear_regression``: synthetic
``y = x @ w + b + noise`` with known ``w`` and ``b``; its metric is the error
of the recovered weights. ``synthetic_regression``: wide multi-output targets
from a fixed random teacher network, with a test split (test MSE); the
training benchmark's large workload.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import pathlib
import tempfile

import torch
from torch import nn

from psgrid.dataset import Dataset

logger = logging.getLogger(__name__)

#: Where ``digits`` keeps its prepared split, so that a worker's first digits job (a
#: restarted worker's too) skips importing scikit-learn (2 s of a 3 s start here).
CACHE_DIR = pathlib.Path.home() / ".cache" / "psgrid" / "datasets"


def digits(test_fraction: float = 0.2, split_seed: int = 0, cache: bool = True) -> Dataset:
    """Handwritten digits, 64 features scaled by the training split's statistics.

    ``cache``: keep the prepared split in CACHE_DIR (safetensors, keyed by the
    arguments and scikit-learn's version) and read it from there next time."""
    path = _digits_cache_path(test_fraction, split_seed) if cache else None
    tensors = _read_cached(path) if path is not None else None
    if tensors is None:
        tensors = _prepare_digits(test_fraction, split_seed)
        if path is not None:
            _write_cached(path, tensors)
    return Dataset(train_x=tensors["train_x"], train_y=tensors["train_y"], test_x=tensors["test_x"],
                   test_y=tensors["test_y"], loss="cross_entropy")


def _prepare_digits(test_fraction: float, split_seed: int) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=split_seed, stratify=data.target
    )
    x_train = torch.tensor(x_train, dtype=torch.float32)
    x_test = torch.tensor(x_test, dtype=torch.float32)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return {"train_x": (x_train - mean) / std, "train_y": torch.tensor(y_train, dtype=torch.long),
            "test_x": (x_test - mean) / std, "test_y": torch.tensor(y_test, dtype=torch.long)}


def _digits_cache_path(test_fraction: float, split_seed: int) -> pathlib.Path | None:
    try:  # the split is scikit-learn's: another version may split otherwise
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return None
    return CACHE_DIR / f"digits-{test_fraction!r}-{split_seed}-sklearn{version}.safetensors"


def _read_cached(path: pathlib.Path) -> dict[str, torch.Tensor] | None:
    """The tensors saved at ``path`` (safetensors: no code runs), or None when it is not
    there or not readable (then it is made again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except FileNotFoundError:
        return None
    except (OSError, SafetensorError) as exc:
        logger.info("dataset cache %s unreadable (%s): preparing the data again", path, exc)
        return None
    return tensors if set(tensors) == {"train_x", "train_y", "test_x", "test_y"} else None


def _write_cached(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` at ``path`` whole or not at all (a temporary file renamed), so that
    processes preparing the same data at once never read half a file; a cache that
    cannot be written is skipped."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        logger.info("dataset cache %s not written: %s", path, exc)


def _true_weights(in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, in_features, generator=g) * 2, torch.randn(1, generator=g)


def linear_regression(n: int = 4096, in_features: int = 8, noise: float = 0.01, seed: int = 1234,
                      dtype: str = "float32") -> Dataset:
    """Synthetic regression data from known weights; evaluates the recovered weights."""
    w, b = _true_weights(in_features, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, in_features, generator=g)
    y = x @ w.T + b + noise * torch.randn(n, 1, generator=g)
    torch_dtype = getattr(torch, dtype)

    def evaluate(model: nn.Module, _: Dataset) -> dict[str, float]:
        weight = model.weight.detach().cpu().double()
        bias = model.bias.detach().cpu().double()
        return {
            "weight_error": (weight - w.double()).abs().max().item(),
            "bias_error": (bias - b.double()).abs().max().item(),
        }

    return Dataset(train_x=x.to(torch_dtype), train_y=y.to(torch_dtype), loss="mse", evaluate=evaluate)


def synthetic_regression(n: int = 4096, test_n: int = 1024, in_features: int = 1024, out_features: int = 1024,
                         teacher_hidden: int = 256, noise: float = 0.1, seed: int = 4321) -> Dataset:
    """``y = tanh(x @ A) @ B + noise``, ``x`` standard normal, ``A`` and ``B`` random and
    scaled to keep every target's variance near 0.4; ``seed`` fixes every row."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(in_features, teacher_hidden, generator=g) / in_features ** 0.5
    b = torch.randn(teacher_hidden, out_features, generator=g) / teacher_hidden ** 0.5
    x = torch.randn(n + test_n, in_features, generator=g)
    y = torch.tanh(x @ a) @ b + noise * torch.randn(n + test_n, out_features, generator=g)
    return Dataset(train_x=x[:n], train_y=y[:n], test_x=x[n:], test_y=y[n:], loss="mse")
