"""Model factories for the examples: ``psgrid.examples.models:mlp`` and ``:linear``."""
from __future__ import annotations

from torch import nn


def mlp(in_features: int = 64, hidden: int = 128, classes: int = 10, layers: int = 2) -> nn.Module:
    """A ReLU multi-layer perceptron for classification."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    blocks: list[nn.Module] = []
    width = in_features
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    blocks.append(nn.Linear(width, classes))
    return nn.Sequential(*blocks)


def linear(in_features: int = 8, out_features: int = 1) -> nn.Module:
    """``x @ w + b``: the linear regression of psgrid's origin."""
    return nn.Linear(in_features, out_features)
