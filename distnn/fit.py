"""``distnn.fit``: the command line's whole run (mini-batches, checkpoints and resume,
preemption, the guards, metrics, validation) for the user's own model, loss, optimizer and
data, from Python."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distnn.config import TrainConfig
from distnn.data.batches import DatasetRows, RowSource, TensorRows
from distnn.data.datafile import FLOATS, INTEGERS, DataFile
from distnn.distributed.environment import detect_launch
from distnn.distributed.runtime import Runtime, setup
from distnn.errors import UsageError
from distnn.job.losses import sum_loss
from distnn.job.optimizers import build_optimizer
from distnn.job.spec import Job, rows_job
from distnn.job.targets import loss_mismatch, val_mismatch
from distnn.logs import LOGGER, configure_logging
from distnn.settings import Settings
from distnn.trainer import Trainer, TrainResult

# Flags that describe the command line's own model and data: fit takes the objects instead.
_NOT_SETTINGS = ("data", "val_data", "hidden", "d_in", "d_out")
Data = tuple[torch.Tensor, torch.Tensor] | str | os.PathLike | Any


def fit(model: nn.Module, *, train: Data,
        loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "mse",
        optimizer: str | torch.optim.Optimizer = "sgd", val: Data | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        collate_fn: Callable[[list], Any] | None = None, keys: tuple[str, str] | None = None,
        num_workers: int = 0, runtime: Runtime | None = None,
        **settings: Any) -> TrainResult:
    """Trains ``model`` data-parallel on every rank of the job; returns the TrainResult
    (the model, identical on every rank, or each rank's shards of it under ``shard=``
    gradients or parameters: docs/sharding.md; the steps done; the validation results).

    Call it on every rank with the same arguments. ``model`` is the user's module, built
    the same way on every rank (seed first: rank 0's weights are broadcast anyway).
    ``train`` and ``val`` are ``(x, y)`` tensors, a map-style dataset (``len`` and
    ``dataset[i]``: an ``(x_i, y_i)`` pair or a dict), or the path of a data file (as
    ``--data``). A dataset's items are batched by ``collate_fn`` (torch's
    ``default_collate`` by default) into an (x, y) pair or a dict, whose ``keys`` name the
    input and the target (default ``("x", "y")``, else ``("input_ids", "labels")``);
    ``num_workers`` DataLoader processes read each step's rows ahead. ``loss`` is
    ``"mse"``, ``"cross-entropy"`` or a function ``(prediction, target) -> loss`` that sums
    over the rows (not a mean: the ranks' sums add up to the batch's). ``optimizer`` is
    ``"sgd"`` (``p -= lr * grad``), ``"momentum"``, ``"adamw"``, or a ``torch.optim``
    optimizer built on ``model.parameters()``. ``scheduler``: a torch.optim.lr_scheduler
    built on that optimizer, stepped once after each update and checkpointed (its state must
    be JSON numbers and lists, as torch's own schedulers' are). ``settings`` are the command
    line's other flags as keywords (``batch_size=32, epochs=3, lr=1e-3, checkpoint_dir="ck",
    metrics="run.jsonl", no_shuffle=True, ...``; see docs/flags.md).

    Without ``runtime`` it joins the job itself (torchrun's variables, or one process) and
    leaves it at the end; inside ``with distnn.setup() as rt:`` pass ``runtime=rt``.
    Raises UsageError (a ValueError) for bad input, RunFailed when the run must stop
    (non-finite values, diverged replicas, preemption: its ``exit_code`` says which).
    """
    # paths may come as pathlib.Path, as train= may
    settings = {name: os.fspath(value) if isinstance(value, os.PathLike) else value
                for name, value in settings.items()}
    given = sorted(set(settings) & set(_NOT_SETTINGS))
    if given:
        raise UsageError(f"distnn.fit: got {', '.join(given)} as settings; allowed: the model, "
                         "loss, optimizer and data as fit's own arguments")
    unknown = sorted(set(settings) - {field.name for field in dataclasses.fields(TrainConfig)})
    if unknown:
        raise UsageError(f"distnn.fit: got {', '.join(unknown)}, not a setting; allowed: the "
                         "flags of python -m distnn.train as keywords, dashes as underscores "
                         "(batch_size=32, epochs=3: docs/flags.md)")
    if not isinstance(model, nn.Module):
        raise UsageError(f"distnn.fit: model is a {type(model).__name__}; allowed: an "
                         "nn.Module (an instance, built on every rank)")
    if isinstance(optimizer, str):
        names = {"optimizer": optimizer}
    elif isinstance(optimizer, torch.optim.Optimizer):
        _check_optimizes(optimizer, model)
        unused = [f"{name}={settings[name]!r}" for name in ("lr", "momentum", "weight_decay")
                  if name in settings]
        if unused:
            raise UsageError(f"distnn.fit: got {', '.join(unused)} with a torch.optim "
                             "optimizer, which brings its own and would leave them unused; "
                             "allowed: them with optimizer='sgd', 'momentum' or 'adamw', or "
                             "set them on the optimizer")
        names = {}
    else:
        raise UsageError(f"distnn.fit: optimizer is a {type(optimizer).__name__}; allowed: "
                         "'sgd', 'momentum', 'adamw' or a torch.optim.Optimizer")
    _check_scheduler(scheduler, optimizer, settings)
    if isinstance(loss, str):
        names["loss"] = loss
    elif isinstance(loss, type) or not callable(loss):
        what = f"the class {loss.__name__}" if isinstance(loss, type) else (
            f"a {type(loss).__name__}")
        raise UsageError(f"distnn.fit: loss is {what}; allowed: 'mse', 'cross-entropy', or a "
                         "function (prediction, target) -> loss summed over the rows, such "
                         "as nn.MSELoss(reduction='sum')")
    kind = type(model)
    # fit takes the model object; its class is named where --model names a function, so a
    # checkpoint records it and a resume with another model's class is refused (nothing is
    # imported from it)
    config = TrainConfig(**settings, **names, model=f"{kind.__module__}:{kind.__qualname__}")

    def build_job(flags: TrainConfig, rt: Runtime) -> Job:
        batching = {"collate_fn": collate_fn, "keys": keys, "num_workers": num_workers}
        source = _checked(_rows(train, "train", flags.ignore_index, batching), rt,
                          flags.ignore_index)
        x, y = source.read(torch.arange(min(1, source.rows)))
        if isinstance(loss, str):
            mismatch = loss_mismatch(loss, y, named="loss={!r}")
            if mismatch:
                raise UsageError(f"distnn.fit: train holds {mismatch[0]}; allowed: {mismatch[1]}")
        builtin = isinstance(loss, str)
        job = rows_job(flags, source=source, d_in=x.shape[1] if x.dim() > 1 else 1,
                       d_out=y.shape[1] if y.dim() > 1 else 1, model=model,
                       loss_fn=sum_loss(loss, ignore_index=flags.ignore_index) if builtin
                       else loss, builtin_loss=builtin,
                       classification=not y.is_floating_point(), world_size=rt.world_size,
                       rank=rt.rank)
        job.val = (_like_train(_checked(_rows(val, "val", flags.ignore_index,
                                              {**batching, "num_workers": 0}), rt,
                                        flags.ignore_index), x, y)
                   if val is not None else None)
        job.optimizer = (build_optimizer(flags.optimizer, model.parameters(), lr=flags.lr,
                                         momentum=flags.momentum,
                                         weight_decay=flags.weight_decay)
                         if isinstance(optimizer, str) else optimizer)
        job.scheduler = scheduler
        return job

    def run(rt: Runtime) -> TrainResult:
        if not (logging.getLogger(LOGGER).handlers or logging.getLogger().handlers):
            # the program has not set up logging: the command line's lines on stderr
            configure_logging(rank=rt.rank, world_size=rt.world_size,
                              verbosity=config.verbosity)
        return Trainer(config, rt, settings=Settings.from_environ(os.environ),
                       build_job=build_job).train()

    if runtime is not None:
        _check_runtime(runtime)
        return run(runtime)
    if dist.is_available() and dist.is_initialized() and detect_launch(
            os.environ).needs_process_group:  # (a group of the program's own, alone: allowed)
        raise UsageError("distnn.fit: this process is in a process group already (inside "
                         "`with distnn.setup() as rt:`?); allowed: runtime=rt, the setup's "
                         "runtime")
    with setup(device=config.device, backend=config.backend, timeout_s=config.timeout_s,
               sharding=config.shard != "none") as rt:
        return run(rt)


def _check_runtime(runtime: object) -> None:
    """Refuses a runtime= that is not distnn.setup's, or one whose group has ended."""
    if not isinstance(runtime, Runtime):
        raise UsageError(f"distnn.fit: runtime is a {type(runtime).__name__}; allowed: the "
                         "runtime of `with distnn.setup() as rt:` (runtime=rt)")
    if runtime.distributed and not dist.is_initialized():
        raise UsageError("distnn.fit: runtime=rt's process group has ended (the `with "
                         "distnn.setup() as rt:` block is over); allowed: fit inside that block")


def _check_scheduler(scheduler: object, optimizer: object, settings: dict[str, Any]) -> None:
    """Refuses a scheduler that is not torch's, that steps another optimizer than the one
    given, that comes with a schedule of the flags' too, or whose state a checkpoint cannot
    hold (JSON)."""
    if scheduler is None:
        return
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise UsageError(f"distnn.fit: scheduler is a {type(scheduler).__name__}; allowed: a "
                         "torch.optim.lr_scheduler.LRScheduler")
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise UsageError("distnn.fit: scheduler is a ReduceLROnPlateau, which steps on a "
                         "metric that fit does not pass it; allowed: a scheduler stepped once "
                         "an update (StepLR, CosineAnnealingLR, LambdaLR, ...)")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"distnn.fit: got scheduler= with optimizer={optimizer!r}, a name of "
                         "distnn's; allowed: a scheduler with the torch.optim optimizer it "
                         "steps, passed as optimizer=, or lr_schedule= with a name")
    if scheduler.optimizer is not optimizer:
        raise UsageError("distnn.fit: the scheduler is built on another optimizer than the one "
                         "given; allowed: a scheduler built on the optimizer passed in")
    if settings.get("shard", "none") != "none":
        raise UsageError(f"distnn.fit: got scheduler= and shard={settings['shard']!r}, which "
                         "rebuilds the optimizer the scheduler steps; allowed: one of them, or "
                         "lr_schedule= (the settings' schedule) with shard=")
    flags = [f"{name}={settings[name]!r}" for name in ("lr_schedule", "warmup_steps")
             if settings.get(name) not in (None, "constant", 0)]
    if flags:
        raise UsageError(f"distnn.fit: got scheduler= and {', '.join(flags)}; allowed: one of "
                         "them")
    try:
        json.dumps(scheduler.state_dict())
    except (TypeError, ValueError):
        raise UsageError(f"distnn.fit: the state of {type(scheduler).__name__} is not JSON "
                         "data, which a checkpoint holds; allowed: a scheduler whose "
                         "state_dict() is numbers, strings and lists (torch's own)") from None


