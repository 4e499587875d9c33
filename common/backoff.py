"""Capped exponential back-off with full jitter (pure; the clock is injectable)."""
from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass
class Backoff:
    """Delays of ``initial * multiplier**n``, capped at ``maximum``, jittered.

    With ``jitter`` j each delay is drawn uniformly from ``[d*(1-j), d]``, so a
    crowd of clients retrying together spreads out. ``reset()`` starts over.
    """

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {self.initial}, {self.maximum}")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("need multiplier >= 1 and jitter in [0, 1]")

    def next_delay(self) -> float:
        delay = min(self.maximum, self.initial * self.multiplier**self.attempts)
        self.attempts += 1
        return delay * (1 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempts = 0
