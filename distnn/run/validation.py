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
from distnn.job.losses import LossFn, correct_predictions


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