def _check_optimizes(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Refuses an optimizer that steps tensors which are not the model's, or none of its
    trainable parameters: one built on another model (a copy, say) would leave this one
    untrained, silently."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    own = {id(p): p.requires_grad for p in model.parameters()}
    foreign = len(stepped - set(own))
    if foreign or not any(own.get(p) for p in stepped):
        said = (f"{foreign} tensors that are not the model's parameters" if foreign
                else "none of the model's trainable parameters")
        raise UsageError(f"distnn.fit: the optimizer steps {said}; allowed: an optimizer "
                         "built on model.parameters()")


def _like_train(val: RowSource, train_x: torch.Tensor, train_y: torch.Tensor) -> RowSource:
    """``val``, refused unless its rows are shaped as the training rows (``train_x``,
    ``train_y``: the first of them) and its targets are of their kind (distnn.job.targets)."""
    mismatch = val_mismatch(*val.read(torch.arange(min(1, val.rows))), train_x, train_y)
    if mismatch:
        raise UsageError(f"distnn.fit: val holds {mismatch[0]}; allowed: {mismatch[1]}")
    return val


def _checked(source: RowSource, rt: Runtime, ignore_index: int) -> RowSource:
    """A data file's rows checked as the command line checks them: this rank's share of the
    rows finite, and class labels not negative (but for ``ignore_index``)."""
    if isinstance(source, DataFile):
        if source.labels:
            source.check_labels(ignore_index)
        source.check_share(rt.world_size, rt.rank)
    return source


def _rows(data: Data, name: str, ignore_index: int, batching: dict[str, Any]) -> RowSource:
    """``data`` as rows that can be read by index (``batching``: a dataset's collate_fn,
    keys and num_workers); raises UsageError naming ``name``."""
    if isinstance(data, (str, os.PathLike)):
        return DataFile(os.fspath(data), flag=f"distnn.fit {name}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        given = [f"{name}={batching[name]!r}" for name in ("collate_fn", "num_workers")
                 if batching[name] not in (None, 0)]
        if given:
            raise UsageError(f"distnn.fit: got {', '.join(given)} with {name} as tensors, "
                             "which are not collated or read by workers; allowed: them with a "
                             "dataset")
        for tensor, what in zip(data, ("inputs", "targets"), strict=True):
            if tensor.dtype not in FLOATS + INTEGERS or tensor.layout != torch.strided:
                raise UsageError(f"distnn.fit: {name} holds {what} of dtype "
                                 f"{str(tensor.dtype).removeprefix('torch.')} and layout "
                                 f"{str(tensor.layout).removeprefix('torch.')}; allowed: dense "
                                 "tensors of floating-point numbers or integers")
        if data[0].dim() == 0 or data[1].dim() == 0:
            raise UsageError(f"distnn.fit: {name} holds tensors of shapes "
                             f"{list(data[0].shape)} and {list(data[1].shape)}; allowed: rows "
                             "[N, ...] of inputs and of targets")
        if len(data[0]) != len(data[1]) or len(data[0]) == 0:
            raise UsageError(f"distnn.fit: {name} holds {len(data[0])} inputs and "
                             f"{len(data[1])} targets; allowed: the same number, at least one")
        for tensor, what in zip(data, ("inputs", "targets"), strict=True):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UsageError(f"distnn.fit: {name} holds a non-finite value in its {what}; "
                                 "allowed: finite values")
        labels = data[1][data[1] != ignore_index] if not data[1].is_floating_point() else None
        if labels is not None and len(labels) and labels.min() < 0:
            raise UsageError(f"distnn.fit: {name} holds the negative class label "
                             f"{int(labels.min())}; allowed: class labels 0, 1, 2, ..., or "
                             f"the ignored label {ignore_index} (ignore_index)")
        return TensorRows(*data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            hasattr(array, "__array__") and not isinstance(array, torch.Tensor)
            for array in data):
        raise UsageError(f"distnn.fit: {name} holds {type(data[0]).__name__} arrays; allowed: "
                         "(x, y) torch tensors (torch.from_numpy(x), say)")
    if isinstance(data, Mapping):  # a dict is not indexed by row
        raise UsageError(f"distnn.fit: {name} is a {type(data).__name__}; allowed: (x, y) "
                         "tensors (a dict of tensors d: (d['x'], d['y'])), a map-style "
                         "dataset, or a data file's path")
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return _dataset_rows(data, name, batching)
    raise UsageError(f"distnn.fit: {name} is a {type(data).__name__}; allowed: (x, y) "
                     "tensors, a map-style dataset of (x, y) pairs or dicts, or a data "
                     "file's path")


def _dataset_rows(dataset: Any, name: str, batching: dict[str, Any]) -> DatasetRows:
    """A map-style dataset's rows, its first item batched and checked: an (x, y) pair, or a
    dict holding the keys (``keys``, else "x" and "y", else "input_ids" and "labels")."""
    workers, keys = batching["num_workers"], batching["keys"]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"distnn.fit: num_workers is {workers!r}; allowed: an integer >= 0")
    if keys is not None and not (isinstance(keys, (tuple, list)) and len(keys) == 2
                                 and all(isinstance(key, str) for key in keys)):
        raise UsageError(f"distnn.fit: keys is {keys!r}; allowed: two names, the input's and "
                         "the target's (keys=('input_ids', 'labels'))")
    if len(dataset) == 0:
        raise UsageError(f"distnn.fit: {name} holds no rows; allowed: at least one")
    first = dataset[0]
    if batching["collate_fn"] is None and not (
            isinstance(first, Mapping) or (isinstance(first, (tuple, list)) and len(first) == 2)):
        raise UsageError(f"distnn.fit: {name}[0] is a {type(first).__name__}; allowed: a "
                         "dataset whose items are (x, y) pairs or dicts, or a collate_fn that "
                         "batches them into one")
    rows = DatasetRows(dataset, collate_fn=batching["collate_fn"], num_workers=workers)
    try:
        batch = rows.collate_fn([first])
    except Exception as error:  # noqa: BLE001 - the user's items or collate_fn: one line
        said = (str(error).strip().splitlines() or [""])[0]
        raise UsageError(f"distnn.fit: {name}[0] cannot be batched ({type(error).__name__}: "
                         f"{said}); allowed: items that the collate_fn turns into an (x, y) "
                         "pair or a dict of tensors") from None
    if isinstance(batch, Mapping):
        found = [pair for pair in ([tuple(keys)] if keys else [("x", "y"),
                                                                ("input_ids", "labels")])
                 if all(key in batch for key in pair)]
        if not found:
            wanted = " and ".join(map(repr, keys)) if keys else (
                "'x' and 'y', or 'input_ids' and 'labels'")
            raise UsageError(f"distnn.fit: {name}'s batches are dicts with keys "
                             f"{sorted(map(str, batch))}; allowed: dicts holding {wanted} "
                             "(keys= names the input and the target)")
        rows.keys = found[0]
    elif not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise UsageError(f"distnn.fit: {name}'s batches are {type(batch).__name__}s; allowed: "
                         "items (or a collate_fn's batches) that are (x, y) pairs or dicts")
    return rows


__all__ = ["fit", "TrainResult"]
