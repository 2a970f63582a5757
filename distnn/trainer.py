"""The Trainer: one rank's part of a run, for any Job (the CLI's, or ``distnn.fit``'s).

One step, on every rank: forward and sum loss over the rank's shard of the step's batch,
backward, one SUM all-reduce of the gradients (with the loss in the same buffer), then the
update (``p -= lr * grad``, or the torch.optim optimizer). Every rank applies the same
update to the same weights, so the replicas stay identical and the result equals one
process training on the whole batch.

With --compile the step is compiled whole (wholestep); with --cuda-graph it is captured
once and replayed (cudagraph).

A run: every rank's start-up checks (startup), shared in one exchange, and the newest good
checkpoint -> steps, with checks (non-finite values, replica agreement), validation and
checkpoints every few steps -> summary and save.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from distnn.config import TrainConfig
from distnn.data.batches import ShardStream
from distnn.data.shards import shard_bounds
from distnn.distributed.gradsync import VIA_ROOT_MAX_MB, FlatGradSync
from distnn.distributed.process_group import DeviceWatch, collective, gather_objects
from distnn.distributed.runtime import Runtime
from distnn.errors import EXIT_GUARD, EXIT_OUTPUT, EXIT_USAGE, RunFailed, UsageError
from distnn.job.checks import warn_random_layers
from distnn.job.optimizers import load_state_tensors, state_tensors
from distnn.job.spec import Job, job_from_flags
from distnn.resilience.checkpoint import Checkpoint, FolderLock, save_checkpoint
from distnn.resilience.faults import FaultPlan
from distnn.resilience.guards import check_replicas, disagreements, fingerprint, model_signature
from distnn.resilience.memory import out_of_memory
from distnn.resilience.outputs import describe_os_error, save_weights
from distnn.resilience.preemption import StopRequests
from distnn.run.lossrecord import LossRecord
from distnn.run.metrics import StepLog
from distnn.run.startup import (
    check_job,
    check_memory,
    check_placement,
    claim_checkpoint_dir,
    data_digest,
    job_facts,
    job_objects,
    prepare_outputs,
)
from distnn.run.validation import evaluate
from distnn.step import fusions, wgrad
from distnn.step.cudagraph import capture_step
from distnn.step.wholestep import Batch, Summed, WholeStep

log = logging.getLogger("distnn")
VAL_CHUNK_ROWS = 4096  # validation rows a rank evaluates at a time, at most

STEPS_RANGE = "distnn: steps"  # the profiler range around the step loop and its last flush

JobBuilder = Callable[[TrainConfig, Runtime], Job]


@dataclass
class TrainResult:
    """What a rank holds at the end: its model (identical on every rank), the steps it
    finished, the validation results (one dict per validation, in order), and whether this
    is rank 0 (the rank that prints)."""

    model: nn.Module
    wall_s: float
    steps: int = 0
    val: list[dict] = dataclasses.field(default_factory=list)
    is_main: bool = True


def flag_job(config: TrainConfig, runtime: Runtime) -> Job:
    """The command line's Job (jobs.job_from_flags) for this rank; the flags' own MLP is
    checked against the memory it needs (startup.check_memory) once its sizes are known,
    before it or its data is allocated."""
    return job_from_flags(config, world_size=runtime.world_size, rank=runtime.rank,
                          check_sizes=None if config.model else
                          lambda sizes: check_memory(sizes, runtime,
                                                     given_d_out=config.d_out is not None))


class Trainer:
    """One rank's part of a run. Rank 0 alone prints, writes metrics, checkpoints and saves.

    ``build_job`` makes what to train from the config (default: from the flags); it runs
    inside the start-up checks, so a UsageError it raises on any rank stops every rank.
    """

    def __init__(self, config: TrainConfig, runtime: Runtime, *,
                 environ: Mapping[str, str], build_job: JobBuilder = flag_job) -> None:
        self.config = config  # resolved at start-up (the job's sizes filled in)
        self.rt = runtime
        self.build_job = build_job
        self.fault = FaultPlan.from_environ(environ, restart_count=runtime.launch.restart_count,
                                            device=runtime.device)
        # the Linear layers' weight gradients in this layout (DISTNN_WEIGHT_GRAD, wgrad)
        layout = functools.partial(wgrad.from_environ, environ, precision=config.precision,
                                   device=runtime.device)
        self.weight_grad = layout(compiled=config.compile)
        self._eager_weight_grad = layout(compiled=False)  # if --compile falls back to eager
        self.bf16_fusions = fusions.from_environ(environ)  # DISTNN_BF16_FUSIONS, fusions
        self.job: Job | None = None
        self.losses: LossRecord | None = None  # the global loss of every step (at start-up)
        # Every read of step results waits through it: a GPU stuck behind a collective fails
        # after --timeout-s instead of hanging (also under --cuda-graph, out of NCCL's sight).
        self.watch = DeviceWatch(runtime.device, timeout_s=config.timeout_s)
        self.verified = 0  # steps checked for non-finite values so far
        self.last_checkpoint: str | None = None  # the newest written or resumed from
        self.log: StepLog | None = None
        self.val_results: list[dict] = []  # {"step": S, "loss": ..., ...} per validation
        self.stream: ShardStream | None = None  # the training rows, when read per step
        self.lock: FolderLock | None = None  # rank 0's hold on --checkpoint-dir
        # --compile, --cuda-graph: seconds spent compiling and capturing, outside the timings
        self.compile_s = 0.0
        # --compile: whether the whole step compiled (False: it runs eagerly, with a warning)
        self.step_compiled: bool | None = None

    def train(self) -> TrainResult:
        """load checkpoint -> steps -> checkpoint, summary, save. Raises RunFailed to stop."""
        with tf32_matmuls(self.config.precision == "tf32"):
            try:
                return self._train()
            except RuntimeError as error:  # torch.OutOfMemoryError is one
                failed = out_of_memory(error, self.rt.device)
                if failed is None:
                    raise
                failed.alone = True
                raise failed from None
            finally:
                if self.stream:
                    self.stream.close()
                if self.lock:
                    self.lock.release()

    def _rows_between(self, start: int, stop: int) -> int:
        """The global batch rows that steps ``start`` to ``stop - 1`` train on."""
        plan = self.job.plan  # None: the reference program's one batch, every step
        return plan.rows_between(start, stop) if plan else self.config.batch_size * (stop - start)

    def _train(self) -> TrainResult:
        checkpoint, start = self._start_up()
        job, config = self.job, self.config
        sync = self._place_model(checkpoint, start)
        if self.rt.is_main:
            quiet = config.quiet
            self.log = StepLog(record=self.losses, steps=config.steps,
                               rows_between=self._rows_between, log_every=config.log_every,
                               metrics_path=config.metrics, progress=False if quiet else None,
                               print_steps=not quiet)
        stop = StopRequests(self.rt.device, self.watch)
        try:
            run_step = self._prepare_step(sync, stop, start)
            with stop.installed():
                if self.log:
                    self.log.begin(start)
                # The device finishes the work queued before the steps (placing the weights,
                # a capture's warm-up) before the clock starts, and outside the steps' range.
                self.watch.wait()
                # The range names the steps in a profile (python -m distnn.tools.profile); it costs
                # nothing when no profiler runs.
                with torch.profiler.record_function(STEPS_RANGE), self._after_warm_up():
                    started = time.perf_counter()
                    done = self._run_steps(sync, stop, start, run_step)
                    if self.log:
                        self.log.flush()  # waits for the device: the wall time is honest
                    wall_s = time.perf_counter() - started
                # still caught: a signal now must not end the final checkpoint or --save
                self._finish(sync, stop, start, done, wall_s)
        finally:
            if self.log:
                self.log.close()
        return TrainResult(model=job.model, wall_s=wall_s, steps=done, val=self.val_results,
                           is_main=self.rt.is_main)

    # -- start-up -------------------------------------------------------------------------

    def _start_up(self) -> tuple[Checkpoint | None, int]:
        """Every rank's checks, shared in one gather: any rank's error stops all of them.

        Builds the job (self.job, self.config resolved); returns rank 0's checkpoint (None
        elsewhere) and the step to start at.
        """
        error, code, checkpoint, model, facts = None, EXIT_USAGE, None, None, {}
        try:
            check_placement(self.config, self.rt)
            self.job = self.build_job(self.config, self.rt)
            self.config = self.job.config
            check_job(self.job, ranks=self.rt.world_size if self.rt.communicates else 1)
            if self.rt.is_main:
                warn_random_layers(self.job)
            model = model_signature(self.job.model)  # compared across the ranks below
            facts = job_facts(self.job)  # so are these
            if self.rt.is_main:
                self.lock = claim_checkpoint_dir(self.config)
                checkpoint = prepare_outputs(self.job)
        except UsageError as usage_error:
            error = str(usage_error)
        except RunFailed as failed:  # something does not fit in memory
            error, code = str(failed), failed.exit_code
        except RuntimeError as runtime_error:
            failed = out_of_memory(runtime_error, self.rt.device)
            if failed is None:
                raise
            error, code = str(failed), failed.exit_code
        views = gather_objects({
            "error": error,
            "code": code,
            "fingerprint": {**fingerprint(self.config), **facts},
            "model": model,
            "start": checkpoint.step if checkpoint else 0,
            "tail": checkpoint.losses.tolist() if checkpoint else [],
        }, distributed=self.rt.distributed)
        failures = [view for view in views if view["error"]]
        if failures:
            if failures[0]["code"] == EXIT_USAGE:
                raise UsageError(failures[0]["error"])
            raise RunFailed(failures[0]["error"], failures[0]["code"])
        differ = disagreements([view["fingerprint"] for view in views])
        if differ:
            raise UsageError("the ranks were started differently: " + "; ".join(differ)
                             + "; allowed: the same flags (or distnn.fit arguments) and "
                             "library versions on every rank")
        models = {view["model"] for view in views}
        if len(models) > 1:
            said = ", ".join(f"rank {rank} {view['model']}" for rank, view in enumerate(views))
            raise UsageError(f"the ranks built different models: {said}; allowed: the same "
                             "model on every rank (built the same way, whatever the rank)")
        start = views[0]["start"]
        self.losses = LossRecord(self.rt.device, start=start, tail=views[0]["tail"],
                                 wait=self.watch.wait)
        self.verified = start
        if start:
            self.last_checkpoint = os.path.join(self.config.checkpoint_dir, f"step-{start}")
        return checkpoint, start

    def _place_model(self, checkpoint: Checkpoint | None, start: int) -> FlatGradSync:
        """Moves the model to this rank's device with rank 0's weights (fresh or resumed),
        and the optimizer's state with them."""
        config, job = self.config, self.job
        model = job.model
        if checkpoint:
            try:
                model.load_state_dict(checkpoint.weights)
            except RuntimeError as error:
                raise UsageError(f"--checkpoint-dir: {checkpoint.path} holds weights that do "
                                 f"not fit the model ({str(error).splitlines()[0]}); allowed: "
                                 "resume with the same model") from None
            self.val_results = list(checkpoint.state.get("val", []))
            log.info(f"resuming from {checkpoint.path}: {start} of {config.steps} steps done")
            saved_world = checkpoint.state.get("world_size")
            if saved_world != self.rt.world_size:
                log.warning(f"the checkpoint was written by {saved_world} ranks and this run "
                            f"has {self.rt.world_size}: the result differs from an "
                            "uninterrupted run only by rounding")
        model.to(self.rt.device)
        # Slots after the gradients: the rank's loss and its stop vote. A group of one rank
        # (torchrun --nproc_per_node=1) uses neither: its steps sum nothing (see _step).
        gloo = self.rt.placement.backend == "gloo"
        try:
            sync = FlatGradSync(model, distributed=self.rt.communicates,
                                extra_slots=2, bucket_mb=config.bucket_mb,
                                via_root_max_mb=VIA_ROOT_MAX_MB if gloo else 0.0)
        except ValueError as error:  # the same on every rank: the same model everywhere
            raise UsageError(f"the model: {error}; allowed: a model whose trainable "
                             "parameters share one dtype and device") from None
        sync.broadcast_parameters(src=0)
        self._broadcast_the_rest(model)
        if job.optimizer is not None and start:
            state = [checkpoint.optimizer if checkpoint else None]
            if self.rt.communicates:  # rank 0 alone read the checkpoint
                with collective("broadcasting the optimizer state"):
                    dist.broadcast_object_list(state, src=0)
            load_state_tensors(job.optimizer, state[0])
        return sync

    def _broadcast_the_rest(self, model: nn.Module) -> None:
        """Rank 0's values of the model's tensors outside the flat buffer (frozen parameters
        and buffers: a frozen layer drawn unseeded, or a resumed BatchNorm's statistics,
        which rank 0 alone read from the checkpoint) on every rank."""
        rest = [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]
        if not (self.rt.communicates and rest):
            return
        with collective("broadcasting the frozen parameters and buffers"), torch.no_grad():
            for tensor in rest:
                # as bytes: dense, and of a dtype every backend sends (gloo has no uint32)
                dense = tensor.contiguous()
                dist.broadcast(dense.reshape(-1).view(torch.uint8), src=0)
                if dense is not tensor:
                    tensor.copy_(dense)

    # -- the steps ------------------------------------------------------------------------

    def _pieces(self, x_shard: torch.Tensor, y_shard: torch.Tensor) -> list[Batch]:
        """This rank's micro-batches of a shard: --micro-batches of them, or one a row when
        the shard has fewer rows (a piece of none would add nothing), or one empty piece for
        an empty shard (more ranks than rows)."""
        pieces, count = [], min(self.config.micro_batches, max(1, len(x_shard)))
        for index in range(count):
            first, stop = shard_bounds(len(x_shard), count, index)
            pieces.append((x_shard[first:stop], y_shard[first:stop]))
        return pieces

    def _step(self, sync: FlatGradSync, pieces: list[Batch], vote: torch.Tensor) -> Summed:
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
            self._update(sync)
            return piece_loss.detach(), None
        summed = sync.all_reduce(piece_loss, vote)
        self._update(sync)
        return summed[0], summed[1]

    def _update(self, sync: FlatGradSync) -> None:
        """The reference program's ``p -= lr * grad`` over the flat buffer, or the optimizer's
        step."""
        if self.job.optimizer is None:
            sync.sgd_step(self.config.lr)
        else:
            self.job.optimizer.step()

    def _backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one piece; returns its sum loss."""
        with self._autocast(), wgrad.layout(self.weight_grad):
            loss = self.job.loss_fn(self.job.model(x), y)
        loss.backward()
        return loss

    def _prepare_step(self, sync: FlatGradSync, stop: StopRequests,
                      start: int) -> Callable[[], Summed]:
        """The function that runs one step: eager, compiled whole (--compile), and either
        of them captured (--cuda-graph).

        A fixed batch's pieces are made once; rows read per step come from a ShardStream
        (under --cuda-graph copied into the captured step's input tensors). Compiling (every
        shape the run will meet) and capturing (its warm-up included, with the weights put
        back after it) happen here, so that both stay out of the step timings (in
        ``compile_s``). A replay returns the tensors the captured step returned, which it
        overwrites.
        """
        job, config, rt = self.job, self.config, self.rt
        if job.fixed is not None:
            x_shard, y_shard = (t.to(rt.device) for t in job.fixed)
        else:
            self.stream = ShardStream(job.source, job.plan, world_size=rt.world_size,
                                      rank=rt.rank, device=rt.device, start_step=start)
            x_shard, y_shard = self.stream.next()
        pieces = self._pieces(x_shard, y_shard)
        whole = None
        if config.compile:
            whole, pieces = self._compile(sync, stop, pieces, fixed=job.fixed is not None)
        if whole is not None:
            restore = whole.restore
            step = lambda step_pieces: whole(step_pieces, stop.ballot())  # noqa: E731
        else:
            restore = [sync.flat_params, *job.model.buffers()]  # what a step changes
            step = lambda step_pieces: self._step(sync, step_pieces, stop.ballot())  # noqa: E731
        if config.cuda_graph:
            # rows read per step are copied into the shard the step was captured on; a fixed
            # batch's pieces are held by the captured step (bf16: cast copies, so the fp32
            # shard is not kept)
            rows_into = (x_shard, y_shard) if self.stream is not None else None
            return self._captured_step(lambda: step(pieces), restore, stop, rows_into)
        if job.fixed is not None:
            return lambda: step(pieces)
        first = [pieces]  # the first step's rows are read already

        def read_and_step() -> Summed:
            return step(first.pop() if first else self._pieces(*self.stream.next()))

        return read_and_step

    def _after_warm_up(self) -> AbstractContextManager:
        """For the steps of a compiled whole step: code torch would compile again (every
        shape was compiled at warm-up, so only a model whose Python state changes in its
        forward makes it) runs eagerly instead, as the same step; otherwise each step would
        compile again, and after torch's limit of recompiles fail the run."""
        if not self.step_compiled:
            return nullcontext()
        return torch.compiler.set_stance("eager_on_recompile")

    def _compile(self, sync: FlatGradSync, stop: StopRequests, pieces: list[Batch], *,
                 fixed: bool) -> tuple[WholeStep | None, list[Batch]]:
        """--compile: the whole step compiled (wholestep) for every shape of shard the run
        will meet, before the timed steps (``compile_s`` in the summary), and the first
        step's pieces as it reads them (``fixed``: the same every step, so made ready for it
        once). None, with a warning, for a model the whole step cannot be compiled for: it
        then runs eagerly, on the pieces as they were."""
        job, config = self.job, self.config
        started = time.perf_counter()
        whole = WholeStep(job.model, job.loss_fn, sync, lr=config.lr,
                          bf16=config.precision == "bf16", optimizer=job.optimizer,
                          losses=self.losses.target, weight_grad=self.weight_grad,
                          fusions=self.bf16_fusions)
        ready = whole.inputs(pieces) if fixed else pieces
        try:
            whole.warm_up(self._shapes(ready), stop.ballot())
        except Exception as error:  # noqa: BLE001 - torch.func's and inductor's many kinds
            if out_of_memory(error, self.rt.device) is not None:
                raise
            cause = getattr(error, "inner_exception", None) or error  # inductor wraps it
            said = (str(cause).strip().splitlines() or [""])[0][:200]
            log.warning(f"--compile: the whole step of this model could not be compiled "
                        f"({type(cause).__name__}: {said}); running it eagerly")
            self.compile_s = time.perf_counter() - started
            self.step_compiled = False
            self.weight_grad = self._eager_weight_grad
            return None, pieces
        self.watch.wait()  # the warm-up's device work counts here, not in the first steps
        self.step_compiled = True
        self.compile_s = time.perf_counter() - started
        log.info(f"compiled the step in {self.compile_s:.1f} s")
        return whole, ready

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

    def _captured_step(self, step: Callable[[], Summed], restore: list[torch.Tensor],
                       stop: StopRequests,
                       rows_into: tuple[torch.Tensor, torch.Tensor] | None
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
            stop.ballot()  # sets this rank's vote in the tensor the graph reads, once signalled
            replay_graph()
            return summed

        return replay

    def _run_steps(self, sync: FlatGradSync, stop: StopRequests, start: int,
                   run_step: Callable[[], Summed]) -> int:
        """Steps from ``start`` until ``--steps`` or an agreed stop; returns the steps done."""
        config, rank = self.config, self.rt.rank
        validating = self.job.val is not None  # asked once: the loop is the step's host time
        done = start
        for step in range(start, config.steps):
            if self.fault:
                self.fault.maybe_fire(step=step, rank=rank, flat_params=sync.flat_params)
            loss, votes = run_step()
            if loss is None:  # the compiled step wrote it into the record itself
                self.losses.wrote(step)
            else:
                self.losses.put(step, loss)
            done = step + 1
            if self.log:
                self.log.maybe_flush()
            if validating and self._validation_due(done):
                self._validate(done)
            if stop.agreed(votes):
                break
            if config.verify_every and done % config.verify_every == 0:
                self._verify(done, sync)
            if (config.checkpoint_dir and config.checkpoint_every
                    and done % config.checkpoint_every == 0 and done < config.steps):
                self._checkpoint(done, sync)
        return done

    def _validation_due(self, done: int) -> bool:
        """For a run with validation rows: --val-every K steps, else at the end of each
        epoch (--data) or of the run."""
        config, plan = self.config, self.job.plan
        if config.val_every:
            return done % config.val_every == 0 or done == config.steps
        return done == config.steps or (plan is not None and plan.ends_epoch(done))

    def _validate(self, done: int) -> None:
        """Evaluates on the validation rows (every rank its share; the sums all-reduced);
        rank 0 prints it and writes a ``{"event": "val", ...}`` metrics record."""
        job, rt = self.job, self.rt
        result = {"step": done, **evaluate(
            job.model, job.val, job.loss_fn, chunk_rows=VAL_CHUNK_ROWS,
            world_size=rt.world_size, rank=rt.rank, device=rt.device,
            communicates=rt.communicates, classification=job.classification,
            autocast=self._autocast)}
        self.val_results.append(result)
        if self.log:
            self.log.event({"event": "val", **result})

    def _autocast(self) -> AbstractContextManager:
        """bf16 autocast for --precision bf16 (weights, gradients and all-reduce stay fp32).

        Under --cuda-graph without autocast's weight-cast cache, as the torch.cuda.graphs
        documentation asks for capture: the casts are then kernels in the graph itself.
        """
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.rt.device.type, dtype=torch.bfloat16,
                                  cache_enabled=not self.config.cuda_graph)
        return nullcontext()

    def _verify(self, done: int, sync: FlatGradSync) -> None:
        """Stops the run (RunFailed, exit 3) on non-finite values or diverged replicas.

        A non-finite gradient makes the weights non-finite, and those the next loss, so the
        checks are: the losses since the last check, and the weights now. Every rank reaches
        the same verdict without communicating (the losses are all-reduced, so equal
        everywhere); the replica check is one small all-gather.
        """
        if done <= self.verified:
            return
        self.losses.pull()  # waits for the device, within --timeout-s
        bad = self.losses.first_bad
        if bad is None and not sync.flat_params.isfinite().all():
            # the last update made the weights non-finite; the loss was still finite
            bad = (done - 1, self.losses.last(), None)
        if bad is not None:
            step, loss, previous = bad
            last = f"{previous!r} at step {step - 1}" if previous is not None else "none"
            kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was written")
            raise RunFailed(f"non-finite loss or gradient at step {step} (loss {loss!r}; last "
                            f"finite loss {last}); stopping: {kept}; try a smaller --lr",
                            EXIT_GUARD)
        self.verified = done
        check_replicas(sync.flat_params, step=done, distributed=self.rt.communicates)

    def _checkpoint(self, done: int, sync: FlatGradSync) -> None:
        """Verifies, then rank 0 writes ``step-{done}``: a checkpoint never holds bad weights.

        Every rank learns whether the write worked; if not, all stop (exit 4)."""
        self._verify(done, sync)
        if self.log:  # the metrics file holds every step up to the checkpoint
            self.log.flush()
        job, path = self.job, os.path.join(self.config.checkpoint_dir, f"step-{done}")

        def write() -> None:
            state = {"config": dataclasses.asdict(self.config), "world_size": self.rt.world_size,
                     "rows": job.plan.rows if job.plan else None,
                     "data": data_digest(job), "val": self.val_results,
                     "objects": job_objects(job)}
            if job.plan:  # where the run is in its epoch (the step alone says it too)
                state["epoch"], state["batch_in_epoch"] = job.plan.position(done)
            save_checkpoint(self.config.checkpoint_dir, step=done,
                            weights=job.model.state_dict(),
                            losses=torch.tensor(list(self.losses.tail)),
                            keep=self.config.keep_checkpoints, state=state,
                            optimizer=state_tensors(job.optimizer) if job.optimizer else None)
            log.debug(f"wrote checkpoint step-{done}")

        last = self.last_checkpoint
        if last and not os.path.isdir(last):  # (rank 0's view is the one reported)
            kept = f"the last checkpoint, {last}, is gone too"
        else:
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        self._write_on_rank_0(write, f"could not write the checkpoint {path}",
                              f"{kept}; make room (or the folder again) and run the same "
                              "command to continue")
        self.last_checkpoint = path

    def _write_on_rank_0(self, write: Callable[[], None], failed: str, after: str) -> None:
        """Rank 0 runs ``write``; every rank learns its outcome (one small collective) and,
        if it failed, stops with the same line: ``failed`` (reason) ``after``, exit 4.

        So a full disk on rank 0 is reported as what it is on every rank, not as a lost peer.
        """
        error = None
        if self.rt.is_main:
            try:
                write()
            except OSError as os_error:
                error = f"{failed} ({describe_os_error(os_error)}); {after}"
        if self.rt.communicates:
            outcome = [error]
            with collective("sharing whether rank 0's write worked"):
                dist.broadcast_object_list(outcome, src=0)
            error = outcome[0]
        if error:
            raise RunFailed(error, EXIT_OUTPUT)

    # -- the end --------------------------------------------------------------------------

    def _finish(self, sync: FlatGradSync, stop: StopRequests, start: int, done: int,
                wall_s: float) -> None:
        """Final check and checkpoint; then the summary and --save, or the preemption report."""
        config, rt = self.config, self.rt
        if config.checkpoint_dir and done > start:
            self._checkpoint(done, sync)
        else:
            self._verify(done, sync)
        if done < config.steps:
            name = signal.Signals(stop.signum or signal.SIGTERM).name
            if config.checkpoint_dir and done > start:
                saved = f"wrote {os.path.join(config.checkpoint_dir, f'step-{done}')}"
            elif config.checkpoint_dir:
                saved = "no new step to checkpoint"
            else:
                saved = "no --checkpoint-dir, so nothing was saved"
            raise RunFailed(f"preempted ({name}) after step {done} of {config.steps}: {saved}; "
                            "run the same command to continue", stop.exit_code, label="stopped")
        if self.log:
            ran = done - start
            rows = self._rows_between(start, done)
            self.log.summary({
                "world_size": rt.world_size,
                "device": rt.placement.device,
                "backend": rt.placement.backend if rt.distributed else "none",
                "steps": config.steps,
                "start_step": start,
                "wall_s": round(wall_s, 6),
                "compile_s": round(self.compile_s, 3),
                "samples_per_s": round(rows / wall_s, 1) if ran else 0.0,
                "final_loss": self.losses.last(),
            })
        if config.save:
            kept = (f"the trained weights are in the final checkpoint {self.last_checkpoint}"
                    if self.last_checkpoint else
                    "the trained weights are lost (no --checkpoint-dir)")
            self._write_on_rank_0(lambda: save_weights(self.job.model, config.save),
                                  f"could not write --save {config.save}", kept)


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA float32 matmuls in TF32 (--precision tf32) or in full fp32 (fp32 and bf16: the
    reference's numbers), for one run; the process's own setting is put back after it.

    The setting is global to the process: set and left, one tf32 run would turn the fp32
    runs after it in the same process into TF32 (the benchmark's fp32 rows did exactly that).
    Compiling and capturing read it inside the run, so they see the run's own.
    """
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
