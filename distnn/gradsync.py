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

from distnn.process_group import collective


class FlatGradSync:
    """Keeps ``module``'s parameters and gradients in flat buffers and sums them across ranks.

    Build it after the module is on its device and before training. Zero gradients with
    :meth:`zero_grad`, not ``module.zero_grad()``: the latter sets ``.grad`` to None and
    detaches the gradients from the buffer.
    """

    def __init__(self, module: nn.Module, *, distributed: bool, extra_slots: int = 1) -> None:
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
        self.flat_grads = torch.zeros(self.numel + extra_slots, dtype=params[0].dtype,
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
            with collective("broadcasting the parameters"):
                dist.broadcast(self.flat_params, src=src)

    def zero_grad(self) -> None:
        """Zeroes every gradient (and the loss slot) in place; autograd then accumulates into it."""
        self.flat_grads.zero_()

    def all_reduce(self, *extras: torch.Tensor | float) -> torch.Tensor:
        """Sums the gradients and ``extras`` over all ranks; returns the summed extras.

        Call after ``backward()``. ``extras`` (0-dim tensors or floats, at most
        ``extra_slots``; the first is usually the rank's loss) are written into the slots after
        the gradients. The returned 1-dim tensor is a view into the buffer, overwritten by the
        next step: copy what you keep. No host synchronisation.
        """
        slots = self.flat_grads[self.numel:self.numel + len(extras)]
        for slot, value in zip(slots, extras, strict=True):
            if isinstance(value, torch.Tensor):
                slot.copy_(value.detach())
            else:
                slot.fill_(value)
        if self.distributed:
            with collective("the gradient all-reduce"):
                dist.all_reduce(self.flat_grads, op=dist.ReduceOp.SUM)
        return slots

    def all_finite(self) -> torch.Tensor:
        """A 0-dim bool tensor: are all gradients and extras of this step finite? (no sync)"""
        return torch.isfinite(self.flat_grads).all()

    @torch.no_grad()
    def sgd_step(self, lr: float) -> None:
        """``p -= lr * p.grad`` for every parameter, as one operation over the flat buffer."""
        self.flat_params.add_(self.flat_grads[:self.numel], alpha=-lr)
