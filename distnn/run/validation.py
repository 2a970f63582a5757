"""Validation: the model's sum loss over a set of rows, the targets it counts and (for
class labels) its accuracy, split across the ranks and summed, so every rank gets the
one-process numbers."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from distnn.data.batches import RowSource
from distnn.data.shards import shard_bounds
from distnn.distributed.process_group import collective
from distnn.distributed.runtime import Runtime
from distnn.job.losses import correct_predictions, scores_of
from distnn.job.spec import Job

# validation rows a rank evaluates at a time, at most: also at most a training shard (a
# language model's scores for 4096 rows of 64 positions and 256 classes are 268 MB)
VAL_CHUNK_ROWS = 4096


@torch.no_grad()
def evaluate(model: nn.Module, rows: RowSource, job: Job, *, chunk_rows: int,
             world_size: int, rank: int, device: torch.device, communicates: bool,
             lockstep: bool = False,
             autocast: Callable[[], AbstractContextManager] = nullcontext
             ) -> dict[str, float | int | None]:
    """The set's summed loss, its rows and counted targets, and (labels the output scores)
    the accuracy over those targets; the same on every rank.

    Each rank evaluates its contiguous share of the rows (``shard_bounds``), ``chunk_rows``
    at a time, in eval mode (the model is put back in training mode after), inside
    ``autocast()`` (the training step's precision: bf16 autocast under --precision bf16), and
    the ranks' sums are all-reduced in float64. ``lockstep`` (a sharded model, whose every
    forward is collective): every rank runs as many forwards, a rank past its share on a row
    whose result it does not count. Returns ``{"loss", "samples", "targets",
    "loss_per_sample", "loss_per_target"}`` (``job.loss`` and ``job.count``), plus
    ``"accuracy"`` where ``job.scored``, and ``"perplexity"`` (``exp(loss_per_target)``) under
    cross-entropy.
    """
    start, stop = shard_bounds(rows.rows, world_size, rank)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss, targets, correct
    ignored = job.config.ignore_index
    chunks = range(start, stop, chunk_rows)
    if lockstep:  # every rank as many forwards as the largest share needs
        largest = shard_bounds(rows.rows, world_size, 0)
        chunks = range(start, start + (largest[1] - largest[0]), chunk_rows)
    was_training = model.training
    model.eval()
    try:
        for first in chunks:
            counted = first < stop
            x, y = rows.read(torch.arange(first, min(stop, first + chunk_rows)) if counted
                             else torch.arange(1))  # a row whose result is not counted
            x, y = x.to(device), y.to(device)
            with autocast():
                output = model(x)
                loss = job.loss(output, y)
            if not counted:
                continue
            totals[0] += loss.double().reshape(())  # a loss of shape [1] too, as in training
            totals[1] += job.count(y).to(device)
            if job.scored:
                totals[2] += correct_predictions(scores_of(output), y, ignored)
    finally:
        model.train(was_training)
    if communicates:
        with collective("the validation sum"):
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    loss, targets, correct = totals.tolist()
    per_target = loss / targets if targets else None  # a set of ignored labels only
    result: dict[str, float | int | None] = {"loss": loss, "samples": rows.rows,
                                      "targets": int(targets),
                                      "loss_per_sample": loss / rows.rows,
                                      "loss_per_target": per_target}
    if job.scored:
        result["accuracy"] = correct / targets if targets else None
    if job.builtin_loss and job.config.loss == "cross-entropy":
        # beyond exp(709), a float's largest, there is no perplexity to write in JSON
        result["perplexity"] = (math.exp(per_target) if per_target is not None
                                and per_target < 709 else None)
    return result


class Validator:
    """Validates a job that has validation rows: every --val-every steps, else at the end of
    each epoch (--data) or of the run. Keeps every result (``results``, one dict a
    validation, in order; a resumed run's start with the checkpoint's) and hands each to
    ``report`` (rank 0's metrics log)."""

    def __init__(self, job: Job, runtime: Runtime, *, autocast: Callable[[],
                 AbstractContextManager], results: list[dict],
                 report: Callable[[dict], None] | None = None) -> None:
        self.job, self.config, self.rt = job, job.config, runtime
        self.autocast = autocast
        self.results = results
        self.report = report
        self.enabled = job.val is not None  # asked once: the loop is the step's host time
        self.lockstep = False  # a sharded model: every rank's forwards collective (Trainer)
        # at most a training shard's rows at a time: the memory of the training's forward
        shard = -(-(self.config.batch_size or VAL_CHUNK_ROWS) // runtime.world_size)
        self.chunk_rows = max(1, min(VAL_CHUNK_ROWS, shard))

    def due(self, done: int) -> bool:
        if not self.enabled:
            return False
        config, plan = self.config, self.job.plan
        if config.val_every:
            return done % config.val_every == 0 or done == config.steps
        return done == config.steps or (plan is not None and plan.ends_epoch(done))

    def run(self, done: int) -> None:
        """Evaluates on the validation rows (every rank its share; the sums all-reduced)."""
        job, rt = self.job, self.rt
        result = {"step": done, **evaluate(
            job.model, job.val, job, chunk_rows=self.chunk_rows,
            world_size=rt.world_size, rank=rt.rank, device=rt.device,
            communicates=rt.communicates, lockstep=self.lockstep, autocast=self.autocast)}
        self.results.append(result)
        if self.report:
            self.report({"event": "val", **result})
