"""What a run checks before its first step: on every rank, what its device and backend can
do, whether the flags' sizes can fit, and whether the job and the flags go together; on
rank 0, its outputs (writable, the checkpoint folder held for this job alone, leftovers of
killed writes removed) and the checkpoint to resume, which must fit the run.

Each check raises UsageError (exit 2) or RunFailed (exit 5 for memory) with one line; the
Trainer shares every rank's verdict in one exchange, so any rank's error stops all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.nn.parameter import is_lazy

from distnn.batches import TensorRows
from distnn.checkpoint import (
    Checkpoint,
    FolderLock,
    changed_settings,
    check_compatible,
    latest_checkpoint,
    remove_temporaries,
)
from distnn.config import TrainConfig, UsageError, flag_text
from distnn.datafile import DataFile
from distnn.jobs import Job
from distnn.memory import LABEL_BYTES, check_fits, mlp_needs
from distnn.runtime import Runtime
from distnn.weights import check_writable, remove_stale_temporaries

log = logging.getLogger("distnn")


def check_placement(config: TrainConfig, rt: Runtime) -> None:
    """Refuses what this rank's device or backend cannot do."""
    if config.precision == "tf32" and rt.device.type != "cuda":
        raise UsageError("--precision: got 'tf32' but this rank computes on the CPU; "
                         "TF32 is a CUDA tensor-core format; allowed on the CPU: "
                         "fp32, bf16")
    if config.cuda_graph and rt.device.type != "cuda":
        raise UsageError("--cuda-graph: this rank computes on the CPU, and a CUDA graph "
                         "captures CUDA kernels; allowed: --cuda-graph on a CUDA device")
    if config.cuda_graph and rt.communicates and rt.placement.backend != "nccl":
        raise UsageError(f"--cuda-graph: the backend is {rt.placement.backend}, whose "
                         "collectives run on the CPU and cannot be captured in a CUDA "
                         "graph; allowed: --backend nccl (one GPU per rank), or one process")


