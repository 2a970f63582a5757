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
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.data import DataLoader, default_collate

from distnn.data.shards import shard_bounds
from distnn.errors import UsageError


class RowSource(Protocol):
    """Training or validation rows that can be read by index: a data file, tensors in
    memory, or a map-style dataset."""

    rows: int

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and targets of rows ``indices`` (CPU tensors, in that order)."""

    def read_targets(self, indices: torch.Tensor) -> torch.Tensor:
        """The targets of rows ``indices`` alone, as :meth:`read` gives them."""


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
        return self.epoch_order(epoch)[first:first + self.batch_size].long()

    @functools.lru_cache(maxsize=2)  # noqa: B019 (the plan is frozen and lives for a run)
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The order of the rows in ``epoch``: int32 below 2**31 rows, else int64 (the same
        values either way)."""
        # int32: half the memory of a cached order (67 MB, not 134, for 2**24 rows), and
        # drawn so, with no int64 copy on the way: randperm's shuffle is the same for every
        # dtype (tests/test_token_memory.py checks it against the int64 draw).
        dtype = torch.int32 if self.rows < 2**31 else torch.int64
        if not self.shuffle:
            return torch.arange(self.rows, dtype=dtype)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.rows, generator=generator, dtype=dtype)

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

    def read_targets(self, indices: torch.Tensor) -> torch.Tensor:
        return self.y[indices]


