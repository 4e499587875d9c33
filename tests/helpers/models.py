"""Test-only model factories, imported by real worker processes via PYTHONPATH."""
from __future__ import annotations

import os
import sys
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


def _worker_name() -> str | None:
    argv = sys.argv
    return argv[argv.index("--name") + 1] if "--name" in argv[:-1] else None


def slow_mlp(delay_s: float = 0.02, **kwargs) -> nn.Module:
    """An MLP that sleeps ``delay_s`` per training step in the worker named by
    PSGRID_TEST_SLOW (e.g. ``worker-1``), so one worker of a job lags the others on purpose."""
    model = mlp(**kwargs)
    slow = os.environ.get("PSGRID_TEST_SLOW")
    return _Slow(model, delay_s if slow and slow == _worker_name() else 0.0)
