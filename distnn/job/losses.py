"""The training objectives: sums over the batch, so the ranks' gradients add up.

The reference program sums its squared errors (``MSELoss(reduction='sum')``);
classification sums its cross-entropies the same way. With a sum, the gradient of a batch is
the sum of the gradients of any split of it, so an all-reduce with SUM and no division by
the world size gives the one-process result (a mean would weigh a rank's rows by its
shard's size).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sum_loss(name: str) -> LossFn:
    """The loss of ``--loss name`` with ``reduction='sum'``: ``mse`` or ``cross-entropy``
    (on integer class labels)."""
    if name == "mse":
        return nn.MSELoss(reduction="sum")
    if name == "cross-entropy":
        return nn.CrossEntropyLoss(reduction="sum")
    raise ValueError(f"unknown loss {name!r}; allowed: mse, cross-entropy")


def correct_predictions(prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many rows' largest output is their label (a 0-dim tensor, on their device)."""
    return (prediction.argmax(dim=1) == labels).sum()
