"""``--compile``: the whole training step compiled, forward, loss, backward and update.

The eager step is the model's forward and loss, autograd's backward, then the update: on a
GPU about twenty kernels for the reference model, most of them small elementwise work
around its five matmuls (bias, ReLU and its mask, the loss and its gradient, the bias
gradients, the update), each a launch and a trip through memory. Here the step is a
function that inductor compiles whole, so it can fuse that work:

- The loss is the model called on *views of the flat parameter buffer*
  (``torch.func.functional_call``; the model's buffers, BatchNorm's running statistics
  say, are passed in too and updated in place), differentiated by
  ``torch.func.grad_and_value`` with respect to the buffer itself: the gradient comes out
  flat, in the gradient buffer's layout, with no packing ``cat``.
- Alone (one rank, the reference program's ``p -= lr * grad``, one piece) the update is in the same
  function: forward, backward, update, and the loss written into the run's loss record
  (its device-side slot advanced: see LossRecord.target), are one compiled graph.
- Otherwise the step splits at the all-reduce: the compiled part writes the gradient, the
  loss and the stop vote into the gradient buffer, the buffer is summed
  (:meth:`FlatGradSync.sum_packed`; under ``--cuda-graph`` NCCL runs inside the graph),
  then the update runs.
- ``--precision bf16``: the ``nn.Linear`` layers read bf16 copies of their weights and
  biases, which the reference program's update refreshes from the fp32 weights in the same
  kernel (after a torch.optim step, one copy), instead of casting them at every step;
  autocast would cast exactly those to bf16, so the arithmetic is the eager bf16 step's.
  Every other parameter is read in fp32, as autocast leaves it. The gradients are fp32 (a
  bf16 layer's are its bf16 products made fp32, as autocast's cast gives them), and so are
  the all-reduce and the weights. A fixed batch (the same rows every step) whose only
  reader is an ``nn.Linear`` (the first layer of an ``nn.Sequential``) is cast to bf16
  once (:meth:`WholeStep.inputs`), where autocast would cast it in every step. The sum MSE
  loss and an ``nn.Sequential``'s Linear+ReLU pairs take fewer passes over memory
  (distnn/step/fusions.py; ``DISTNN_BF16_FUSIONS=0`` turns that off).

``DISTNN_WEIGHT_GRAD`` (wgrad) makes the Linear layers' weight gradients come from another
layout of the same product.

A torch.optim optimizer, several micro-batches (their gradients added in fp32) and empty
shards (more ranks than rows) use the same compiled gradient; the optimizer's own step
stays eager. So does an update that does more than ``p -= lr * grad`` or the optimizer's
step (``--loss-reduction mean``, ``--clip-grad-norm``, ``--lr-schedule`` and
``--warmup-steps``, a scheduler given to distnn.fit): the step splits after the compiled
gradient, alone too, and the eager step's own update (distnn.step.update) runs on the
summed gradients, so the mean's count, the clipping, its norm records and each update's
rate are the eager step's.

Every shape the run will meet is compiled by :meth:`WholeStep.warm_up`, before the timed
steps; a model that torch.func or inductor cannot take fails there (the trainer then runs
the eager step, with a warning).

What it costs: the buckets' all-reduces cannot start during backward, which runs inside one
compiled function, so a model large enough for several buckets loses that overlap; and
compiling takes seconds per shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import CodeType, FunctionType, MethodType

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from distnn.distributed.gradsync import FlatGradSync
from distnn.job.losses import apply_loss
from distnn.step.fusions import loss_in_one_pass, relu_epilogues, sequential_forward
from distnn.step.update import Update
from distnn.step.wgrad import AUTOGRAD, layout

Batch = tuple[torch.Tensor, torch.Tensor]  # a piece of the rank's shard: inputs, targets
# What a step returns: the global loss (None: written into the loss record already), and
# the sum of the ranks' stop votes (None alone).
Summed = tuple[torch.Tensor | None, torch.Tensor | None]
Buffers = dict[str, torch.Tensor]


class WholeStep:
    """One rank's compiled training step over ``sync``'s flat buffers.

    Build it once the weights are final (placed, broadcast, resumed). Each call runs one
    step: ``step(pieces, vote)`` with the rank's pieces of the batch and its stop vote (a
    1-element tensor); it returns the global loss and the summed votes (None alone), as
    tensors the next step may overwrite. Given ``losses`` (a LossRecord's ``target``), a
    step done in one compiled function writes its loss there and returns None for it.

    The update is ``p -= lr * grad``, or ``optimizer``'s step; given ``update`` (the eager
    step's) that does more (a mean, gradient transforms, a changing rate), each step runs
    it on the summed gradients instead, and returns the loss it returns. ``builtin_loss``:
    ``loss_fn`` is distnn's, applied as the eager step applies it (Job.loss: the scores
    found in the output, the classes last for cross-entropy); else to the output as it is.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, sync: FlatGradSync, *, lr: float,
                 bf16: bool, optimizer: torch.optim.Optimizer | None,
                 losses: tuple[torch.Tensor, torch.Tensor] | None = None,
                 weight_grad: str = AUTOGRAD, fusions: bool = True,
                 update: Update | None = None, builtin_loss: bool = False) -> None:
        if sync.flat_grads.numel() != sync.numel + 2:
            raise ValueError("WholeStep: the gradient buffer needs 2 extra slots (the loss and "
                             f"the stop vote), got {sync.flat_grads.numel() - sync.numel}")
        self.model, self.loss_fn, self.sync = model, loss_fn, sync
        self.builtin_loss = builtin_loss
        self.lr, self.optimizer = lr, optimizer
        # the update's index, the schedule's rate, the clipping's norm records and a
        # scheduler's state are the host's, per update: the eager update keeps them, and
        # its few operations on the summed gradients run as the eager step runs them
        self.update = update if update is not None and _does_more(update) else None
        # the compiled updates read the learning rate from a tensor: as a Python number it
        # would be a constant of the compiled code, and each run with another --lr in one
        # process (a sweep) would compile again, until torch's limit of 8 made it fail
        self._lr = torch.tensor(lr, dtype=sync.flat_params.dtype,
                                device=sync.flat_params.device)
        self.buffers: Buffers = dict(model.named_buffers())
        self.losses = losses
        device = sync.flat_params.device
        names = {id(p): name for name, p in model.named_parameters()}
        linear = {id(p) for module in model.modules() if isinstance(module, nn.Linear)
                  for p in module.parameters(recurse=False)}
        # (name, first, stop, shape, read from the bf16 copy): each parameter's place
        self._layout = [(names[id(p)], first, first + p.numel(), p.shape,
                         bf16 and id(p) in linear)
                        for p, first in zip(sync.params, sync.offsets, strict=True)]
        # bf16: the weights the Linear layers read; kept equal to the fp32 ones
        self.copy = sync.flat_params.to(torch.bfloat16) if bf16 else None
        self._autocast: Callable[[], AbstractContextManager] = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False))
            if bf16 else nullcontext)
        self.weight_grad = weight_grad  # the Linear layers' dW in this layout (wgrad)
        # bf16: the loss and Linear+ReLU pairs in fewer passes (distnn/step/fusions.py)
        fused = bf16 and fusions
        self._loss_of = (fused and loss_in_one_pass(loss_fn)) or loss_fn
        self._relu_epilogues = fused and relu_epilogues(model)
        self._grads = grad_and_value(self._loss, argnums=(0, 1) if bf16 else 0)
        kind = (repr(model), bf16, device.type)  # which steps may share compiled graphs
        self._compiled_step_alone = _compiled(self._step_alone, kind)
        self._compiled_write_gradient = _compiled(self._write_gradient, kind)
        self._compiled_gradient = _compiled(self._gradient, kind)
        self._compiled_sgd_and_refresh = _compiled(self._sgd_and_refresh, kind)

    def inputs(self, pieces: Sequence[Batch]) -> list[Batch]:
        """The pieces of a fixed batch as every step will read them: under bf16, inputs
        that only an ``nn.Linear`` reads cast to bf16 here, once, instead of by autocast in
        every step (the same rounding, so the same numbers); otherwise as they are. Warm up
        and step with what this returns."""
        if self.copy is None or not _read_by_linear_only(self.model):
            return list(pieces)
        return [(x.to(torch.bfloat16) if x.is_floating_point() else x, y) for x, y in pieces]

    @property
    def restore(self) -> list[torch.Tensor]:
        """What a step changes besides the gradients: the weights, their bf16 copy, the
        model's buffers, and the loss record's window and slot (what a capture's warm-up
        steps change, to be put back)."""
        return [self.sync.flat_params, *([self.copy] if self.copy is not None else []),
                *self.buffers.values(), *(self.losses or ())]

    def __call__(self, pieces: Sequence[Batch], vote: torch.Tensor) -> Summed:
        sync = self.sync
        if self._fused(pieces):
            return self._compiled_step_alone(sync.flat_params, self.copy, self.buffers,
                                             *pieces[0], self._lr, self.losses), None
        self._write_gradients(pieces, vote, sync.flat_params, self.copy, self.buffers,
                              sync.flat_grads)
        extras = sync.sum_packed()
        if self.update is not None:
            loss = self.update(sync, extras[0])  # every p.grad is a view into the sum
            if self.copy is not None:
                self.copy.copy_(sync.flat_params)
            return loss, (extras[1] if sync.distributed else None)
        if self.optimizer is not None:
            self.optimizer.step()  # p.grad are views into the summed buffer
            if self.copy is not None:
                self.copy.copy_(sync.flat_params)
        elif self.copy is not None:
            self._compiled_sgd_and_refresh(sync.flat_params, self.copy, sync.grads, self._lr)
        else:
            sync.sgd_step(self.lr)
        return extras[0], (extras[1] if sync.distributed else None)

    def warm_up(self, steps: Sequence[Sequence[Batch]], vote: torch.Tensor) -> None:
        """Compiles what the steps will call, for each of ``steps`` (one step's pieces each:
        a step of every shape the run meets), on scratch copies of the weights and buffers,
        which the real ones never see."""
        master, out = self.sync.flat_params.clone(), self.sync.flat_grads.clone()
        copy = None if self.copy is None else self.copy.clone()
        buffers = {name: buffer.clone() for name, buffer in self.buffers.items()}
        losses = None if self.losses is None else tuple(t.clone() for t in self.losses)
        for pieces in steps:
            if self._fused(pieces):
                self._compiled_step_alone(master, copy, buffers, *pieces[0], self._lr, losses)
                continue
            self._write_gradients(pieces, vote, master, copy, buffers, out)
            if copy is not None and self.optimizer is None and self.update is None:
                self._compiled_sgd_and_refresh(master, copy, out[:self.sync.numel], self._lr)

    def _fused(self, pieces: Sequence[Batch]) -> bool:
        """Whether the step is one compiled function: alone, the reference program's update
        (nothing more), one piece."""
        return (not self.sync.distributed and self.optimizer is None and self.update is None
                and len(pieces) == 1 and len(pieces[0][0]) > 0)

    def _write_gradients(self, pieces: Sequence[Batch], vote: torch.Tensor,
                         master: torch.Tensor, copy: torch.Tensor | None, buffers: Buffers,
                         out: torch.Tensor) -> None:
        """Writes the pieces' summed gradient, their loss and ``vote`` into ``out``."""
        if len(pieces) == 1 and len(pieces[0][0]):
            self._compiled_write_gradient(master, copy, buffers, *pieces[0], vote, out)
            return
        grad = loss = None
        for piece_x, piece_y in pieces:  # micro-batches, or an empty shard (eager: no shape
            compute = self._compiled_gradient if len(piece_x) else self._gradient  # of 0 rows)
            piece_grad, piece_loss = compute(master, copy, buffers, piece_x, piece_y)
            grad = piece_grad if grad is None else grad + piece_grad
            loss = piece_loss if loss is None else loss + piece_loss
        torch.cat([grad, loss.reshape(1).to(out.dtype), vote.to(out.dtype)], out=out)

    # -- the functions compiled -----------------------------------------------------------

    def _loss(self, master: torch.Tensor, copy: torch.Tensor | None, buffers: Buffers,
              x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum loss of a piece, for the weights in the flat layout of ``master`` (and,
        for the bf16 Linear layers, of ``copy``)."""
        params = {name: (copy if from_copy else master)[first:stop].view(shape)
                  for name, first, stop, shape, from_copy in self._layout}
        with self._autocast(), layout(self.weight_grad):
            if self._relu_epilogues:
                output = sequential_forward(self.model, {**params, **buffers}, x)
            else:
                output = functional_call(self.model, (params, buffers), (x,))
            return apply_loss(self._loss_of, self.builtin_loss, output, y)

    def _gradient(self, master: torch.Tensor, copy: torch.Tensor | None, buffers: Buffers,
                  x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The piece's flat fp32 gradient and its sum loss."""
        if copy is None:
            return self._grads(master, copy, buffers, x, y)
        (of_master, of_copy), loss = self._grads(master, copy, buffers, x, y)
        return of_master + of_copy.to(of_master.dtype), loss  # each is zero where the other is

    def _step_alone(self, master: torch.Tensor, copy: torch.Tensor | None, buffers: Buffers,
                    x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor,
                    losses: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        grad, loss = self._gradient(master, copy, buffers, x, y)
        master.sub_(lr * grad)  # the reference program's p -= lr * grad
        if copy is not None:
            copy.copy_(master)
        if losses is None:
            return loss
        window, slot = losses
        window.index_put_((slot.reshape(1),), loss.reshape(1).to(window.dtype))
        slot.copy_((slot + 1) % window.numel())
        return None

    def _write_gradient(self, master: torch.Tensor, copy: torch.Tensor | None,
                        buffers: Buffers, x: torch.Tensor, y: torch.Tensor, vote: torch.Tensor,
                        out: torch.Tensor) -> None:
        grad, loss = self._gradient(master, copy, buffers, x, y)
        out.copy_(torch.cat([grad, loss.reshape(1).to(out.dtype), vote.to(out.dtype)]))

    def _sgd_and_refresh(self, master: torch.Tensor, copy: torch.Tensor,
                         grads: torch.Tensor, lr: torch.Tensor) -> None:
        master.sub_(lr * grads)
        copy.copy_(master)


def _compiled(method: MethodType, kind: tuple) -> Callable:
    """torch.compile of a WholeStep's method, on a copy of its code kept for steps of one
    ``kind`` (the model as ``repr`` prints it, bf16 or not, the device type).

    Dynamo keeps what it compiled on the code object and reuses it for any step whose guards
    pass, so a second run of the same model in the process (a sweep over --lr with
    distnn.fit in a notebook) compiles nothing. But one code object for every model meets
    torch's limit of eight compiled versions after eight kinds of model in one process (a
    notebook, a test suite), and under ``fullgraph=True`` that is an error. A copy of the code
    per kind keeps the reuse and gives each kind its own count.
    ``fullgraph``: a graph break inside torch.func's transform would run all of it eagerly
    (slower than the eager step); as an error it makes the trainer run the eager step."""
    function = method.__func__
    code = _CODES.setdefault((function.__name__, *kind), function.__code__.replace())
    own = FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                       function.__closure__)
    own.__kwdefaults__ = function.__kwdefaults__
    return torch.compile(MethodType(own, method.__self__), dynamic=False, fullgraph=True)


_CODES: dict[tuple, CodeType] = {}  # (method name, *kind) -> the code its steps share


def _does_more(update: Update) -> bool:
    """Whether ``update`` does more than ``p -= lr * grad`` or its optimizer's step: divides
    by the mean's count, transforms the gradients, or changes the rate."""
    return update.mean_count is not None or bool(update.transforms) or update.scheduled


def _read_by_linear_only(model: nn.Module) -> bool:
    """Whether the model's input goes to an ``nn.Linear`` and nowhere else: the first module
    of an ``nn.Sequential`` (of nested ones) is one. Autocast casts such an input to bf16
    before anything reads it."""
    while isinstance(model, nn.Sequential):
        if not len(model):
            return False
        model = model[0]
    return isinstance(model, nn.Linear)
