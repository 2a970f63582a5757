"""Validation: the model's sum loss (and accuracy, for classification) over a set of rows,
split across the ranks and summed, so every rank gets the one-process numbers."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from distnn.data.batches import RowSource
from distnn.data.shards import shard_bounds
from distnn.distributed.process_group import collective
from distnn.distributed.runtime import Runtime
from distnn.job.losses import LossFn, correct_predictions
from distnn.job.spec import Job

VAL_CHUNK_ROWS = 4096  # validation rows a rank evaluates at a time, at most


@torch.no_grad()
def evaluate(model: nn.Module, rows: RowSource, loss_fn: LossFn, *, chunk_rows: int,
             world_size: int, rank: int, device: torch.device, communicates: bool,
             classification: bool,
             autocast: Callable[[], AbstractContextManager] = nullcontext
             ) -> dict[str, float | int]:
    """The set's summed loss, its size and (classification) accuracy; the same on every rank.

    Each rank evaluates its contiguous share of the rows (``shard_bounds``), ``chunk_rows``
    at a time, in eval mode (the model is put back in training mode after), inside
    ``autocast()`` (the training step's precision: bf16 autocast under --precision bf16), and
    the ranks' sums are all-reduced in float64. Returns ``{"loss", "samples", "loss_per_sample"}``,
    plus ``"accuracy"`` for classification.
    """
    start, stop = shard_bounds(rows.rows, world_size, rank)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct predictions
    was_training = model.training
    model.eval()
    try:
        for first in range(start, stop, chunk_rows):
            x, y = rows.read(torch.arange(first, min(stop, first + chunk_rows)))
            x, y = x.to(device), y.to(device)
            with autocast():
                prediction = model(x)
                loss = loss_fn(prediction, y)
            totals[0] += loss.double()
            if classification:
                totals[1] += correct_predictions(prediction, y)
    finally:
        model.train(was_training)
    if communicates:
        with collective("the validation sum"):
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    loss, correct = totals.tolist()
    result: dict[str, float | int] = {"loss": loss, "samples": rows.rows,
                                      "loss_per_sample": loss / rows.rows}
    if classification:
        result["accuracy"] = correct / rows.rows
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
            job.model, job.val, job.loss_fn, chunk_rows=VAL_CHUNK_ROWS,
            world_size=rt.world_size, rank=rt.rank, device=rt.device,
            communicates=rt.communicates, classification=job.classification,
            autocast=self.autocast)}
        self.results.append(result)
        if self.report:
            self.report({"event": "val", **result})
