"""Entry point: ``python -m distnn.train``, ``distnn-train``, or under torchrun/accelerate.

One step, on every rank: forward and sum loss over the rank's shard, backward, one SUM
all-reduce of the gradients (with the loss in the same buffer), then ``p -= lr * grad``.
Every rank applies the same update to the same weights, so the replicas stay identical and
the result equals the single-process reference program.

A run: agree on the config and find the newest good checkpoint -> steps, with checks
(non-finite values, replica agreement) and checkpoints every few steps -> summary and save.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from distnn.checkpoint import Checkpoint, check_compatible, latest_checkpoint, save_checkpoint
from distnn.config import TrainConfig, UsageError, parse_config
from distnn.data import reference_setup, shard_bounds
from distnn.environment import LaunchEnv, Placement, detect_launch, resolve_placement
from distnn.faults import FaultPlan
from distnn.gradsync import FlatGradSync
from distnn.guards import RunFailed, check_replicas, disagreements, fingerprint
from distnn.metrics import StepLog
from distnn.preemption import StopRequests
from distnn.process_group import CollectiveFailed, gather_objects, process_group
from distnn.weights import check_writable, save_weights


@dataclass
class TrainResult:
    """What a rank holds at the end: its model (identical on every rank)."""

    model: nn.Module
    wall_s: float


def _say(line: str) -> None:
    """One line on stderr in one write, so lines from ranks sharing a terminal never mix."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _note(message: str) -> None:
    _say(f"distnn: note: {message}")


