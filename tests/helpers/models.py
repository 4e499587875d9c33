"""Test-only model factories, imported by real worker processes via PYTHONPATH."""
from __future__ import annotations

import os
import time

from torch import nn

from psgrid.examples.models import mlp


class _Slow(nn.Module):
    def __init__(self, inner: nn.Module, delay_s: float):
        super().__init__()
        self.inner = inner
        self.delay_s = delay_s

    def forward(self, x):
        if self.training:
            time.sleep(self.delay_s)
        return self.inner(x)


def slow_mlp(delay_s: float = 0.02, **kwargs) -> nn.Module:
    """An MLP that sleeps ``delay_s`` per training step in workers started with
    PSGRID_TEST_SLOW=1, so one worker of a job lags the others on purpose."""
    model = mlp(**kwargs)
    return _Slow(model, delay_s) if os.environ.get("PSGRID_TEST_SLOW") == "1" else _Slow(model, 0.0)
