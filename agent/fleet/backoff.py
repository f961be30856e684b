"""Bounded exponential backoff with full jitter, shared by every retry loop of fleet mode."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter, bounded: a restarted hub is not stampeded."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        self.base, self.cap, self.attempt = base, cap, 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0
