"""Which rows each step trains on, on every rank, in an order that does not depend on the
number of ranks; and this rank's share of them, read one step ahead.

The order (BatchPlan): at the start of epoch e (from 0), ``g = torch.Generator();
g.manual_seed(seed + e); perm = torch.randperm(N, generator=g)`` (the permutation
DistributedSampler draws; without shuffling ``torch.arange(N)``). Batch k of the epoch is
``perm[k*B:(k+1)*B]``; the last, smaller batch is kept unless ``drop_last``. Every rank
computes the same batch and takes ``shard_bounds(len(batch), world_size, rank)`` of it, so
with a sum loss the ranks' gradients add up to the batch's for any world size. Unlike
DistributedSampler nothing is repeated or dropped to even out the ranks: a shard may be
one row shorter than another, or empty.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from distnn.data.shards import shard_bounds
from distnn.errors import UsageError


class RowSource(Protocol):
    """Training or validation rows that can be read by index: a data file, tensors in
    memory, or a map-style dataset."""

    rows: int

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and targets of rows ``indices`` (CPU tensors, in that order)."""


@dataclass(frozen=True)
class BatchPlan:
    """The global batches of a run, a pure function of the step."""

    rows: int
    batch_size: int
    seed: int
    shuffle: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.drop_last and self.batch_size > self.rows:
            raise UsageError(f"--drop-last: --batch-size {self.batch_size} is more than the "
                             f"data's {self.rows} rows, so every batch would be dropped; "
                             f"allowed: --batch-size <= {self.rows}, or no --drop-last")

    @property
    def per_epoch(self) -> int:
        """Steps (batches) per epoch."""
        whole, rest = divmod(self.rows, self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    @property
    def uniform(self) -> bool:
        """True when every batch has ``batch_size`` rows (no smaller last batch)."""
        return self.rows % self.batch_size == 0 or self.drop_last

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a step, both from 0."""
        return divmod(step, self.per_epoch)

    def rows_between(self, start: int, stop: int) -> int:
        """The rows that steps ``start`` to ``stop - 1`` train on, a smaller last batch of
        an epoch counted as the rows it has."""
        epoch_rows = self.rows if not self.drop_last else self.per_epoch * self.batch_size

        def before(step: int) -> int:  # the rows of steps 0 to step - 1
            epochs, batch = self.position(step)
            return epochs * epoch_rows + batch * self.batch_size

        return before(stop) - before(start)

    def ends_epoch(self, done: int) -> bool:
        """Whether ``done`` steps end an epoch."""
        return done > 0 and done % self.per_epoch == 0

    def indices(self, step: int) -> torch.Tensor:
        """The global rows of ``step``'s batch, in batch order (int64, on the CPU)."""
        epoch, batch = self.position(step)
        first = batch * self.batch_size
        return self.epoch_order(epoch)[first:first + self.batch_size]

    @functools.lru_cache(maxsize=2)  # noqa: B019 (the plan is frozen and lives for a run)
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The order of the rows in ``epoch``."""
        if not self.shuffle:
            return torch.arange(self.rows)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.rows, generator=generator)

    def shard(self, step: int, world_size: int, rank: int) -> torch.Tensor:
        """The rows of ``step``'s batch that ``rank`` trains on."""
        batch = self.indices(step)
        start, stop = shard_bounds(len(batch), world_size, rank)
        return batch[start:stop]


class TensorRows:
    """Rows of tensors in memory (x [N, ...], y [N, ...])."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows and y has {len(y)}; they must match")
        self.x, self.y, self.rows = x, y, len(x)

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]


class DatasetRows:
    """Rows of a map-style dataset: ``len(dataset)`` and ``dataset[i] -> (x_i, y_i)``."""

    def __init__(self, dataset) -> None:
        self.dataset, self.rows = dataset, len(dataset)

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.dataset[i] for i in indices.tolist()]
        if not pairs:
            x, y = self.dataset[0]
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            return x.new_empty((0, *x.shape)), y.new_empty((0, *y.shape))
        return (torch.stack([torch.as_tensor(x) for x, _ in pairs]),
                torch.stack([torch.as_tensor(y) for _, y in pairs]))


class ShardStream:
    """This rank's rows for each step in turn, on its device, read one step ahead.

    While step s computes, a background thread reads step s+1's rows (file reads release
    the GIL), so reading does not stall the step.
    """

    def __init__(self, source: RowSource, plan: BatchPlan, *, world_size: int, rank: int,
                 device: torch.device, start_step: int) -> None:
        self.source, self.plan = source, plan
        self.world_size, self.rank, self.device = world_size, rank, device
        self.step = start_step
        self.pin = device.type == "cuda"
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distnn-rows")
        self._next: Future = self._reader.submit(self._read, self.step)

    def _read(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.source.read(self.plan.shard(step, self.world_size, self.rank))
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the next step on this rank's device; starts reading the one after."""
        x, y = self._next.result()
        self.step += 1
        self._next = self._reader.submit(self._read, self.step)
        return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    def close(self) -> None:
        self._next.cancel()
        self._reader.shutdown(wait=True)