class DatasetRows:
    """Rows of a map-style dataset (``len(dataset)``, ``dataset[i]``), batched as a torch
    DataLoader batches them: the items of a batch go through ``collate_fn`` (torch's
    ``default_collate`` by default). An item, and so a batch, is an ``(x, y)`` pair, or a
    dict from which ``keys`` (input, target) name the two. With ``num_workers`` a
    DataLoader's worker processes read a step's rows ahead (:meth:`loader`)."""

    def __init__(self, dataset, *, collate_fn: Callable | None = None,
                 keys: tuple[str, str] | None = None, num_workers: int = 0) -> None:
        self.dataset, self.rows = dataset, len(dataset)
        self.collate_fn = collate_fn or default_collate
        self.keys, self.num_workers = keys, num_workers
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(indices):
            return self.empty()
        rows = indices.tolist()
        return _collated(self.collate_fn, self.pair, [self.dataset[i] for i in rows], rows)

    def read_targets(self, indices: torch.Tensor) -> torch.Tensor:
        return self.read(indices)[1]

    def pair(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of a collated batch: a pair, or a dict's ``keys``."""
        if isinstance(batch, Mapping):
            x, y = (batch[key] for key in self.keys)
        else:
            x, y = batch
        return torch.as_tensor(x), torch.as_tensor(y)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """No rows, shaped as a row of the first item (an empty shard: more ranks than
        rows)."""
        if self._empty is None:
            x, y = self.read(torch.arange(1))
            self._empty = (x[:0], y[:0])
        return self._empty

    def loader(self, shards: Iterable[list[int]], *, pin_memory: bool) -> Iterator:
        """The (x, y) of each shard in ``shards`` (lists of indices, an empty one allowed),
        read ahead by a DataLoader's ``num_workers`` processes."""
        loader = DataLoader(self.dataset, batch_sampler=shards, num_workers=self.num_workers,
                            collate_fn=_Collate(self.collate_fn, self.pair, self.empty()),
                            pin_memory=pin_memory)
        return _said_in_one_line(iter(loader))


class _Collate:
    """A DataLoader's collate_fn (picklable, for worker processes): the user's collate, then
    the (x, y) pair; an empty shard as ``empty``."""

    def __init__(self, collate_fn: Callable, pair: Callable,
                 empty: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.collate_fn, self.pair, self.empty = collate_fn, pair, empty

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor] | _Refused:
        try:
            return _collated(self.collate_fn, self.pair, items) if items else self.empty
        except UsageError as error:  # a worker's exception reaches the loop as a traceback
            return _Refused(str(error))


@dataclass(frozen=True)
class _Refused:
    """A batch a DataLoader worker refused (the one line why), raised in the main process."""

    message: str


def _said_in_one_line(batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in batches:
        if isinstance(batch, _Refused):
            raise UsageError(batch.message)
        yield batch


def _collated(collate_fn: Callable, pair: Callable, items: list,
              rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y) of ``items`` (the dataset's ``rows``, where known) batched; UsageError,
    in one line, for items the collate_fn cannot batch, and for a batch that does not hold
    one input and one target for each item (a collate_fn that drops or adds rows would train
    on other rows than the plan's, and the global batch would not be one process's)."""
    try:
        x, y = pair(collate_fn(items))
    except Exception as error:  # noqa: BLE001 - the user's items or collate_fn: one line
        said = (str(error).strip().splitlines() or [""])[0]
        raise UsageError(f"distnn.fit: the dataset's {_first_bad(collate_fn, pair, items, rows)} "
                         f"cannot be batched ({type(error).__name__}: {said}); allowed: items "
                         "that the collate_fn turns into an (x, y) pair or a dict of "
                         "tensors") from None
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(items) or len(y) != len(items):
        raise UsageError(f"distnn.fit: the collate_fn made {list(x.shape)} inputs and "
                         f"{list(y.shape)} targets of {len(items)} "
                         f"item{'s' if len(items) != 1 else ''}; allowed: a batch with a row "
                         "of each for every item")
    return x, y


def _first_bad(collate_fn: Callable, pair: Callable, items: list,
               rows: list[int] | None) -> str:
    """Which of ``items`` (the dataset's ``rows``, where known) the collate_fn cannot batch
    alone, as words; the whole batch's when each can (two items of other shapes, say)."""
    for index, item in enumerate(items):
        try:
            pair(collate_fn([item]))
        except Exception:  # noqa: BLE001 - this one is the culprit
            return f"row {rows[index]}" if rows else f"item {index} of a batch"
    if rows:
        return f"rows {', '.join(map(str, rows[:4]))}{', ...' if len(rows) > 4 else ''}"
    return f"batch of {len(items)} items"


class _Shards:
    """This rank's indices of each step from ``start`` to ``steps``, a DataLoader's batch
    sampler."""

    def __init__(self, plan: BatchPlan, *, world_size: int, rank: int, start: int,
                 steps: int) -> None:
        self.plan, self.world_size, self.rank = plan, world_size, rank
        self.start, self.steps = start, steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.plan.shard(step, self.world_size, self.rank).tolist()

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


class ShardStream:
    """This rank's rows for each step in turn, on its device, read one step ahead.

    While step s computes, a background thread reads step s+1's rows (file reads release
    the GIL), so reading does not stall the step. Tensors in memory are indexed when their
    step comes instead: that takes microseconds, where a handover to a thread waits for
    the thread to get a core (0.3-3.5 ms a step on a loaded 2-core machine,
    docs/benchmarks.md). A dataset with ``num_workers`` is read ahead by a DataLoader's
    worker processes, over the same shards (``steps``: the run's last step, where they
    end).
    """

    def __init__(self, source: RowSource, plan: BatchPlan, *, world_size: int, rank: int,
                 device: torch.device, start_step: int, steps: int) -> None:
        self.source, self.plan = source, plan
        self.world_size, self.rank, self.device = world_size, rank, device
        self.step = start_step
        self.pin = device.type == "cuda"
        self._loaded: Iterator | None = None
        self._reader: ThreadPoolExecutor | None = None
        if getattr(source, "num_workers", 0):
            self._loaded = source.loader(_Shards(plan, world_size=world_size, rank=rank,
                                                 start=start_step, steps=steps),
                                         pin_memory=self.pin)
            return
        if isinstance(source, TensorRows):
            return  # read inline (next)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distnn-rows")
        self._next: Future = self._reader.submit(self._read, self.step)

    def _read(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.source.read(self.plan.shard(step, self.world_size, self.rank))
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the next step on this rank's device; starts reading the one after."""
        if self._loaded is not None:
            x, y = next(self._loaded)
        elif self._reader is None:
            x, y = self._read(self.step)
        else:
            x, y = self._next.result()
            self._next = self._reader.submit(self._read, self.step + 1)
        self.step += 1
        return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    def close(self) -> None:
        if self._reader is not None:
            self._next.cancel()
            self._reader.shutdown(wait=True)
        self._loaded = None  # the DataLoader's workers stop with its iterator
