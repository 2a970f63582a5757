"""--loss-reduction mean: the targets each step's global batch counts, the mean's divisor.

A row counts the same number of targets as every other (the elements of its y under mse,
its positions under class probabilities, its labels) unless some of its class labels equal
--ignore-index. Then each row's count is read once, at start-up, from the targets alone
(every rank reads all of them, in bounded memory, as the label check does), and each step's
count is the sum over its batch's rows (distnn.data.batches.BatchPlan): the same number on
every rank and for any number of ranks, known before the step, with no collective. A step
whose global batch counts no target is refused before the first step: its mean is 0 / 0.
"""

from __future__ import annotations

import torch

from distnn.data.batches import BatchPlan
from distnn.errors import UsageError
from distnn.job.spec import Job

SCAN_BYTES = 4 * 2**20  # of targets read at a time when each row's count is read


class TargetCounts:
    """``counts(step)``: the targets ``step``'s global batch counts (an int)."""

    def __init__(self, job: Job, *, start: int) -> None:
        self.plan: BatchPlan | None = job.plan
        self.batch_size = job.config.batch_size
        self.per_row, self.by_step = _same_for_every_row(job), None
        if self.per_row is not None:
            return
        rows = _row_counts(job)
        width = job.source.read_targets(torch.arange(1))[0].numel()
        if bool((rows == width).all()):  # labels, none of them ignored
            self.per_row = width
            return
        self.by_step = _step_sums(self.plan, rows, job.config.steps)
        empty = torch.nonzero(self.by_step[start:] == 0)
        if len(empty):
            step = start + int(empty[0])
            raise UsageError(f"--loss-reduction mean: the global batch of step {step + 1} "
                             "holds no target (every label in it is --ignore-index "
                             f"{job.config.ignore_index}), so its mean would be 0 / 0; "
                             "allowed: data whose every batch has a label not ignored, or "
                             "--loss-reduction sum")

    def __call__(self, step: int) -> int:
        if self.by_step is not None:
            return int(self.by_step[step])
        rows = self.plan.rows_between(step, step + 1) if self.plan else self.batch_size
        return rows * self.per_row


def _same_for_every_row(job: Job) -> int | None:
    """The targets each row counts where that is known without reading every row: the
    reference batch's and regression targets' elements, class probabilities' positions, a
    data file's labels when its label check found none ignored; else None."""
    if job.source is None:  # the reference batch: y [B, d_out] of regression targets
        return job.config.d_out
    y = job.source.read_targets(torch.arange(1))
    if y.is_floating_point():
        return int(job.count(y))
    if getattr(job.source, "ignored_labels", None) == 0:
        return y[0].numel()
    return None


def _row_counts(job: Job) -> torch.Tensor:
    """Each training row's counted labels, int32 [N], read in bounded memory."""
    source = job.source
    width = source.read_targets(torch.arange(1))[0].numel()
    counts = torch.empty(source.rows, dtype=torch.int32)
    chunk = max(1, SCAN_BYTES // (8 * width))
    for first in range(0, source.rows, chunk):
        stop = min(source.rows, first + chunk)
        labels = source.read_targets(torch.arange(first, stop)).reshape(stop - first, -1)
        counts[first:stop] = (labels != job.config.ignore_index).sum(dim=1)
    return counts


def _step_sums(plan: BatchPlan, rows: torch.Tensor, steps: int) -> torch.Tensor:
    """Each step's sum of ``rows`` over its global batch, int64 [steps], an epoch at a time."""
    sums = torch.empty(steps, dtype=torch.int64)
    starts = torch.arange(plan.per_epoch) * plan.batch_size
    stops = (starts + plan.batch_size).clamp(max=plan.rows)
    for first in range(0, steps, plan.per_epoch):
        ordered = rows[plan.epoch_order(first // plan.per_epoch)].long()
        running = torch.cat([torch.zeros(1, dtype=torch.int64), ordered.cumsum(0)])
        take = min(plan.per_epoch, steps - first)
        sums[first:first + take] = (running[stops] - running[starts])[:take]
    return sums
