"""``--compile``: the whole training step compiled, forward, loss, backward and update.

The eager step is the model's forward and loss, autograd's backward, then the update: on a
GPU about twenty kernels for the reference model, most of them small elementwise work
around its five matmuls (bias, ReLU and its mask, the loss and its gradient, the bias
gradients, the update), each a launch and a trip through memory. Here the step is a
function that inductor compiles whole, so it can fuse that work:

- The loss is the model called on *views of the flat parameter buffer*
  (``torch.func.functional_call``), differentiated by ``torch.func.grad_and_value`` with
  respect to the buffer itself: the gradient comes out flat, in the gradient buffer's
  layout, with no packing ``cat``.
- Alone (one rank, the seed's ``p -= lr * grad``) the update is in the same function:
  forward, backward and update are one compiled graph.
- With other ranks the step splits at the all-reduce: the compiled part writes the
  gradient, the loss and the stop vote into the gradient buffer, the buffer is summed
  (:meth:`FlatGradSync.sum_packed`; under ``--cuda-graph`` NCCL runs inside the graph),
  then the update runs.
- ``--precision bf16``: the forward reads bf16 copies of the weights, which the update
  refreshes from the fp32 weights in the same kernel, instead of casting every weight at
  every step. Autocast still picks each operator's precision, so the arithmetic is that of
  the eager bf16 step; the gradients, the all-reduce and the weights stay fp32.

A torch.optim optimizer, several micro-batches and empty shards (more ranks than rows)
use the same compiled gradient function; the optimizer's own step stays eager. Every
shape a run will meet is compiled by :meth:`WholeStep.warm_up`, before the timed steps.

What it costs: the buckets' all-reduces cannot start during backward, which runs inside one
compiled function, so a model large enough for several buckets loses that overlap; and
compiling takes seconds per shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from distnn.gradsync import FlatGradSync

Batch = tuple[torch.Tensor, torch.Tensor]  # a piece of the rank's shard: inputs, targets
# What a step returns: the global loss, and the sum of the ranks' stop votes (None alone).
Summed = tuple[torch.Tensor, torch.Tensor | None]


class WholeStep:
    """One rank's compiled training step over ``sync``'s flat buffers.

    Build it once the weights are final (placed, broadcast, resumed). Each call runs one
    step: ``step(pieces, vote)`` with the rank's pieces of the batch and its stop vote (a
    1-element tensor); it returns the global loss and the summed votes (None alone), as
    tensors the next step may overwrite.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, sync: FlatGradSync, *, lr: float,
                 bf16: bool, optimizer: torch.optim.Optimizer | None) -> None:
        if sync.flat_grads.numel() != sync.numel + 2:
            raise ValueError("WholeStep: the gradient buffer needs 2 extra slots (the loss and "
                             f"the stop vote), got {sync.flat_grads.numel() - sync.numel}")
        self.model, self.loss_fn, self.sync = model, loss_fn, sync
        self.lr, self.optimizer = lr, optimizer
        device = sync.flat_params.device
        names = {id(p): name for name, p in model.named_parameters()}
        # (name, first, stop, shape): each parameter's place in the flat buffer
        self._layout, offset = [], 0
        for p in sync.params:
            self._layout.append((names[id(p)], offset, offset + p.numel(), p.shape))
            offset += p.numel()
        # bf16: the weights the forward reads; the update keeps them equal to the fp32 ones
        self.copy = sync.flat_params.to(torch.bfloat16) if bf16 else None
        self._autocast: Callable[[], AbstractContextManager] = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False))
            if bf16 else nullcontext)
        self._grad = grad_and_value(self._loss)
        compiled = lambda function: torch.compile(function, dynamic=False)  # noqa: E731
        self._alone = compiled(self._step_alone)
        self._pack = compiled(self._pack_one)
        self._piece_grad = compiled(self._grad_of_piece)
        self._sgd = compiled(self._sgd_bf16)

    @property
    def restore(self) -> list[torch.Tensor]:
        """What a capture's warm-up steps change, to be put back (see cudagraph)."""
        return [self.sync.flat_params] + ([self.copy] if self.copy is not None else [])

    def __call__(self, pieces: Sequence[Batch], vote: torch.Tensor) -> Summed:
        sync = self.sync
        loss = self._compute(pieces, vote, sync.flat_params, self.copy, sync.flat_grads)
        if loss is not None:  # alone, and updated already
            return loss, None
        extras = sync.sum_packed()
        if self.optimizer is not None:
            self.optimizer.step()  # p.grad are views into the summed buffer
            if self.copy is not None:
                self.copy.copy_(sync.flat_params)
        elif self.copy is not None:
            self._sgd(sync.flat_params, self.copy, sync.grads)
        else:
            sync.sgd_step(self.lr)
        return extras[0], extras[1] if sync.distributed else None

    def warm_up(self, steps: Sequence[Sequence[Batch]], vote: torch.Tensor) -> None:
        """Compiles what the steps will call, for each of ``steps`` (one step's pieces each:
        a step of every shape the run meets), on scratch copies: the weights do not move."""
        master, out = self.sync.flat_params.clone(), self.sync.flat_grads.clone()
        copy = None if self.copy is None else self.copy.clone()
        for pieces in steps:
            if self._compute(pieces, vote, master, copy, out) is None and copy is not None:
                self._sgd(master, copy, out[:self.sync.numel])

    # -- the compiled parts ---------------------------------------------------------------

    def _compute(self, pieces: Sequence[Batch], vote: torch.Tensor, master: torch.Tensor,
                 copy: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor | None:
        """Alone with the seed's update and one piece: the whole step, returning the loss.
        Otherwise writes the gradient, the loss and ``vote`` into ``out`` (None)."""
        sync, (x, y) = self.sync, pieces[0]
        if len(pieces) == 1 and len(x):
            if not sync.distributed and self.optimizer is None:
                return self._alone(master, copy, x, y)
            self._pack(master if copy is None else copy, x, y, vote, out)
            return None
        weights = master if copy is None else copy
        grad = loss = None
        for x, y in pieces:  # micro-batches, or an empty shard (eager: no shape of 0 rows)
            piece_grad, piece_loss = (self._piece_grad if len(x) else self._grad)(weights, x, y)
            grad = piece_grad if grad is None else grad + piece_grad
            loss = piece_loss if loss is None else loss + piece_loss
        torch.cat([grad.to(out.dtype), loss.reshape(1).to(out.dtype), vote.to(out.dtype)],
                  out=out)
        return None

    def _loss(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum loss of a piece, for the weights in the flat layout of ``weights``."""
        params = {name: weights[first:stop].view(shape)
                  for name, first, stop, shape in self._layout}
        with self._autocast():
            return self.loss_fn(functional_call(self.model, params, (x,)), y)

    def _step_alone(self, master: torch.Tensor, copy: torch.Tensor | None, x: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        grad, loss = self._grad(master if copy is None else copy, x, y)
        master.add_(grad.to(master.dtype), alpha=-self.lr)
        if copy is not None:
            copy.copy_(master)
        return loss

    def _pack_one(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  vote: torch.Tensor, out: torch.Tensor) -> None:
        grad, loss = self._grad(weights, x, y)
        out.copy_(torch.cat([grad.to(out.dtype), loss.reshape(1).to(out.dtype),
                             vote.to(out.dtype)]))

    def _grad_of_piece(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._grad(weights, x, y)

    def _sgd_bf16(self, master: torch.Tensor, copy: torch.Tensor, grads: torch.Tensor) -> None:
        master.add_(grads, alpha=-self.lr)
        copy.copy_(master)
