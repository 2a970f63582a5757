"""--lr-schedule: the learning rate of each update, a function of the update's index alone.

With S the run's updates and W = --warmup-steps, update s (0-based) uses ``lr * factor(s)``:
``(s + 1) / W`` while s < W; then ``constant`` stays at 1, ``linear`` goes from 1 at s = W
toward ``min_lr / lr`` as ``1 - (1 - m) * (s - W) / (S - W)``, ``cosine`` as
``m + (1 - m) * (1 + cos(pi * (s - W) / (S - W))) / 2`` (m = min_lr / lr). A torch.optim
optimizer follows it through torch's ``LambdaLR``; the reference program's update (no
optimizer object) reads ``rate(s)``, the same numbers.
"""

from __future__ import annotations

import math

import torch


class Schedule:
    """The rate of every update of a run of ``total`` updates."""

    def __init__(self, kind: str, *, lr: float, total: int, warmup: int = 0,
                 min_lr: float = 0.0) -> None:
        self.kind, self.lr, self.total, self.warmup, self.min_lr = kind, lr, total, warmup, min_lr

    def factor(self, s: int, lr: float | None = None) -> float:
        """The rate of update ``s`` as a fraction of ``lr`` (default: the schedule's)."""
        lr = self.lr if lr is None else lr
        if s < self.warmup:
            return (s + 1) / self.warmup
        if self.kind == "constant" or lr == 0:
            return 1.0
        floor = self.min_lr / lr
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def rate(self, s: int) -> float:
        return self.lr * self.factor(s)

    def scheduler(self, optimizer: torch.optim.Optimizer,
                  start: int) -> torch.optim.lr_scheduler.LambdaLR:
        """torch's scheduler for ``optimizer``, at update ``start`` (its groups' rate set to
        that update's: a resumed run recomputes it from the step, as the rate is a function
        of the update's index alone); step it once after each update."""
        factors = []
        for group in optimizer.param_groups:
            # each group decays from its own rate to min_lr
            base = group.setdefault("initial_lr", group["lr"])
            factors.append(lambda s, base=base: self.factor(s, base))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors, last_epoch=start - 1)
