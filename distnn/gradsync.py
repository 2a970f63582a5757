"""Summing gradients across ranks through one flat buffer, and the SGD update over it.

Each parameter's ``.data`` and ``.grad`` become views into two contiguous buffers, so the
all-reduce needs no copy in or out and the update is one fused operation. The gradient
buffer has one extra slot at the end that carries the rank's loss, so the global loss
travels in the same collective as the gradients: one collective per step in total.

Why SUM and no division: the loss is a sum over samples, so the full batch's gradient is
the sum of the shards' gradients for any partition of the batch, empty shards included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class FlatGradSync:
    """Keeps ``module``'s parameters and gradients in flat buffers and sums them across ranks.

    Build it after the module is on its device and before training. Zero gradients with
    :meth:`zero_grad`, not ``module.zero_grad()``: the latter sets ``.grad`` to None and
    detaches the gradients from the buffer.
    """

    def __init__(self, module: nn.Module, *, distributed: bool) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("FlatGradSync: the module has no trainable parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError("FlatGradSync: all parameters must share one dtype and one device; "
                             f"got dtypes {sorted(map(str, dtypes))}, "
                             f"devices {sorted(map(str, devices))}")
        self.distributed = distributed
        self.numel = sum(p.numel() for p in params)
        with torch.no_grad():
            self.flat_params = torch.cat([p.detach().reshape(-1) for p in params])
        # One slot more than the gradients: the rank's loss rides along in the all-reduce.
        self.flat_grads = torch.zeros(self.numel + 1, dtype=params[0].dtype,
                                      device=params[0].device)
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.flat_params[offset:offset + n].view_as(p)
            p.grad = self.flat_grads[offset:offset + n].view_as(p)
            offset += n
        self.params = params

    def broadcast_parameters(self, src: int = 0) -> None:
        """Makes every rank's parameters equal to rank ``src``'s (one collective)."""
        if self.distributed:
            dist.broadcast(self.flat_params, src=src)

    def zero_grad(self) -> None:
        """Zeroes every gradient (and the loss slot) in place; autograd then accumulates into it."""
        self.flat_grads.zero_()

    def all_reduce(self, local_loss: torch.Tensor) -> torch.Tensor:
        """Sums gradients and losses over all ranks; returns the global loss (a 0-dim tensor).

        Call after ``backward()``. The returned tensor is a view into the buffer: it is
        overwritten by the next step, so copy it to keep it. No host synchronisation.
        """
        loss_slot = self.flat_grads[self.numel]
        loss_slot.copy_(local_loss.detach())
        if self.distributed:
            dist.all_reduce(self.flat_grads, op=dist.ReduceOp.SUM)
        return loss_slot

    @torch.no_grad()
    def sgd_step(self, lr: float) -> None:
        """``p -= lr * p.grad`` for every parameter, as one operation over the flat buffer."""
        self.flat_params.add_(self.flat_grads[:self.numel], alpha=-lr)
