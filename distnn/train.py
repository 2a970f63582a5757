"""Entry point: ``python -m distnn.train``, ``distnn-train``, or under torchrun/accelerate.

One step, on every rank: forward and sum loss over the rank's shard, backward, one SUM
all-reduce of the gradients (with the loss in the same buffer), then ``p -= lr * grad``.
Every rank applies the same update to the same weights, so the replicas stay identical and
the result equals the single-process reference program.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from distnn.config import TrainConfig, UsageError, parse_config
from distnn.data import reference_setup, shard_bounds
from distnn.environment import LaunchEnv, Placement, detect_launch, resolve_placement
from distnn.gradsync import FlatGradSync
from distnn.metrics import StepLog
from distnn.process_group import first_error, process_group
from distnn.weights import check_writable, save_weights


@dataclass
class TrainResult:
    """What a rank holds at the end: its model (identical on every rank) and rank 0's log."""

    model: nn.Module
    wall_s: float


def _check_outputs(config: TrainConfig, launch: LaunchEnv, *, distributed: bool) -> None:
    """Rank 0 checks its output paths before any training; every rank learns the verdict."""
    error = None
    if launch.is_main:
        try:
            for flag, path in (("--metrics", config.metrics), ("--save", config.save)):
                if path:
                    check_writable(path, flag)
        except UsageError as usage_error:
            error = str(usage_error)
    error = first_error(error, distributed=distributed)
    if error:
        raise UsageError(error)


def train(config: TrainConfig, launch: LaunchEnv, placement: Placement, *,
          distributed: bool) -> TrainResult:
    """Runs the whole training on this rank; rank 0 prints, records metrics and saves.

    Call inside :func:`distnn.process_group.process_group` when ``distributed``.
    """
    _check_outputs(config, launch, distributed=distributed)
    device = torch.device(placement.device)
    x, y, model = reference_setup(config)
    start, stop = shard_bounds(config.batch_size, launch.world_size, launch.rank)
    x_shard, y_shard = x[start:stop].to(device), y[start:stop].to(device)
    model.to(device)
    sync = FlatGradSync(model, distributed=distributed)
    sync.broadcast_parameters(src=0)  # identical replicas, whatever each rank's RNG did
    loss_fn = nn.MSELoss(reduction="sum")

    log = None
    if launch.is_main:
        log = StepLog(steps=config.steps, log_every=config.log_every, device=device,
                      metrics_path=config.metrics)
    try:
        started = time.perf_counter()
        for step in range(config.steps):
            sync.zero_grad()
            local_loss = loss_fn(model(x_shard), y_shard)
            local_loss.backward()
            global_loss = sync.all_reduce(local_loss)
            sync.sgd_step(config.lr)
            if log:
                log.record(step, global_loss)
        if log:
            log.flush()  # waits for the device, so the wall time below is honest
        wall_s = time.perf_counter() - started
        if log:
            log.summary({
                "world_size": launch.world_size,
                "device": placement.device,
                "backend": placement.backend if distributed else "none",
                "steps": config.steps,
                "wall_s": round(wall_s, 6),
                "samples_per_s": round(config.batch_size * config.steps / wall_s, 1),
                "final_loss": log.final_loss(),
            })
            if config.save:
                save_weights(model, config.save)
    finally:
        if log:
            log.close()
    return TrainResult(model=model, wall_s=wall_s)


_REPORTED = (UsageError, dist.DistError)


def _report(launch: LaunchEnv | None, error: Exception) -> int:
    """Prints ``error`` as one line on stderr, naming the rank in a multi-rank job; returns 2."""
    message = str(error).strip()
    if isinstance(error, dist.DistError):
        first_line = message.splitlines()[0] if message else type(error).__name__
        message = ("a collective failed: a peer died, is unreachable, or exceeded --timeout-s "
                   f"({first_line})")
    where = f"rank {launch.rank}: " if launch and launch.world_size > 1 else ""
    print(f"distnn: {where}error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (0 ok, 2 for any error reported in one line)."""
    launch = None
    try:
        launch = detect_launch(os.environ)
        config = parse_config(argv)
        placement = resolve_placement(device=config.device, backend=config.backend,
                                      launch=launch, cuda_devices=torch.cuda.device_count())
        if placement.notice and launch.is_main:
            print(f"distnn: note: {placement.notice}", file=sys.stderr, flush=True)
        with process_group(launch, placement, timeout_s=config.timeout_s) as distributed:
            try:
                train(config, launch, placement, distributed=distributed)
            except _REPORTED as error:
                # Said before the group is torn down: once a peer exits, the launcher may
                # stop this rank at any moment.
                return _report(launch, error)
    except _REPORTED as error:
        return _report(launch, error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
