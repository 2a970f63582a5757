"""The reference program's batch, and how any batch is split across ranks.

Data files are read in distnn/data/datafile.py, and the order of their mini-batches is
distnn/data/batches.py's.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from distnn.config import TrainConfig
from distnn.job.model import config_model


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows [start, stop) of a batch of ``total`` rows that ``rank`` owns.

    Shards are contiguous, in rank order, and their sizes differ by at most one (the first
    ``total % world_size`` ranks hold one row more). A shard may be empty when
    ``total < world_size``; with a sum loss an empty shard simply contributes zero gradient.
    """
    if (not all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                for n in (total, world_size, rank))
            or world_size < 1 or not 0 <= rank < world_size or total < 0):
        raise ValueError(f"shard_bounds: total={total!r}, world_size={world_size!r}, "
                         f"rank={rank!r}; allowed: integers with total >= 0, world_size >= 1 "
                         "and 0 <= rank < world_size")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def reference_setup(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The reference program's batch and initial model, drawn on the CPU in its order.

    ``torch.manual_seed(seed)``, then ``x = randn(N, D_in)``, ``y = randn(N, D_out)``, then the
    model (the MLP, or --model's). Every rank calls this, so every rank starts from the same
    data and weights. ``config`` is resolved (its sizes filled in).
    """
    torch.manual_seed(config.seed)
    x = torch.randn(config.batch_size, config.d_in)
    y = torch.randn(config.batch_size, config.d_out)
    return x, y, config_model(config)
