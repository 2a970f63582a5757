"""The Trainer: one rank's part of a run, for any Job (the command line's, or
``distnn.fit``'s), composed of parts that each own their state and decide when they are due:

- the start-up agreement (distnn.run.agreement): every rank's checks in one exchange;
- the replicas (distnn.distributed.replicas): the model on every rank, with rank 0's values;
- the step (distnn.step.builder): eager, compiled whole, or captured, with its update
  (distnn.step.update) and precision (distnn.step.precision);
- the loss record (distnn.run.lossrecord) and rank 0's metrics log (distnn.run.metrics);
- the validator (distnn.run.validation), the verifier (distnn.run.verifier), the
  checkpointer (distnn.run.checkpointer), the stop requests (distnn.resilience.preemption).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

import torch
from torch import nn

from distnn.config import TrainConfig
from distnn.distributed.process_group import DeviceWatch, communication
from distnn.distributed.replicas import place_whole, replicate
from distnn.distributed.runtime import Runtime
from distnn.distributed.sharding import (
    GradSync,
    ShardedSync,
    check_shardable,
    find_blocks,
    optimizer_recipe,
    rebuild_optimizer,
    sharded_optimizer,
)
from distnn.errors import RunFailed, UsageError
from distnn.job.spec import Job, job_from_flags
from distnn.resilience.memory import out_of_memory
from distnn.resilience.preemption import StopRequests
from distnn.run.agreement import JobBuilder, agree_at_start
from distnn.run.checkpointer import Checkpointer
from distnn.run.lossrecord import LossRecord
from distnn.run.metrics import StepLog
from distnn.run.sinks import TensorBoardSink
from distnn.run.startup import check_memory
from distnn.run.targetcount import TargetCounts
from distnn.run.validation import Validator
from distnn.run.verifier import Verifier
from distnn.settings import Settings
from distnn.step.builder import StepBuilder
from distnn.step.precision import Precision
from distnn.step.recompute import recompute_in_backward
from distnn.step.schedule import Schedule
from distnn.step.update import ClipGradNorm, Update
from distnn.step.wholestep import Summed

log = logging.getLogger("distnn")

STEPS_RANGE = "distnn: steps"  # the profiler range around the step loop and its last flush


@dataclasses.dataclass
class TrainResult:
    """What a rank holds at the end: its model (identical on every rank; under --shard
    gradients or parameters its own shards, DTensors usable while the group exists), the
    steps it finished, the validation results (one dict per validation, in order), and
    whether this is rank 0 (the rank that prints). ``losses``: the global losses of the
    newest steps (up to 1000: all of a short run); ``compiled``: under --compile, whether
    it compiled (the whole step; under --shard, each unit's forward) or fell back to
    eager; ``compile_s``: seconds spent compiling and capturing, outside ``wall_s``."""

    model: nn.Module
    wall_s: float
    steps: int = 0
    val: list[dict] = dataclasses.field(default_factory=list)
    is_main: bool = True
    losses: list[float] = dataclasses.field(default_factory=list)
    compiled: bool | None = None
    compile_s: float = 0.0


def flag_job(config: TrainConfig, runtime: Runtime) -> Job:
    """The command line's Job (job_from_flags) for this rank; the flags' own MLP is checked
    against the memory it needs (startup.check_memory) once its sizes are known, before it
    or its data is allocated."""
    return job_from_flags(config, world_size=runtime.world_size, rank=runtime.rank,
                          check_sizes=None if config.model else
                          lambda sizes: check_memory(sizes, runtime,
                                                     given_d_out=config.d_out is not None))


class Trainer:
    """One rank's part of a run. Rank 0 alone prints, writes metrics, checkpoints and saves.

    ``build_job`` makes what to train from the config (default: from the flags); it runs
    inside the start-up agreement, so a UsageError it raises on any rank stops every rank.
    ``settings``: what the environment asks for (distnn.settings; nothing by default).
    The parts are made at start-up, when the job is known.
    """

    def __init__(self, config: TrainConfig, runtime: Runtime, *,
                 settings: Settings | None = None, build_job: JobBuilder = flag_job) -> None:
        self.config = config  # resolved at start-up (the job's sizes filled in)
        self.rt = runtime
        self.settings = settings = settings or Settings()
        self.build_job = build_job
        self.precision = Precision(config.precision, device=runtime.device,
                                   cuda_graph=config.cuda_graph)
        self.fault = settings.fault and settings.fault.for_attempt(
            restart_count=runtime.launch.restart_count, device=runtime.device,
            world_size=runtime.world_size)
        # Every read of step results waits through it: a GPU stuck behind a collective fails
        # after --timeout-s instead of hanging (also under --cuda-graph, out of NCCL's sight).
        self.watch = DeviceWatch(runtime.device, timeout_s=config.timeout_s)
        self.stop = StopRequests(runtime.device, self.watch)
        self.job: Job | None = None
        self.losses: LossRecord | None = None  # the global loss of every step
        self.sync: GradSync | None = None  # the gradients' sum; the weights, whole or sharded
        self.builder: StepBuilder | None = None
        self.checkpointer: Checkpointer | None = None
        self.verifier: Verifier | None = None
        self.validator: Validator | None = None
        self.steps_log: StepLog | None = None  # rank 0's lines and metrics records

    def train(self) -> TrainResult:
        """start up (agree, resume, replicate) -> steps -> checkpoint, summary, save.
        Raises RunFailed to stop."""
        with self.precision.matmuls():
            try:
                done, wall_s = self._run_said()
            except BaseException:
                self._close(failing=True)
                raise
            self._close()
        return TrainResult(model=self.job.model, wall_s=wall_s, steps=done,
                           val=self.validator.results, is_main=self.rt.is_main,
                           losses=list(self.losses.tail), compiled=self.builder.compiled,
                           compile_s=self.builder.compile_s)

    def _run_said(self) -> tuple[int, float]:
        """:meth:`_run`, its failures of torch's own collectives and of memory in one line."""
        try:
            # a peer lost inside torch's own collectives (FSDP2's gathers in a forward,
            # ZeroRedundancyOptimizer's broadcasts) is said in one line, as distnn's are
            with communication("a collective inside torch (FSDP2, ZeroRedundancyOptimizer)"):
                return self._run()
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            failed = out_of_memory(error, self.rt.device)
            if failed is None:
                raise
            failed.alone = True
            raise failed from None

    def _run(self) -> tuple[int, float]:
        """The run's start-up, steps and end; returns the steps done and the steps' wall
        seconds."""
        start = self._start_up()
        run_step = self.builder.build(self.sync, self.stop.ballot, start=start,
                                    loss_target=self.losses.target)
        with self.stop.installed():
            if self.steps_log:
                self.steps_log.begin(start)
            # The device finishes the work queued before the steps (placing the
            # weights, a capture's warm-up) before the clock starts, outside the range.
            self.watch.wait()
            with torch.profiler.record_function(STEPS_RANGE), self.builder.after_warm_up():
                started = time.perf_counter()
                done = self._run_steps(run_step, start)
                if self.steps_log:
                    self.steps_log.flush()  # waits for the device: the time is honest
                wall_s = time.perf_counter() - started
            # still caught: a signal now must not end the final checkpoint or --save
            self._finish(start, done, wall_s)
        return done, wall_s

    def _run_steps(self, run_step: Callable[[], Summed], start: int) -> int:
        """Steps from ``start`` until --steps or an agreed stop; returns the steps done."""
        rank, losses, sync = self.rt.rank, self.losses, self.sync
        done = start
        for step in range(start, self.config.steps):
            if self.fault:
                self.fault.maybe_fire(step=step, rank=rank, flat_params=sync.fault_target)
            loss, votes = run_step()
            if loss is None:  # the compiled step wrote it into the record itself
                losses.wrote(step)
            else:
                losses.put(step, loss)
            done = step + 1
            if self.steps_log:
                self.steps_log.maybe_flush()
            if self.validator.due(done):
                self.validator.run(done)
            if self.stop.agreed(votes):
                break
            if self.verifier.due(done):
                self.verifier.verify(done, sync)
            if self.checkpointer.due(done):
                self._checkpoint(done)
        return done

    # -- start-up and the end -------------------------------------------------------------

    def _start_up(self) -> int:
        """The ranks' agreement, then the parts; the model resumed and on every rank.
        Returns the step to start at."""
        rt = self.rt
        agreed = agree_at_start(self.config, rt, self.build_job)
        job = self.job = agreed.job
        start = agreed.start
        config = self.config = job.config
        self.losses = LossRecord(rt.device, start=start, tail=agreed.tail, wait=self.watch.wait)
        # under --clip-grad-norm, each update's gradient norm, kept as the losses are
        grad_norms = (LossRecord(rt.device, start=start, wait=self.watch.wait)
                      if config.clip_grad_norm else None)
        self.checkpointer = Checkpointer(job, rt, self.losses, resumed=agreed.checkpoint,
                                         start=start, lock=agreed.lock)
        if self.fault:  # (the checkpointer holds the folder's lock now: closing frees it)
            self.fault.check_step(config.steps)
        self.verifier = self.checkpointer.verifier = Verifier(
            self.losses, every=config.verify_every, start=start,
            distributed=rt.communicates, kept=self.checkpointer.kept, grad_norms=grad_norms)
        self.checkpointer.restore_weights(job.model)
        self.sync = self._place()
        self.checkpointer.use(self.sync)
        self.checkpointer.restore_state(job.model, job.optimizer, start)
        update = self._update(start, grad_norms)
        self.checkpointer.restore_scheduler(job.scheduler)
        if rt.is_main:
            self.steps_log = StepLog(
                record=self.losses, steps=config.steps, rows_between=self._rows_between,
                log_every=config.log_every, metrics_path=config.metrics,
                progress=False if config.quiet else None, print_steps=not config.quiet,
                rate=update.rate_of if update.scheduled else None, grad_norms=grad_norms,
                sinks=[TensorBoardSink(config.tensorboard)] if config.tensorboard else [])
        self.validator = Validator(job, rt, autocast=self.precision.autocast,
                                   results=agreed.val,
                                   report=self.steps_log.event if self.steps_log else None)
        self.validator.lockstep = self.sync.sharded
        self.builder = StepBuilder(job, rt, precision=self.precision, update=update,
                                 watch=self.watch, weight_grad=self.settings.weight_grad,
                                 bf16_fusions=self.settings.bf16_fusions)
        return start

    def _place(self) -> GradSync:
        """The model on every rank with rank 0's values: replicated, with its gradients
        summed in a flat buffer, or (--shard gradients, parameters) sharded by FSDP2; the
        optimizer rebuilt for --shard (distnn.distributed.sharding)."""
        job, rt, config = self.job, self.rt, self.config
        before = [p for p in job.model.parameters() if p.requires_grad]
        check_shardable(job.optimizer, before, config.shard)  # refused alike on one rank
        names = [name.strip() for name in (config.shard_blocks or "").split(",")
                 if name.strip()]
        blocks = find_blocks(job.model, names)
        if config.activation_checkpointing:
            if not blocks:
                raise UsageError("--activation-checkpointing: the model has no nn.ModuleList "
                                 "of blocks to recompute; allowed: --shard-blocks naming its "
                                 "blocks' classes, or a model with an nn.ModuleList")
            recompute_in_backward(blocks)
        mode = config.shard if rt.communicates else "none"
        if config.shard != "none" and mode == "none":
            log.info(f"--shard {config.shard}: one process, so nothing to shard")
        elif mode == "optimizer" and job.optimizer is None:
            log.info("--shard optimizer: the reference update (--optimizer sgd) keeps no "
                     "state, so there is nothing to shard")
        if mode in ("gradients", "parameters"):
            if not blocks:
                log.info(f"--shard {mode}: the model has no nn.ModuleList, so FSDP2 shards it "
                         "as one unit (its parameters are gathered whole for the forward); "
                         "--shard-blocks names the modules to shard one at a time")
            # The optimizer is rebuilt on the shards from a recipe that holds no parameter:
            # as FSDP2 shards each unit, nothing else holds its whole parameters, so they go
            # (a start-up peak of the whole model and its shards otherwise)
            recipe = optimizer_recipe(job.optimizer, before)
            job.optimizer = before = None
            place_whole(job.model, rt)
            if config.compile:  # each unit's forward, compiled before FSDP2 wraps it
                for unit in blocks or [job.model]:
                    unit.compile()
            sync = ShardedSync(job.model, device=rt.device, mode=mode, blocks=blocks)
            job.optimizer = rebuild_optimizer(
                recipe, [p for p in job.model.parameters() if p.requires_grad], mode)
            return sync
        sync = replicate(job.model, rt, bucket_mb=config.bucket_mb)
        job.optimizer = sharded_optimizer(job.optimizer, mode)
        return sync

    def _update(self, start: int, grad_norms: LossRecord | None) -> Update:
        """The update's parts from the config: the mean's count, clipping (each norm into
        ``grad_norms``), the schedule (from the optimizer's own rate: a user's optimizer
        brings its own), or distnn.fit's scheduler."""
        job, config = self.job, self.config
        counts = TargetCounts(job, start=start) if config.loss_reduction == "mean" else None
        schedule = (Schedule(config.lr_schedule, lr=job.lr, total=config.steps,
                             warmup=config.warmup_steps, min_lr=config.min_lr)
                    if config.lr_schedule != "constant" or config.warmup_steps else None)
        clip = ([ClipGradNorm(config.clip_grad_norm, grad_norms.put, norm=self.sync.grad_norm)]
                if grad_norms else [])
        return Update(optimizer=job.optimizer, lr=config.lr, schedule=schedule, start=start,
                      transforms=clip, scheduler=job.scheduler, mean_count=counts,
                      says_rates=self.rt.is_main)  # rank 0's StepLog says them

    def _rows_between(self, start: int, stop: int) -> int:
        """The global batch rows that steps ``start`` to ``stop - 1`` train on."""
        plan = self.job.plan  # None: the reference program's one batch, every step
        return plan.rows_between(start, stop) if plan else self.config.batch_size * (stop - start)

    def _checkpoint(self, done: int) -> None:
        self.checkpointer.save(done, self.sync, val=self.validator.results,
                               before_write=self.steps_log.flush if self.steps_log else None)

    def _finish(self, start: int, done: int, wall_s: float) -> None:
        """Final check and checkpoint; then the summary and --save, or the preemption report."""
        config, rt = self.config, self.rt
        if config.checkpoint_dir and done > start:
            self._checkpoint(done)
        else:
            self.verifier.verify(done, self.sync)
        if done < config.steps:
            name = signal.Signals(self.stop.signum or signal.SIGTERM).name
            if config.checkpoint_dir and done > start:
                saved = (f"wrote {os.path.join(config.checkpoint_dir, f'step-{done}')}; run the "
                         "same command to continue")
            elif config.checkpoint_dir:
                saved = "no new step to checkpoint; run the same command to continue"
            else:
                saved = ("no --checkpoint-dir, so nothing was saved and a rerun starts from "
                         "the beginning (a run with --checkpoint-dir can be continued)")
            raise RunFailed(f"preempted ({name}) after step {done} of {config.steps}: {saved}",
                            self.stop.exit_code, label="stopped")
        if self.steps_log:
            ran = done - start
            rows = self._rows_between(start, done)
            self.steps_log.summary({
                "world_size": rt.world_size,
                "device": rt.placement.device,
                "backend": rt.placement.backend if rt.distributed else "none",
                "steps": config.steps,
                "start_step": start,
                "wall_s": round(wall_s, 6),
                "compile_s": round(self.builder.compile_s, 3),
                "samples_per_s": round(rows / wall_s, 1) if ran else 0.0,
                "final_loss": self.losses.last(),
            })
        if config.save:
            self.checkpointer.save_weights()

    def _close(self, *, failing: bool = False) -> None:
        """Releases what the run holds (the rows' reader, the checkpoint folder's lock),
        also after a failure; closes rank 0's metrics file. Every part is closed even if
        one fails to (a flush that reads a stalled device, say); the first such error is
        raised, unless the run is ``failing`` already: its own error is the one to say."""
        first = None
        for part in (self.builder, self.steps_log, self.checkpointer):
            if part is not None:
                try:
                    part.close()
                except Exception as error:  # noqa: BLE001 - raised below, or the run's is
                    first = first or error
                    log.debug(f"closing {type(part).__name__}: {error!r}")
        if first is not None and not failing:
            raise first
