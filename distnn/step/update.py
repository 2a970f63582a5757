"""The update after the gradients are summed: gradient transforms, then the optimizer.

A step's update is ``p -= lr * grad`` over the flat buffer (the reference program's), or the
torch.optim optimizer's step. A gradient transform (clipping, say) is a function of the
summed gradients that runs before it, on every rank alike (the gradients are the same on
every rank, so the transformed ones are too). This is the eager step's update, also what
--cuda-graph captures; the whole step compiled by --compile has its own (distnn.step.wholestep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distnn.distributed.gradsync import FlatGradSync

GradientTransform = Callable[[FlatGradSync], None]
"""Changes the summed gradients in place (``sync.grads``, a flat view of them all) before
the update."""


class Update:
    """Applies ``transforms`` in order, then the optimizer's step, or with no optimizer
    ``p -= lr * grad``."""

    def __init__(self, *, optimizer: torch.optim.Optimizer | None, lr: float,
                 transforms: Sequence[GradientTransform] = ()) -> None:
        self.optimizer = optimizer
        self.lr = lr
        self.transforms = tuple(transforms)

    def __call__(self, sync: FlatGradSync) -> None:
        for transform in self.transforms:
            transform(sync)
        if self.optimizer is None:
            sync.sgd_step(self.lr)
        else:
            self.optimizer.step()
