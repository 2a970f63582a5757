"""A workload of the benchmarks: an MLP's sizes, a batch and a learning rate.

The benchmark tools (bench, bench_loops, bench_rates, bench_data) share it; it imports
nothing of theirs, so they all import from here and not from each other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from distnn.config import TrainConfig


@dataclass(frozen=True)
class Workload:
    name: str
    batch_size: int
    d_in: int
    hidden: tuple[int, ...]
    d_out: int
    lr: float

    @property
    def flop_per_step(self) -> float:
        """The matmuls of one step. Each Linear(a, b) costs 2Nab forward and 2Nab for its
        weight's gradient; each but the first 2Nab more for its input's gradient (the input
        itself needs none). One hidden layer H: 4*N*D_in*H + 6*N*H*D_out (the often quoted
        6*N*(D_in*H + H*D_out) counts one matmul too many)."""
        widths = (self.d_in, *self.hidden, self.d_out)
        layers = [a * b for a, b in itertools.pairwise(widths)]
        return 2.0 * self.batch_size * (2 * sum(layers) + sum(layers[1:]))

    def config(self, **changes: Any) -> TrainConfig:
        """distnn's settings for this workload: quiet, no per-step log, no replica checks."""
        return TrainConfig(batch_size=self.batch_size, d_in=self.d_in, hidden=self.hidden,
                           d_out=self.d_out, lr=self.lr, log_every=0, quiet=True,
                           verify_every=0, **changes)
