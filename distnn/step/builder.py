"""One rank's step, built for a run: eager, compiled whole (--compile), and either of them
captured as a CUDA graph (--cuda-graph).

An eager step, on every rank: forward and sum loss over each micro-batch of the rank's
shard, backward, one SUM all-reduce of the gradients (with the loss and the stop vote in
the same buffer), then the update. Every rank applies the same update to the same weights,
so the replicas stay identical and the result equals one process training on the whole
batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

from distnn.data.batches import ShardStream
from distnn.data.shards import shard_bounds
from distnn.distributed.gradsync import FlatGradSync
from distnn.distributed.process_group import DeviceWatch
from distnn.distributed.runtime import Runtime
from distnn.distributed.sharding import GradSync
from distnn.job.spec import Job
from distnn.resilience.memory import out_of_memory
from distnn.step import wgrad
from distnn.step.cudagraph import capture_step
from distnn.step.precision import Precision
from distnn.step.update import Update
from distnn.step.wholestep import Batch, Summed, WholeStep

if TYPE_CHECKING:
    from distnn.distributed.sharding import ShardedSync

log = logging.getLogger("distnn")

Ballot = Callable[[], torch.Tensor]  # this rank's stop vote for the coming step


class StepBuilder:
    """Makes the function that runs one step (:meth:`build`), and owns what it needs across
    the run: the rows read per step, the time spent compiling and capturing (``compile_s``,
    outside the step timings), and whether the whole step compiled (``compiled``).

    ``weight_grad``: the Linear layers' weight-gradient layout (``DISTNN_WEIGHT_GRAD`` or
    None: the run's default, distnn.step.wgrad); ``bf16_fusions``: whether the compiled bf16
    step uses distnn.step.fusions.
    """

    def __init__(self, job: Job, runtime: Runtime, *, precision: Precision, update: Update,
                 watch: DeviceWatch, weight_grad: str | None = None,
                 bf16_fusions: bool = True) -> None:
        self.job, self.config, self.rt = job, job.config, runtime
        self.precision = precision
        self.update = update
        self.watch = watch
        self.bf16_fusions = bf16_fusions
        layout = dict(precision=self.config.precision, device=runtime.device)
        self.weight_grad = wgrad.resolve(weight_grad, compiled=self.config.compile, **layout)
        # if --compile falls back to eager
        self._eager_weight_grad = wgrad.resolve(weight_grad, compiled=False, **layout)
        self.stream: ShardStream | None = None  # the training rows, when read per step
        self.sharded = False  # the model sharded by FSDP2 (set by build)
        self.compile_s = 0.0
        # --compile: whether it compiled (the whole step; under --shard each unit's forward)
        self.compiled: bool | None = None

    def build(self, sync: GradSync, ballot: Ballot, *, start: int,
              loss_target: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], Summed]:
        """The function that runs one step and returns its global loss and stop votes (a
        loss of None: the compiled step wrote it into ``loss_target`` itself, see
        distnn.run.lossrecord).

        A fixed batch's pieces are made once; rows read per step come from a ShardStream
        (under --cuda-graph copied into the captured step's input tensors). Compiling (every
        shape the run will meet) and capturing (its warm-up included, with the weights put
        back after it) happen here, so that both stay out of the step timings. A replay
        returns the tensors the captured step returned, which it overwrites.
        """
        job, config, rt = self.job, self.config, self.rt
        self.sharded = sync.sharded
        if job.fixed is not None:
            x_shard, y_shard = (t.to(rt.device) for t in job.fixed)
        else:
            self.stream = ShardStream(job.source, job.plan, world_size=rt.world_size,
                                      rank=rt.rank, device=rt.device, start_step=start,
                                      steps=config.steps)
            x_shard, y_shard = self.stream.next()
        pieces = self._pieces(x_shard, y_shard)
        whole = None
        if config.compile and sync.sharded:
            self._warm_up_units(sync, pieces)
        elif config.compile:
            whole, pieces = self._compile(sync, ballot, pieces, loss_target,
                                          fixed=job.fixed is not None)
        if whole is not None:
            restore = whole.restore
            step = lambda step_pieces: whole(step_pieces, ballot())  # noqa: E731
        else:
            # what a step changes (a sharded model is never captured: --shard refuses it)
            restore = [] if sync.sharded else [sync.flat_params, *job.model.buffers()]
            step = lambda step_pieces: self._eager(sync, step_pieces, ballot())  # noqa: E731
        if config.cuda_graph:
            # rows read per step are copied into the shard the step was captured on; a fixed
            # batch's pieces are held by the captured step (bf16: cast copies, so the fp32
            # shard is not kept)
            rows_into = (x_shard, y_shard) if self.stream is not None else None
            return self._captured(lambda: step(pieces), restore, ballot, rows_into)
        if job.fixed is not None:
            return lambda: step(pieces)
        first = [pieces]  # the first step's rows are read already

        def read_and_step() -> Summed:
            return step(first.pop() if first else self._pieces(*self.stream.next()))

        return read_and_step

    def after_warm_up(self) -> AbstractContextManager:
        """For the steps of a compiled whole step: code torch would compile again (every
        shape was compiled at warm-up, so only a model whose Python state changes in its
        forward makes it) runs eagerly instead, as the same step; otherwise each step would
        compile again, and after torch's limit of recompiles fail the run."""
        if not self.compiled:
            return nullcontext()
        return torch.compiler.set_stance("eager_on_recompile")

    def close(self) -> None:
        if self.stream:
            self.stream.close()

    # -- the eager step ---------------------------------------------------------------------

    def _pieces(self, x_shard: torch.Tensor, y_shard: torch.Tensor) -> list[Batch]:
        """This rank's micro-batches of a shard: --micro-batches of them, or one a row when
        the shard has fewer rows (a piece of none would add nothing), or one empty piece for
        an empty shard (more ranks than rows). A sharded model's ranks all run
        --micro-batches pieces, some of them empty (see _backward)."""
        pieces, count = [], min(self.config.micro_batches, max(1, len(x_shard)))
        if self.sharded:  # every piece's forward is collective: as many on every rank
            count = self.config.micro_batches
        for index in range(count):
            first, stop = shard_bounds(len(x_shard), count, index)
            pieces.append((x_shard[first:stop], y_shard[first:stop]))
        return pieces

    def _eager(self, sync: GradSync, pieces: list[Batch], vote: torch.Tensor) -> Summed:
        """One eager step's work on the device; returns the global loss and stop votes.

        Every piece but the last only accumulates its gradients; the last one's backward
        starts the all-reduce of the buckets. With other ranks the loss and ``vote`` travel
        in the gradients' all-reduce, and the sums returned are views into it. Alone, a
        rank's gradients and loss are the global ones already: nothing is packed or summed,
        and there are no votes (None), so one step is the tutorial loop's operators and no
        more (tests/test_fastpath.py).
        """
        sync.zero_grad()
        *early, last = pieces
        local_loss = None
        if early:
            with sync.no_sync():
                for piece in early:
                    piece_loss = self._backward(*piece).detach()
                    local_loss = piece_loss if local_loss is None else local_loss + piece_loss
        piece_loss = self._backward(*last)
        if local_loss is not None:
            piece_loss = local_loss + piece_loss.detach()
        if not sync.distributed:
            return self.update(sync, piece_loss.detach()), None
        summed = sync.all_reduce(piece_loss, vote)
        return self.update(sync, summed[0]), summed[1]

    def _backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one piece; returns its sum loss. An empty piece (a rank
        whose shard of a last, small batch is empty) adds nothing and runs nothing: many
        models cannot take 0 rows (an attention's reshape, say), and its gradients are the
        zeros the gradient sum packs for gradients that were not made. (Sharded, it must
        take part in the block's collectives: see below.)"""
        if not len(x) and not self.sharded:
            return torch.zeros((), device=x.device)
        scale = None
        if not len(x):
            # A sharded model gathers each block's weights in its forward and backward, in
            # which every rank must take part: a row of zeros goes through, weighted 0.
            x, y = x.new_zeros((1, *x.shape[1:])), y.new_zeros((1, *y.shape[1:]))
            scale = 0.0
        with self.precision.autocast(), wgrad.layout(self.weight_grad):
            loss = self.job.loss(self.job.model(x), y)
        if scale is not None:
            loss = loss * scale
        loss.backward()
        return loss

    # -- compiled, captured ---------------------------------------------------------------

    def _compile(self, sync: FlatGradSync, ballot: Ballot, pieces: list[Batch],
                 loss_target: tuple[torch.Tensor, torch.Tensor], *,
                 fixed: bool) -> tuple[WholeStep | None, list[Batch]]:
        """--compile: the whole step compiled (wholestep) for every shape of shard the run
        will meet, before the timed steps, and the first step's pieces as it reads them
        (``fixed``: the same every step, so made ready for it once). None, with a warning,
        for a model the whole step cannot be compiled for: it then runs eagerly, on the
        pieces as they were."""
        job, config = self.job, self.config
        started = time.perf_counter()
        # a step that is one compiled function writes its loss into the record itself, and
        # the others leave it to the trainer: one way for the whole run, or the two would
        # write to different slots. With micro-batches only a 1-row batch is one function.
        own_loss = loss_target if config.micro_batches == 1 else None
        whole = WholeStep(job.model, job.loss_fn, sync, lr=config.lr, bf16=self.precision.bf16,
                          optimizer=job.optimizer, losses=own_loss,
                          weight_grad=self.weight_grad, fusions=self.bf16_fusions,
                          update=self.update, builtin_loss=job.builtin_loss)
        ready = whole.inputs(pieces) if fixed else pieces
        try:
            whole.warm_up(self._shapes(ready), ballot())
        except Exception as error:  # noqa: BLE001 - torch.func's and inductor's many kinds
            if out_of_memory(error, self.rt.device) is not None:
                raise
            cause = getattr(error, "inner_exception", None) or error  # inductor wraps it
            said = (str(cause).strip().splitlines() or [""])[0][:200]
            log.warning(f"--compile: the whole step of this model could not be compiled "
                        f"({type(cause).__name__}: {said}); running it eagerly")
            self.compile_s = time.perf_counter() - started
            self.compiled = False
            self.weight_grad = self._eager_weight_grad
            return None, pieces
        self.watch.wait()  # the warm-up's device work counts here, not in the first steps
        self.compiled = True
        self.compile_s = time.perf_counter() - started
        log.info(f"compiled the step in {self.compile_s:.1f} s")
        return whole, ready

    def _warm_up_units(self, sync: ShardedSync, pieces: list[Batch]) -> None:
        """--compile with FSDP2 (--shard gradients, parameters): the units' forwards were
        compiled where they were sharded (trainer); their compiling happens here, in a
        forward and backward of the first step's pieces whose gradients are dropped (every
        rank runs as many pieces: their collectives match), so that it stays out of the
        step timings. A piece of another shape (a last, smaller batch) then runs eagerly
        (after_warm_up) rather than compile again. The backward stays eager, FSDP2's
        gathers and reduce-scatters between the compiled forwards."""
        started = time.perf_counter()
        buffers = list(self.job.model.buffers())  # a forward may change them (BatchNorm's)
        kept = [buffer.detach().clone() for buffer in buffers]
        sync.zero_grad()
        for piece in pieces:
            self._backward(*piece)
        sync.zero_grad()
        with torch.no_grad():
            for buffer, value in zip(buffers, kept, strict=True):
                buffer.copy_(value)
        self.watch.wait()
        self.compiled = True
        self.compile_s = time.perf_counter() - started
        log.info(f"compiled the sharded units' forwards in {self.compile_s:.1f} s")

    def _shapes(self, pieces: list[Batch]) -> list[list[Batch]]:
        """One step's pieces of every shape this rank will meet: the first step's and, for
        mini-batches, those of a full batch and of the smaller last one (zeros)."""
        plan, rt = self.job.plan, self.rt
        steps, seen = [pieces], {sum(len(x) for x, _ in pieces)}  # by the shard's rows
        if plan is None:
            return steps
        whole, rest = divmod(plan.rows, plan.batch_size)
        sizes = ([plan.batch_size] if whole else []) + ([rest] if rest and not plan.drop_last
                                                         else [])
        x, y = pieces[0]
        for size in sizes:
            first, last = shard_bounds(size, rt.world_size, rt.rank)
            if last - first not in seen:
                seen.add(last - first)
                steps.append(self._pieces(x.new_zeros((last - first, *x.shape[1:])),
                                          y.new_zeros((last - first, *y.shape[1:]))))
        return steps

    def _captured(self, step: Callable[[], Summed], restore: list[torch.Tensor],
                  ballot: Ballot, rows_into: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> Callable[[], Summed]:
        """--cuda-graph: the step captured once; each call replays it, after copying the
        step's rows (when read per step) into ``rows_into``, the inputs and targets it was
        captured on."""
        started = time.perf_counter()
        replay_graph, summed = capture_step(step, restore=restore)
        captured_s = time.perf_counter() - started
        self.compile_s += captured_s
        log.info(f"captured the step as a CUDA graph in {captured_s:.1f} s")
        fresh = [True]  # the first step's rows are in the captured tensors already

        def replay() -> Summed:
            if fresh:
                fresh.clear()
            elif rows_into is not None:
                for captured, rows in zip(rows_into, self.stream.next(), strict=True):
                    captured.copy_(rows)
            ballot()  # sets this rank's vote in the tensor the graph reads, once signalled
            replay_graph()
            return summed

        return replay
