"""What a run trains: a model, a sum loss, the training rows and their order, validation
rows, an optimizer. The CLI builds a Job from flags (:func:`job_from_flags`); ``distnn.fit``
from the user's own objects. The Trainer runs either the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distnn.config import TrainConfig
from distnn.data.batches import BatchPlan, RowSource
from distnn.data.datafile import DataFile
from distnn.data.shards import reference_setup, shard_bounds
from distnn.errors import UsageError
from distnn.job.losses import LossFn, apply_loss, counted_targets, sum_loss
from distnn.job.model import model_recipe, seeded_model
from distnn.job.optimizers import build_optimizer
from distnn.job.targets import loss_mismatch, val_mismatch


@dataclass
class Job:
    """One rank's view of what to train. ``config`` is resolved (every size filled in).

    The training rows are either ``fixed`` (this rank's shard of the one batch every step
    trains on: the reference program's) or read per step from ``source`` in ``plan``'s order.
    """

    config: TrainConfig
    model: nn.Module  # the initial weights, identical on every rank
    loss_fn: LossFn  # a sum over the rows it is given
    optimizer: torch.optim.Optimizer | None  # None: the reference program's p -= lr * grad
    # distnn's own loss (--loss), given the scores in any output (distnn.job.losses); False:
    # the user's, given the output as the model returns it
    builtin_loss: bool = True
    plan: BatchPlan | None = None
    source: RowSource | None = None
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None
    val: RowSource | None = None
    classification: bool = False  # integer class labels
    # whether each label has the scores of its classes on the output's last dimension, so an
    # accuracy can be reported (set by distnn.job.checks.check_model_output)
    scored: bool = False
    # the output's last dimension where the model's construction fixes it (distnn's MLP:
    # [rows, d_out]), so that the output check need not run the model; None: it looks
    output_width: int | None = None
    data_digest: str | None = None  # startup.data_digest's, once computed ("" for none)
    # distnn.fit's scheduler=: the user's, stepped after each update
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    # how to build the model again, for --save's metadata (model.model_recipe); None: a
    # model given from Python (distnn.fit), which no flags describe
    recipe: dict[str, str] | None = None

    def loss(self, output: object, targets: torch.Tensor) -> torch.Tensor:
        """The summed loss of a model's ``output`` against ``targets``."""
        return apply_loss(self.loss_fn, self.builtin_loss, output, targets)

    def count(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets among ``targets`` that a mean divides by (distnn.job.losses)."""
        return counted_targets(targets, ignore_index=self.config.ignore_index,
                               probabilities=self.builtin_loss
                               and self.config.loss == "cross-entropy")

    @property
    def lr(self) -> float:
        """The rate the first update starts from: the optimizer's own (distnn.fit may bring
        one), else --lr."""
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else (
            self.config.lr)


def job_from_flags(config: TrainConfig, *, world_size: int, rank: int,
                   check_sizes: Callable[[TrainConfig], None] | None = None) -> Job:
    """The Job of the command line: the reference batch, or --data (and --val-data), with the
    MLP or --model, --loss and --optimizer. Every check a rank can make alone happens here
    (UsageError); this rank checks its own share of the training rows. ``check_sizes``,
    when given, is called with the config resolved to the run's sizes (the data's widths,
    its classes, the batch) before the batch or the model is allocated."""
    if config.loss == "cross-entropy" and not config.data:
        raise UsageError("--loss: got 'cross-entropy' without --data, and the random batch "
                         "has no class labels; allowed: --loss cross-entropy with --data "
                         "holding integer labels y [N]")
    if not config.data:
        config = config.resolved(steps=config.epochs)  # the batch is the whole data: 1 step
        if check_sizes:
            check_sizes(config)
        x, y, model = reference_setup(config)
        start, stop = shard_bounds(config.batch_size, world_size, rank)
        job = Job(config=config, model=model, loss_fn=sum_loss(config.loss),
                  optimizer=None, fixed=(x[start:stop], y[start:stop]))
    else:
        train = DataFile(config.data, flag="--data")
        if not config.model and not train.features:
            raise train.fail(f"holds x of shape {list(train.x.shape)} and dtype "
                             f"{str(train.x.dtype).removeprefix('torch.')}, which the MLP "
                             "cannot take", "floating-point features x [N, D_in] for the "
                             "MLP, or rows of any shape with --model (token ids [N, T] with "
                             "--model distnn.models.gpt:build, say)")
        classes = _check_targets(train, config)
        d_out = classes if train.labels else train.d_out
        for name, value in (("d_in", train.d_in), ("d_out", d_out)):
            given = getattr(config, name)
            if given is not None and given != value and not (name == "d_out" and train.labels):
                raise UsageError(f"--{name.replace('_', '-')}: got {given} but --data "
                                 f"{config.data!r} gives {value}; allowed: leave it out with "
                                 "--data")
        train.check_share(world_size, rank)

        def sized_model(sizes: TrainConfig) -> nn.Module:
            if check_sizes:
                check_sizes(sizes)
            return seeded_model(sizes)

        job = rows_job(config, source=train, d_in=train.d_in, d_out=d_out,
                       model=sized_model,
                       loss_fn=sum_loss(config.loss, ignore_index=config.ignore_index),
                       classification=train.labels, world_size=world_size, rank=rank)
        config = job.config
    if not config.model:
        job.output_width = config.d_out
    if config.val_data:
        train_rows = job.source.read(torch.arange(1)) if job.source else job.fixed
        job.val = _val_file(config, train_rows=train_rows, world_size=world_size, rank=rank)
    job.optimizer = build_optimizer(config.optimizer, job.model.parameters(), lr=config.lr,
                                    momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    job.recipe = model_recipe(config)
    return job


def rows_job(config: TrainConfig, *, source: RowSource, d_in: int, d_out: int,
             model: nn.Module | Callable[[TrainConfig], nn.Module], loss_fn: LossFn,
             classification: bool, world_size: int, rank: int,
             builtin_loss: bool = True) -> Job:
    """A Job training on ``source`` in mini-batches (BatchPlan from the config's batch
    size, by default all of the source's rows, and its seed, shuffle and drop_last); the
    config resolved with the rows' widths ``d_in`` and ``d_out``, the batch and the steps of
    --epochs. ``model`` is the model, or a function of the resolved config that builds it.
    When every step trains on the same rows (one batch per epoch, unshuffled), this rank's
    rows are read once."""
    plan = BatchPlan(rows=source.rows, batch_size=config.batch_size or source.rows,
                     seed=config.seed, shuffle=not config.no_shuffle, drop_last=config.drop_last)
    config = config.resolved(d_in=d_in, d_out=d_out, batch_size=plan.batch_size,
                             steps=config.epochs and config.epochs * plan.per_epoch)
    job = Job(config=config, model=model if isinstance(model, nn.Module) else model(config),
              loss_fn=loss_fn, builtin_loss=builtin_loss, plan=plan,
              optimizer=None,  # the caller builds it, or fit brings it, for this model
              source=source, classification=classification)
    if plan.per_epoch == 1 and not plan.shuffle:
        job.fixed = source.read(plan.shard(0, world_size, rank))
    return job


def _check_targets(file: DataFile, config: TrainConfig) -> int:
    """Checks that y suits --loss (distnn.job.targets); for class labels returns the number
    of classes (--d-out, else the largest label + 1: every rank reads all of y, in bounded
    memory)."""
    mismatch = loss_mismatch(config.loss, file.read(torch.arange(1))[1], named="--loss {}",
                             probabilities=False)
    if mismatch:
        raise file.fail(f"holds {mismatch[0]}", mismatch[1])
    if not file.labels:
        return 0
    largest = file.check_labels(config.ignore_index)
    if largest < 0:
        raise file.fail(f"holds no class label other than the ignored {config.ignore_index}",
                        "labels 0, 1, 2, ..., some of them not --ignore-index")
    if config.d_out is not None and largest >= config.d_out:
        raise file.fail(f"holds the class label {largest}, but --d-out is {config.d_out}",
                        f"labels 0 to {config.d_out - 1}, or a larger --d-out")
    return config.d_out or largest + 1


def _val_file(config: TrainConfig, *, train_rows: tuple[torch.Tensor, torch.Tensor],
              world_size: int, rank: int) -> DataFile:
    """--val-data, checked against the training rows (``train_rows``: some of them, or
    none of a batch of that shape) and classes."""
    val = DataFile(config.val_data, flag="--val-data")
    mismatch = val_mismatch(*val.read(torch.arange(1)), *train_rows)
    if mismatch:
        raise val.fail(f"holds {mismatch[0]}", mismatch[1])
    if val.labels:
        largest = val.check_labels(config.ignore_index)
        if largest >= config.d_out:
            raise val.fail(f"holds the class label {largest}",
                           f"labels 0 to {config.d_out - 1}, the training data's classes")
    val.check_share(world_size, rank)
    return val
