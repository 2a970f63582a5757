"""What a run checks of the user's model and loss before its first step, on every rank:
weights that exist and can be trained, a loss that sums over the rows, no batch statistics
on several ranks (and a warning for random layers), and an output that suits the loss and
the data, seen with fake tensors (shapes without values: nothing computed, nothing changed).

Each check raises UsageError (exit 2) with one line; startup.check_job runs them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.nn.parameter import is_lazy

from distnn.data.batches import TensorRows
from distnn.data.datafile import DataFile
from distnn.errors import UsageError
from distnn.job.losses import scores_of
from distnn.job.spec import Job

log = logging.getLogger("distnn")


def check_model_weights(job: Job) -> None:
    """Refuses a model without weights to train, or with weights not made yet (on the
    meta device, or lazy modules' before their first call): each would fail later, with a
    traceback, or (a lazy model's shapes) before the ranks could compare their models.
    (Weights of another dtype than the inputs are the model's business: it may cast them.)"""
    params = [p for p in job.model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters; allowed: a model with "
                         "parameters that require gradients")
    if any(is_lazy(p) for p in params):
        raise UsageError("the model has lazy parameters (nn.LazyLinear, say), whose shapes "
                         "are not known before a first call; allowed: a model with its shapes "
                         "given, or called once on an example before training")
    if any(p.device.type == "meta" for p in params):
        raise UsageError("the model's parameters are on the meta device (shapes without "
                         "values); allowed: a model with its weights made, e.g. "
                         "to_empty() and an initialisation, or built without device='meta'")


def check_sum_loss(job: Job) -> None:
    """Refuses a torch loss module that does not sum over the rows (``reduction='mean'``,
    torch's default, or ``'none'``): each rank would average over its own shard, and the
    ranks' results would not add up to the batch's."""
    reduction = getattr(job.loss_fn, "reduction", "sum")
    if isinstance(job.loss_fn, nn.modules.loss._Loss) and reduction != "sum":
        raise UsageError(f"the loss {type(job.loss_fn).__name__}(reduction={reduction!r}) "
                         "does not sum over the rows, so the ranks' losses and gradients "
                         "would not add up to the batch's; allowed: reduction='sum'")


def check_no_batch_statistics(job: Job) -> None:
    """Refuses BatchNorm layers that use batch statistics (training mode, or no running
    statistics kept) where a batch is split (several ranks, or --micro-batches): they
    normalise over the rows they are given, a piece rather than the batch, so the run would
    not train as one process on whole batches does. (nn.SyncBatchNorm, which shares the
    statistics across the ranks, is let through.)"""
    layers = sorted({type(module).__name__ for module in job.model.modules()
                     if isinstance(module, nn.modules.batchnorm._BatchNorm)
                     and not isinstance(module, nn.SyncBatchNorm)
                     and (module.training or module.running_mean is None)})
    if layers:
        raise UsageError(f"the model has {', '.join(layers)} layers using batch statistics, "
                         "which normalise over each rank's or micro-batch's rows rather than "
                         "the batch, so the run would not train as one process does; allowed: "
                         "GroupNorm or LayerNorm, BatchNorm in eval mode with running "
                         "statistics, or one process without --micro-batches")


def warn_random_layers(job: Job) -> None:
    """Warns (rank 0) of Dropout layers in training mode: their masks are random numbers
    that distnn's guarantee does not cover (N ranks draw them per rank, not as one process
    would; the generators' states are not in a checkpoint, so a resumed run draws others)."""
    layers = sorted({type(module).__name__ for module in job.model.modules()
                     if isinstance(module, nn.modules.dropout._DropoutNd)
                     and module.training and module.p > 0})
    if layers:
        log.warning(f"the model has {', '.join(layers)} layers in training mode: their random "
                    "masks are outside distnn's guarantee (several ranks draw them otherwise "
                    "than one process would, and a resumed run draws new ones), so the run "
                    "is like the one-process run in distribution only")


def check_model_output(job: Job) -> None:
    """Refuses a model whose output does not suit distnn's loss and the data, and says
    whether labels can be scored for an accuracy (``job.scored``). Under mse its scores'
    shape must be the targets': torch's ``MSELoss`` broadcasts the two ([N] against [N, 1]
    gives [N, N]) and trains on a wrong sum, with a warning at most. Under cross-entropy the
    scores must be the labels' shape and a score for each class, last ([N, V] for y [N];
    [N, T, V] for y [N, T]), and every class the labels name must have its score: otherwise
    torch fails in the first step, with a traceback (or, on a GPU, an assertion in a kernel)."""
    mse = job.builtin_loss and isinstance(job.loss_fn, nn.MSELoss)
    classes = job.builtin_loss and isinstance(job.loss_fn, nn.CrossEntropyLoss)
    if job.fixed is not None:
        x, y = (rows[:2] for rows in job.fixed)
    else:
        x, y = job.source.read(torch.arange(min(2, job.source.rows)))
    if not len(x):
        shape = None
    elif job.output_width is not None:  # distnn's MLP: known without running it
        shape = torch.Size([*x.shape[:-1], job.output_width])
    else:
        shape = output_shape(job.model, x, scored=job.builtin_loss)
    if shape is None:
        # unknown without computing: distnn's cross-entropy scores its labels or fails
        job.scored = classes and job.classification
        return
    job.scored = job.classification and shape[:-1] == y.shape
    if mse and shape != y.shape:
        raise UsageError(f"the model's output for {len(x)} rows has shape {list(shape)} but "
                         f"their targets have {list(y.shape)}, and the mse loss would "
                         "broadcast the two into a wrong sum; allowed: a model whose output "
                         "has the targets' shape")
    if not classes:
        return
    if job.classification and not job.scored:
        raise UsageError(f"the model's scores for {len(x)} rows have shape {list(shape)} but "
                         f"their labels have {list(y.shape)}; allowed for cross-entropy: "
                         f"scores of shape {[*y.shape, 'classes']}, the classes last")
    if not job.classification and shape != y.shape:
        raise UsageError(f"the model's scores for {len(x)} rows have shape {list(shape)} but "
                         f"their class probabilities have {list(y.shape)}; allowed: the "
                         "same shape")
    largest = _largest_label(job) if job.classification else None
    if largest is not None and largest >= shape[-1]:
        raise UsageError(f"the model gives {shape[-1]} scores a position but the data holds "
                         f"the class label {largest}; allowed: a model with a score for each "
                         f"class, {largest + 1} or more (the vocabulary of a language model), "
                         "or labels below that")


def _largest_label(job: Job) -> int | None:
    """The training data's largest class label, leaving out --ignore-index; None where it is
    not known without reading every row (a dataset object)."""
    source, ignored = job.source, job.config.ignore_index
    if isinstance(source, DataFile):
        return source.check_labels(ignored)  # read once, when the file was checked
    if isinstance(source, TensorRows):
        counted = source.y[source.y != ignored]
        return int(counted.max()) if counted.numel() else None
    return None


def output_shape(model: nn.Module, x: torch.Tensor, *,
                 scored: bool = False) -> torch.Size | None:
    """The shape of ``model(x)``, found with fake tensors: they carry shapes, dtypes and
    devices but no values, so nothing is computed and no tensor of the model (weights,
    buffers, random generators) changes. None when the shape cannot be known so: a forward
    that depends on values (a branch on a tensor's contents), one that reads tensors the
    module does not register, or an output without scores: of any output the shape is its
    scores' (distnn.job.losses.scores_of: the tensor, .logits, a dict's "logits", a tuple's
    first), and with ``scored`` an output without them raises UsageError (distnn's loss
    needs them). (Python state the forward
    keeps, a count of its calls say, sees one call.)"""
    device = next(model.parameters()).device
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs each failed op
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
              FakeTensorMode()):
            # made from the shapes alone: a fake made from a tensor would hold a weak
            # reference to it, which a later model.to() swapping tensors refuses
            output = functional_call(model, {name: _fake_like(tensor) for name, tensor in named},
                                     (_fake_like(x, device),))
    except Exception:  # noqa: BLE001 - not knowable without values: the first step will tell
        return None
    finally:
        fake_log.setLevel(level)
    try:
        return scores_of(output).shape
    except UsageError:
        if scored:
            raise
        return None


def _fake_like(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Inside a FakeTensorMode: a fake tensor of ``tensor``'s shape, strides and dtype."""
    return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype,
                               device=device or tensor.device)