class Trainer:
    """One rank's part of a run. Rank 0 alone prints, writes metrics, checkpoints and saves."""

    def __init__(self, config: TrainConfig, launch: LaunchEnv, placement: Placement, *,
                 distributed: bool, environ: Mapping[str, str]) -> None:
        self.config = config
        self.launch = launch
        self.placement = placement
        self.distributed = distributed
        self.device = torch.device(placement.device)
        self.fault = FaultPlan.from_environ(environ, restart_count=launch.restart_count)
        self.losses = torch.zeros(config.steps, device=self.device)  # global loss per step
        self.finite = torch.ones(config.steps, dtype=torch.bool, device=self.device)
        self.verified = 0  # steps checked for non-finite values so far
        self.last_checkpoint: str | None = None  # the newest written or resumed from
        self.log: StepLog | None = None

    # -- start-up -------------------------------------------------------------------------

    def _prepare_rank0(self) -> Checkpoint | None:
        """Rank 0's checks before training: output paths, then the checkpoint to resume."""
        config = self.config
        if config.checkpoint_dir:
            try:
                os.makedirs(config.checkpoint_dir, exist_ok=True)
            except OSError as error:
                raise UsageError(f"--checkpoint-dir: cannot create {config.checkpoint_dir!r} "
                                 f"({error.strerror}); allowed: a writable directory") from None
            check_writable(os.path.join(config.checkpoint_dir, ".distnn-probe"),
                           "--checkpoint-dir")
        for flag, path in (("--metrics", config.metrics), ("--save", config.save)):
            if path:
                check_writable(path, flag)
        if not config.checkpoint_dir:
            return None
        checkpoint, notices = latest_checkpoint(config.checkpoint_dir)
        for notice in notices:
            _note(notice)
        if checkpoint:
            check_compatible(checkpoint, dataclasses.asdict(config))
            if checkpoint.step > config.steps:
                raise UsageError(f"--steps: got {config.steps} but {checkpoint.path} has already "
                                 f"done {checkpoint.step}; allowed: --steps >= {checkpoint.step}")
        return checkpoint

    def _agree(self) -> tuple[Checkpoint | None, int, list[float]]:
        """All ranks: share rank 0's verdict and compare configs (one gather of small objects).

        Returns rank 0's checkpoint (None elsewhere), the step to start at and the losses of
        the steps already done.
        """
        error, checkpoint = None, None
        if self.launch.is_main:
            try:
                checkpoint = self._prepare_rank0()
            except UsageError as usage_error:
                error = str(usage_error)
        views = gather_objects({
            "error": error,
            "fingerprint": fingerprint(self.config),
            "done_losses": checkpoint.losses.tolist() if checkpoint else [],
        }, distributed=self.distributed)
        errors = [view["error"] for view in views if view["error"]]
        if errors:
            raise UsageError(errors[0])
        differ = disagreements([view["fingerprint"] for view in views])
        if differ:
            raise UsageError("the ranks were started differently: " + "; ".join(differ)
                             + "; allowed: the same flags and library versions on every rank")
        done_losses = views[0]["done_losses"]
        return checkpoint, len(done_losses), done_losses

    # -- checks and checkpoints -----------------------------------------------------------

    def _verify(self, done: int, sync: FlatGradSync) -> None:
        """Stops the run (RunFailed, exit 3) on non-finite values or diverged replicas.

        Every rank reaches the same verdict on non-finite values without communicating (the
        losses and gradients are all-reduced, so equal everywhere); the replica check is one
        small all-gather.
        """
        if done <= self.verified:
            return
        bad = (~self.finite[self.verified:done]).nonzero()
        if not bad.numel() and not sync.flat_params.isfinite().all():
            bad = torch.tensor([[done - 1 - self.verified]])  # the last update overflowed
        if bad.numel():
            step = self.verified + bad[0].item()
            last = (f"{self.losses[step - 1].item()!r} at step {step - 1}" if step else "none")
            kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was written")
            raise RunFailed(f"non-finite loss or gradient at step {step} (loss "
                            f"{self.losses[step].item()!r}; last finite loss {last}); stopping: "
                            f"{kept}; try a smaller --lr", 3)
        self.verified = done
        check_replicas(sync.flat_params, step=done, distributed=self.distributed)

    def _checkpoint(self, done: int, model: nn.Module, sync: FlatGradSync) -> None:
        """Verifies, then rank 0 writes ``step-{done}``: a checkpoint never holds bad weights."""
        self._verify(done, sync)
        if self.launch.is_main:
            save_checkpoint(self.config.checkpoint_dir, step=done, weights=model.state_dict(),
                            losses=self.losses[:done], keep=self.config.keep_checkpoints,
                            state={"config": dataclasses.asdict(self.config),
                                   "world_size": self.launch.world_size})
        self.last_checkpoint = os.path.join(self.config.checkpoint_dir, f"step-{done}")

    # -- the run --------------------------------------------------------------------------

    def train(self) -> TrainResult:
        config, launch = self.config, self.launch
        checkpoint, start, done_losses = self._agree()
        x, y, model = reference_setup(config)
        if checkpoint:
            model.load_state_dict(checkpoint.weights)
            saved_world = checkpoint.state.get("world_size")
            _note(f"resuming from {checkpoint.path}: {start} of {config.steps} steps done")
            if saved_world != launch.world_size:
                _note(f"the checkpoint was written by {saved_world} ranks and this run has "
                      f"{launch.world_size}: the result differs from an uninterrupted run "
                      "only by rounding")
        row_start, row_stop = shard_bounds(config.batch_size, launch.world_size, launch.rank)
        x_shard, y_shard = x[row_start:row_stop].to(self.device), y[row_start:row_stop].to(
            self.device)
        model.to(self.device)
        # Slots after the gradients: the rank's loss and its stop vote.
        sync = FlatGradSync(model, distributed=self.distributed, extra_slots=2)
        sync.broadcast_parameters(src=0)  # rank 0's weights (fresh or resumed) everywhere
        self.losses[:start] = torch.tensor(done_losses, dtype=torch.float32)
        self.verified = start
        if start:
            self.last_checkpoint = os.path.join(config.checkpoint_dir, f"step-{start}")
        loss_fn = nn.MSELoss(reduction="sum")

        if launch.is_main:
            self.log = StepLog(losses=self.losses, log_every=config.log_every,
                               metrics_path=config.metrics)
            self.log.restore(start)
        stop = StopRequests(self.device)
        done = start
        try:
            with stop.installed():
                started = time.perf_counter()
                for step in range(start, config.steps):
                    if self.fault:
                        self.fault.maybe_fire(step=step, rank=launch.rank,
                                              flat_params=sync.flat_params)
                    sync.zero_grad()
                    local_loss = loss_fn(model(x_shard), y_shard)
                    local_loss.backward()
                    summed = sync.all_reduce(local_loss, stop.vote())
                    self.finite[step] = sync.all_finite()
                    sync.sgd_step(config.lr)
                    self.losses[step] = summed[0]
                    done = step + 1
                    if self.log:
                        self.log.record(step)
                    if stop.agreed(summed[1]):
                        break
                    if config.verify_every and done % config.verify_every == 0:
                        self._verify(done, sync)
                    if (config.checkpoint_dir and config.checkpoint_every
                            and done % config.checkpoint_every == 0 and done < config.steps):
                        self._checkpoint(done, model, sync)
                if self.log:
                    self.log.flush()  # waits for the device, so the wall time below is honest
                wall_s = time.perf_counter() - started

            if config.checkpoint_dir and done > start:
                self._checkpoint(done, model, sync)
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
                raise RunFailed(f"preempted ({name}) after step {done} of {config.steps}: "
                                f"{saved}; run the same command to continue", stop.exit_code,
                                label="stopped")
            if self.log:
                ran = done - start
                self.log.summary({
                    "world_size": launch.world_size,
                    "device": self.placement.device,
                    "backend": self.placement.backend if self.distributed else "none",
                    "steps": config.steps,
                    "start_step": start,
                    "wall_s": round(wall_s, 6),
                    "samples_per_s": round(config.batch_size * ran / wall_s, 1) if ran else 0.0,
                    "final_loss": self.log.final_loss(),
                })
                if config.save:
                    save_weights(model, config.save)
        finally:
            if self.log:
                self.log.close()
        return TrainResult(model=model, wall_s=wall_s)