def check_memory(sizes: TrainConfig, rt: Runtime, *, given_d_out: bool = True) -> None:
    """The flags' MLP and its data at the run's sizes (``sizes``: the config resolved with the
    data's widths and, for class labels, its number of classes; ``given_d_out``: whether
    --d-out set the outputs, for the message), refused (exit 5) before they are allocated
    when they visibly cannot fit. On the CPU the ranks of a machine share its memory. (A
    model of --model or distnn.fit sizes itself; an allocation that fails there is one
    line too: see Trainer.train.)"""
    labels = sizes.loss == "cross-entropy"  # y: one int64 label a row, d_out classes
    outputs = (f"{sizes.d_out} classes (labels 0 to {sizes.d_out - 1})"
               if labels and not given_d_out else f"--d-out {sizes.d_out}")
    if sizes.data:
        rows = -(-sizes.batch_size // rt.world_size)  # a shard of a batch
        data = f"--batch-size {sizes.batch_size} of --data {sizes.data!r}"
    else:
        rows = sizes.batch_size  # every rank draws the whole reference batch
        data = f"--batch-size {rows} with --d-in {sizes.d_in} and {outputs}"
    hidden = flag_text(sizes.hidden)
    needs = mlp_needs(batch=rows, d_in=sizes.d_in, hidden=sizes.hidden, d_out=sizes.d_out,
                      data_rows=rows, y_bytes=LABEL_BYTES if labels else None)
    check_fits(needs, flags={
        "data": data,
        "weights": f"--hidden {hidden} with --d-in {sizes.d_in} and {outputs}",
        "activations": f"--batch-size {sizes.batch_size} with --hidden {hidden}"},
        device=rt.device,
        sharing=rt.launch.local_world_size if rt.device.type == "cpu" else 1)


def check_job(job: Job, *, ranks: int = 1) -> None:
    """Refuses combinations of the job and the flags that cannot run, or that ``ranks``
    ranks cannot run as one process would: a model without weights to train, a loss that
    is not a sum, batch statistics, an output the mse loss would broadcast, and what
    --cuda-graph cannot capture."""
    check_model_weights(job)
    check_sum_loss(job)
    if ranks > 1:
        check_no_batch_statistics(job)
    check_model_output(job)
    config = job.config
    if not config.cuda_graph:
        return
    if job.optimizer is not None:
        raise UsageError(f"--cuda-graph: got --optimizer {config.optimizer}, whose "
                         "torch.optim step is not captured; allowed: --cuda-graph with "
                         "--optimizer sgd")
    if job.fixed is None and not job.plan.uniform:
        raise UsageError(f"--cuda-graph: the data's {job.plan.rows} rows leave a last batch "
                         f"smaller than --batch-size {job.plan.batch_size}, and a captured "
                         "step has one shape; allowed: a --batch-size that divides the "
                         "rows, or --drop-last")


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
    """Refuses BatchNorm layers in training mode on more than one rank: they normalise over
    the rows they are given, each rank's shard rather than the batch, so the ranks would not
    train as one process does. (nn.SyncBatchNorm, which shares the statistics across the
    ranks, is let through.)"""
    layers = sorted({type(module).__name__ for module in job.model.modules()
                     if isinstance(module, nn.modules.batchnorm._BatchNorm)
                     and not isinstance(module, nn.SyncBatchNorm) and module.training})
    if layers:
        raise UsageError(f"the model has {', '.join(layers)} layers in training mode, which "
                         "normalise over each rank's rows rather than the batch, so the "
                         "ranks would not train as one process does; allowed: GroupNorm or "
                         "LayerNorm, BatchNorm in eval mode (its running statistics fixed), "
                         "or one process")


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
    """Refuses a model whose output does not suit the loss and the data. Under an mse loss
    its shape must be the targets': torch's ``MSELoss`` broadcasts the two ([N] against
    [N, 1] gives [N, N]) and trains on a wrong sum, with a warning at most. Under
    cross-entropy it must give a score for every class the labels name (else torch fails
    in the first step, with a traceback)."""
    mse = isinstance(job.loss_fn, nn.MSELoss)
    classes = isinstance(job.loss_fn, nn.CrossEntropyLoss) and job.classification
    if not (mse or classes):
        return
    if job.fixed is not None:
        x, y = (rows[:2] for rows in job.fixed)
    else:
        x, y = job.source.read(torch.arange(min(2, job.source.rows)))
    shape = output_shape(job.model, x) if len(x) else None
    if shape is None:
        return
    if mse and shape != y.shape:
        raise UsageError(f"the model's output for {len(x)} rows has shape {list(shape)} but "
                         f"their targets have {list(y.shape)}, and the mse loss would "
                         "broadcast the two into a wrong sum; allowed: a model whose output "
                         "has the targets' shape")
    largest = _largest_label(job) if classes and len(shape) == 2 else None
    if largest is not None and largest >= shape[1]:
        raise UsageError(f"the model gives {shape[1]} scores a row but the data holds the "
                         f"class label {largest}; allowed: a model with a score for each "
                         f"class, {largest + 1} or more")


def _largest_label(job: Job) -> int | None:
    """The training data's largest class label; None where it is not known without reading
    every row (a dataset object)."""
    source = job.source
    if isinstance(source, DataFile):
        return source.check_labels()  # read once, when the file was checked
    if isinstance(source, TensorRows):
        return int(source.y.max())
    return None


def output_shape(model: nn.Module, x: torch.Tensor) -> torch.Size | None:
    """The shape of ``model(x)``, found with fake tensors: they carry shapes, dtypes and
    devices but no values, so nothing is computed and no tensor of the model (weights,
    buffers, random generators) changes. None when the shape cannot be known so: a forward
    that depends on values (a branch on a tensor's contents), one that reads tensors the
    module does not register, or an output that is not a tensor. (Python state the forward
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
    return output.shape if isinstance(output, torch.Tensor) else None


def _fake_like(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Inside a FakeTensorMode: a fake tensor of ``tensor``'s shape, strides and dtype."""
    return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype,
                               device=device or tensor.device)


def claim_checkpoint_dir(config: TrainConfig) -> FolderLock | None:
    """Rank 0: --checkpoint-dir made, writable and held for this job alone (the lock is
    the caller's to release); the leftovers of killed checkpoint writes removed."""
    if not config.checkpoint_dir:
        return None
    try:
        os.makedirs(config.checkpoint_dir, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--checkpoint-dir: cannot create {config.checkpoint_dir!r} "
                         f"({error.strerror}); allowed: a writable directory") from None
    check_writable(os.path.join(config.checkpoint_dir, ".distnn-probe"), "--checkpoint-dir")
    lock = FolderLock(config.checkpoint_dir)
    try:
        for path in remove_temporaries(config.checkpoint_dir):
            log.info(f"removed {path}, a checkpoint whose writing was cut short")
    except BaseException:
        lock.release()
        raise
    return lock


def prepare_outputs(job: Job) -> Checkpoint | None:
    """Rank 0, after :func:`claim_checkpoint_dir`: --metrics and --save writable (a --save
    whose writing was cut short removed), and the newest good checkpoint, checked to fit
    the run (None: nothing to resume)."""
    config = job.config
    for flag, path, in_place in (("--metrics", config.metrics, True),
                                 ("--save", config.save, False)):
        if path:
            check_writable(path, flag, in_place=in_place)
    check_outputs_distinct(job)
    if config.save:
        for path in remove_stale_temporaries(config.save):
            log.info(f"removed {path}, a --save whose writing was cut short")
    if not config.checkpoint_dir:
        return None
    checkpoint, notices = latest_checkpoint(config.checkpoint_dir)
    for notice in notices:
        log.warning(notice)
    if checkpoint:
        check_resume(checkpoint, job)
    return checkpoint


