"""The update after the gradients are summed: the loss's reduction, gradient transforms
(clipping), then the optimizer's step at the schedule's rate.

A step's update is ``p -= lr * grad`` over the flat buffer (the reference program's), or the
torch.optim optimizer's step. Everything here runs on the summed gradients, which are the
same on every rank, so every rank does the same. This is the eager step's update, also
what --cuda-graph captures (with none of the options below: --cuda-graph refuses them),
and what the whole step compiled by --compile runs after its compiled gradient when any of
them is on (distnn.step.wholestep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distnn.distributed.sharding import GradSync
from distnn.step.schedule import Schedule

GradientTransform = Callable[[list[torch.Tensor], int], None]
"""Changes the summed gradients in place before the update: (the tensors that hold them,
the update's index)."""


class ClipGradNorm:
    """--clip-grad-norm: the gradients scaled so that their global L2 norm is at most
    ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` scales them; each update's norm (a
    0-dim device tensor, before the scaling) goes to ``record(update, norm)``. ``norm``: the
    global norm of the gradients given (the sync's: over the shards, when sharded)."""

    def __init__(self, max_norm: float, record: Callable[[int, torch.Tensor], None], *,
                 norm: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        self.max_norm = max_norm
        self.record = record
        self.norm = norm

    def __call__(self, grads: list[torch.Tensor], update: int) -> None:
        norm = self.norm(grads)
        self.record(update, norm)
        coefficient = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefficient)


class Update:
    """One update: with ``mean_count``, the summed loss and gradients divided by the step's
    count of targets (``mean_count(update)``: --loss-reduction mean); ``transforms`` in
    order; then the optimizer's step, or with no optimizer ``p -= rate * grad``, at
    ``schedule``'s rate (else ``lr``), or the optimizer's own ``scheduler`` (distnn.fit's
    scheduler=, stepped after each update; :meth:`rate_of` says each update's rate, where
    ``says_rates``: a scheduler's rates are kept until said, so only the rank that says
    them keeps them). ``start``: the index of the first update (a resumed run's step)."""

    def __init__(self, *, optimizer: torch.optim.Optimizer | None, lr: float,
                 transforms: Sequence[GradientTransform] = (), schedule: Schedule | None = None,
                 mean_count: Callable[[int], int] | None = None, start: int = 0,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 says_rates: bool = True) -> None:
        self.optimizer = optimizer
        self.lr = lr
        self.transforms = tuple(transforms)
        self.schedule = schedule
        self.mean_count = mean_count
        self.index = start  # the index of the next update
        self.scheduler = (schedule.scheduler(optimizer, start)
                          if schedule is not None and optimizer is not None else scheduler)
        self._rates: dict[int, float] = {}  # a user's scheduler: the rate of each update
        self._keep_rates = says_rates and self.scheduler is not None and schedule is None

    def __call__(self, sync: GradSync, loss: torch.Tensor) -> torch.Tensor:
        """Updates the weights from the summed gradients; returns the step's loss (the
        summed ``loss``, or under a mean reduction that sum over the count)."""
        update = self.index
        if self.mean_count is not None or self.transforms:
            grads = sync.summed_grads()
            if self.mean_count is not None:
                count = self.mean_count(update)
                torch._foreach_div_(grads, count)
                loss = loss / count
            for transform in self.transforms:
                transform(grads, update)
        if self.optimizer is None:
            sync.sgd_step(self.schedule.rate(update) if self.schedule else self.lr)
        else:
            if self._keep_rates:
                self._rates[update] = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.index = update + 1
        return loss

    @property
    def scheduled(self) -> bool:
        """Whether the rate changes from update to update (a schedule or a scheduler)."""
        return self.schedule is not None or self.scheduler is not None

    def rate_of(self, update: int) -> float | None:
        """The rate of ``update``, once it ran: the schedule's, or the one a user's
        scheduler set (said once: it is then forgotten)."""
        if self.schedule is not None:
            return self.schedule.rate(update)
        return self._rates.pop(update, None)