def train(config: TrainConfig, launch: LaunchEnv, placement: Placement, *,
          distributed: bool) -> TrainResult:
    """Runs the whole training on this rank; see :class:`Trainer`."""
    return Trainer(config, launch, placement, distributed=distributed,
                   environ=os.environ).train()


_REPORTED = (UsageError, RunFailed, CollectiveFailed)


def _report(launch: LaunchEnv | None, error: Exception, config: TrainConfig | None) -> int:
    """Prints ``error`` as one line on stderr, naming the rank in a multi-rank job.

    Returns the exit code: 2 for usage and communication errors, RunFailed's own otherwise.
    """
    message = str(error).strip()
    if isinstance(error, CollectiveFailed):
        timeout = f" (--timeout-s {config.timeout_s:g})" if config else ""
        message = (f"{message} (a peer died, is unreachable, or did not answer within the "
                   f"timeout{timeout})")
    where = f"rank {launch.rank}: " if launch and launch.world_size > 1 else ""
    label = error.label if isinstance(error, RunFailed) else "error"
    _say(f"distnn: {where}{label}: {message}")
    return error.exit_code if isinstance(error, RunFailed) else 2


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code.

    0: done. 2: bad input, bad launch environment, or a peer lost. 3: non-finite values or
    diverged replicas. 128+N: stopped by signal N (preempted), after a checkpoint.
    """
    launch, config = None, None
    try:
        launch = detect_launch(os.environ)
        config = parse_config(argv)
        placement = resolve_placement(device=config.device, backend=config.backend,
                                      launch=launch, cuda_devices=torch.cuda.device_count())
        if placement.notice and launch.is_main:
            _note(placement.notice)
        with process_group(launch, placement, timeout_s=config.timeout_s) as distributed:
            try:
                train(config, launch, placement, distributed=distributed)
            except _REPORTED as error:
                # Said before the group is torn down: once a peer exits, the launcher may
                # stop this rank at any moment.
                return _report(launch, error, config)
    except _REPORTED as error:
        return _report(launch, error, config)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one
        _say("distnn: interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