def check_outputs_distinct(job: Job) -> None:
    """Refuses --metrics or --save naming a file that an input (a data file of the command
    line or of distnn.fit) or the other output names (through a link too): the run would
    overwrite it."""
    config = job.config
    inputs = [(data.flag, data.path) for data in (job.source, job.val)
              if isinstance(data, DataFile)]
    named: dict[object, str] = {}
    for flag, path in (*inputs, ("--metrics", config.metrics), ("--save", config.save)):
        if not path:
            continue
        try:
            found = os.stat(path)
            key: object = (found.st_dev, found.st_ino)
        except OSError:  # not there yet
            key = os.path.realpath(path)
        if key in named and flag in ("--metrics", "--save"):
            raise UsageError(f"{flag}: got {path!r}, the file that {named[key]} names, which "
                             "the run would overwrite; allowed: a file of its own")
        named.setdefault(key, flag)


def check_resume(checkpoint: Checkpoint, job: Job) -> None:
    """Refuses a checkpoint made for another run: other sizes, batch order, data, loss or
    optimizer, or more steps done than this run asks for."""
    config = job.config
    check_compatible(checkpoint, dataclasses.asdict(config))
    changed = changed_settings(checkpoint, dataclasses.asdict(config))
    if changed:
        log.warning(f"resuming {checkpoint.path}, made with {', '.join(changed)}: the steps "
                    "after it follow this run's settings, so the result is neither run's")
    rows = job.plan.rows if job.plan else None
    if checkpoint.state.get("rows") != rows:
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} was made on "
                         f"{checkpoint.state.get('rows')} rows of data and this run "
                         f"has {rows}; allowed: resume on the same data, or use "
                         "another --checkpoint-dir")
    saved_data, data = checkpoint.state.get("data"), data_digest(job)
    if saved_data is not None and data is not None and saved_data != data:
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} was made on other data (the "
                         f"same {rows} rows, but other sizes or bytes); allowed: resume on the "
                         "same data, or use another --checkpoint-dir")
    if checkpoint.step > config.steps:
        raise UsageError(f"--steps: got {config.steps} but {checkpoint.path} has already "
                         f"done {checkpoint.step}; allowed: --steps >= {checkpoint.step}")
    if (checkpoint.optimizer is None) != (job.optimizer is None):
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} holds "
                         f"{'no ' if checkpoint.optimizer is None else ''}optimizer "
                         "state and this run's optimizer "
                         f"{'needs' if checkpoint.optimizer is None else 'has'} none; "
                         "allowed: resume with the same optimizer")
    saved, now = checkpoint.state.get("objects"), job_objects(job)
    if saved is not None and saved != now:  # checkpoints before this record skip it
        differ = [f"{kind} {saved.get(kind)} (now {name})" for kind, name in now.items()
                  if saved.get(kind) != name]
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} was made with "
                         f"{', '.join(differ)}; allowed: resume with the same loss and "
                         "optimizer, or use another --checkpoint-dir")


def data_digest(job: Job) -> str | None:
    """The training data's digest (a data file's or tensors'; batches.sampled_digest),
    computed once; None for the reference batch (the flags make it) and for a dataset
    object, which has no bytes to look at."""
    if job.data_digest is None:
        source = job.source
        job.data_digest = source.digest() if hasattr(source, "digest") else ""
    return job.data_digest or None


def job_facts(job: Job) -> dict[str, object]:
    """What the ranks must agree on beyond the flags (distnn.fit's arguments are not flags):
    the rows trained on and validated on, the loss and the optimizer. A rank that differs
    would train otherwise, or wait in a collective the others never call."""
    return {"training rows": job.plan.rows if job.plan else None,
            "validation rows": job.val.rows if job.val else None,
            **job_objects(job)}


def job_objects(job: Job) -> dict[str, str | None]:
    """The loss and optimizer a job trains with, by class or function (distnn.fit takes the
    user's own objects, which the flags cannot name): a checkpoint records them, and a
    resume with others is refused."""
    return {"loss": qualified_name(job.loss_fn),
            "optimizer": qualified_name(job.optimizer) if job.optimizer else None}


def qualified_name(thing: object) -> str:
    """``module:QualName`` of a function, or of an object's class (a loss module, an
    optimizer): what a checkpoint can record of a Python object."""
    named = thing if hasattr(thing, "__qualname__") else type(thing)
    return f"{named.__module__}:{named.__qualname__}"
