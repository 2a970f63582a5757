"""What a run checks before its first step: on every rank, what its device and backend can
do, whether the flags' sizes can fit, and whether the job and the flags go together (the
model's own checks are in distnn.job.checks); on
rank 0, its outputs (writable, the checkpoint folder held for this job alone, leftovers of
killed writes removed) and the checkpoint to resume, which must fit the run.

Each check raises UsageError (exit 2) or RunFailed (exit 5 for memory) with one line; the
Trainer shares every rank's verdict in one exchange, so any rank's error stops all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import torch
from torch import nn

from distnn.config import TrainConfig, flag_text
from distnn.data.batches import RowSource
from distnn.data.datafile import DataFile
from distnn.distributed.runtime import Runtime
from distnn.errors import UsageError
from distnn.job.checks import (
    check_model_output,
    check_model_weights,
    check_no_batch_statistics,
    check_sum_loss,
)
from distnn.job.spec import Job
from distnn.resilience.checkpoint import (
    LOCK,
    STEP_DIR,
    TEMPORARY_PREFIX,
    Checkpoint,
    FolderLock,
    changed_settings,
    check_compatible,
    latest_checkpoint,
    remove_temporaries,
)
from distnn.resilience.memory import LABEL_BYTES, check_fits, mlp_needs
from distnn.resilience.outputs import check_writable, remove_stale_temporaries

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
    if config.shard != "none" and rt.communicates and not rt.sharding:
        raise UsageError(f"--shard {config.shard}: the process group was made by "
                         "distnn.setup(sharding=False), before torch's sharding modules, "
                         "which then hold it past its end; allowed: distnn.setup() (sharding "
                         "on, the default) around a run that shards")


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


def check_job(job: Job, *, ranks: int = 1, main: bool = True) -> None:
    """Refuses combinations of the job and the flags that cannot run, or that ``ranks``
    ranks cannot run as one process would: a model without weights to train, a loss that
    is not a sum, batch statistics, an output the mse loss would broadcast (looked at by
    the ``main`` rank alone: the others take its verdict and ``job.scored`` in the start-up
    exchange, which also compares the ranks' models; the look costs a process 1-2 s on a
    CPU), and what --cuda-graph cannot capture."""
    check_model_weights(job)
    check_sum_loss(job)
    if ranks > 1 or job.config.micro_batches > 1:
        check_no_batch_statistics(job)
    if main:
        check_model_output(job)
    config = job.config
    if config.min_lr > job.lr:  # (a constant schedule never reads it: a slip all the same)
        raise UsageError(f"--min-lr: got {config.min_lr!r}, above the learning rate {job.lr!r}; "
                         "allowed: a rate from 0 to it")
    if config.val_every and job.val is None:  # it would be left unused
        raise UsageError(f"--val-every {config.val_every}: no validation data; allowed: it "
                         "with --val-data (distnn.fit: val=)")
    if config.steps is not None and config.warmup_steps > config.steps:
        raise UsageError(f"--warmup-steps: got {config.warmup_steps}, beyond the run's "
                         f"{config.steps} steps; allowed: 0 to {config.steps}")
    recipe = [text for text, given in (
        (f"--lr-schedule {config.lr_schedule}", config.lr_schedule != "constant"),
        (f"--warmup-steps {config.warmup_steps}", config.warmup_steps),
        (f"--clip-grad-norm {flag_text(config.clip_grad_norm)}", config.clip_grad_norm),
        ("--loss-reduction mean", config.loss_reduction == "mean")) if given]
    if config.cuda_graph and recipe:  # --compile applies them (the eager update, uncompiled)
        raise UsageError(f"--cuda-graph: got {', '.join(recipe)}, which the captured step "
                         "does not apply yet; allowed: these without --cuda-graph (--compile "
                         "applies them), or --cuda-graph with a constant rate, no clipping "
                         "and the sum loss")
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
    try:  # a folder one may write to but not list (chmod 300): no checkpoint could be found
        os.listdir(config.checkpoint_dir)
    except OSError as error:
        raise UsageError(f"--checkpoint-dir: cannot list {config.checkpoint_dir!r} "
                         f"({error.strerror}); allowed: a directory this user can read and "
                         "write") from None
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
    check_outputs_distinct(job)
    for flag, path, in_place in (("--metrics", config.metrics, True),
                                 ("--save", config.save, False)):
        if path:
            check_writable(path, flag, in_place=in_place)
    if config.tensorboard:
        check_tensorboard(config.tensorboard)
    for flag, output in (("--save", config.save), ("--metrics", config.metrics)):
        if output:
            for path in remove_stale_temporaries(output):
                log.info(f"removed {path}, a {flag} whose writing was cut short")
    if not config.checkpoint_dir:
        return None
    checkpoint, notices = latest_checkpoint(config.checkpoint_dir)
    for notice in notices:
        log.warning(notice)
    if checkpoint:
        check_resume(checkpoint, job)
    return checkpoint


def check_tensorboard(directory: str) -> None:
    """--tensorboard: torch's writer importable (the tensorboard extra) and the folder
    writable."""
    try:
        import torch.utils.tensorboard  # noqa: F401 - it imports the tensorboard package
    except ImportError:
        raise UsageError("--tensorboard: the tensorboard package is not installed; allowed: "
                         "--tensorboard after pip install 'distnn[tensorboard]'") from None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--tensorboard: cannot create {directory!r} ({error.strerror}); "
                         "allowed: a writable directory") from None
    check_writable(os.path.join(directory, ".distnn-probe"), "--tensorboard")


def check_outputs_distinct(job: Job) -> None:
    """Refuses --metrics, --save or --tensorboard naming a file that an input (a data file
    of the command line or of distnn.fit) or another output names (through a link too): the
    run would overwrite it; or a path inside --checkpoint-dir, whose folders and lock file
    the run replaces and deletes."""
    config = job.config
    if config.checkpoint_dir:
        folder = os.path.realpath(config.checkpoint_dir)
        for flag, path in (("--metrics", config.metrics), ("--save", config.save),
                           ("--tensorboard", config.tensorboard)):
            inside = os.path.relpath(os.path.realpath(path), folder) if path else os.pardir
            entry = inside.split(os.sep)[0]
            if entry == LOCK or STEP_DIR.match(entry) or entry.startswith(TEMPORARY_PREFIX):
                raise UsageError(f"{flag}: got {path!r}, inside --checkpoint-dir "
                                 f"{config.checkpoint_dir!r}'s {entry}, which the run "
                                 "replaces or deletes; allowed: a path outside its checkpoints "
                                 "and lock")
    inputs = [(data.flag, data.path) for data in (job.source, job.val)
              if isinstance(data, DataFile)]
    named: dict[object, str] = {}
    outputs = (("--metrics", config.metrics), ("--save", config.save),
               ("--tensorboard", config.tensorboard))
    for flag, path in (*inputs, *outputs):
        if not path:
            continue
        try:
            found = os.stat(path)
            key: object = (found.st_dev, found.st_ino)
        except OSError:  # not there yet
            key = os.path.realpath(path)
        if key in named and flag in ("--metrics", "--save", "--tensorboard"):
            raise UsageError(f"{flag}: got {path!r}, the file that {named[key]} names, which "
                             "the run would overwrite; allowed: a file of its own")
        named.setdefault(key, flag)


def check_weights_fit(checkpoint: Checkpoint, model: nn.Module) -> None:
    """Refuses a checkpoint whose weights are not the model's, by name and shape: the
    flags may agree while the model differs (another --model, or fit's model edited)."""
    want = {name: list(value.shape) for name, value in model.state_dict().items()}
    have = {name: list(value.shape) for name, value in checkpoint.weights.items()}
    if want == have:
        return
    differ = [f"{name} {have[name]} (the model's {want[name]})"
              for name in want if name in have and have[name] != want[name]]
    differ += [f"no {name}" for name in want if name not in have]
    differ += [f"{name}, which the model has not" for name in have if name not in want]
    raise UsageError(f"--checkpoint-dir: {checkpoint.path} holds weights that do not fit the "
                     f"model: {', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}; "
                     "allowed: resume with the same model, or use another --checkpoint-dir")


def check_resume(checkpoint: Checkpoint, job: Job) -> None:
    """Refuses a checkpoint made for another run: other sizes, batch order, data, loss or
    optimizer, or more steps done than this run asks for."""
    config = job.config
    check_compatible(checkpoint, dataclasses.asdict(config))
    if not checkpoint.sharded:  # (each rank reads its shards at the resume)
        check_weights_fit(checkpoint, job.model)
    rows = job.plan.rows if job.plan else None
    if checkpoint.state.get("rows") != rows:
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} was made on "
                         f"{checkpoint.state.get('rows')} rows of data and this run "
                         f"has {rows}; allowed: resume on the same data, or use "
                         "another --checkpoint-dir")
    saved_data, data = checkpoint.state.get("data"), data_digest(job)
    if saved_data is not None and data is not None and saved_data != data:
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} was made on other data (the "
                         f"same {rows} rows, but other values, order or dtypes); allowed: "
                         "resume on the same data, or use another --checkpoint-dir")
    if checkpoint.step > config.steps:
        raise UsageError(f"--steps: got {config.steps} but {checkpoint.path} has already "
                         f"done {checkpoint.step}; allowed: --steps >= {checkpoint.step}")
    if checkpoint.has_optimizer_state != (job.optimizer is not None):
        held = checkpoint.has_optimizer_state
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} holds "
                         f"{'' if held else 'no '}optimizer "
                         "state and this run's optimizer "
                         f"{'has' if held else 'needs'} none; "
                         "allowed: resume with the same optimizer")
    saved, now = checkpoint.state.get("objects"), job_objects(job)
    if saved is not None and saved != now:  # a checkpoint without the record skips it
        differ = [f"{kind} {saved.get(kind)} (now {name})" for kind, name in now.items()
                  if saved.get(kind) != name]
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} was made with "
                         f"{', '.join(differ)}; allowed: resume with the same loss and "
                         "optimizer, or use another --checkpoint-dir")
    # the settings this run's update reads (an optimizer object given to fit reads none)
    given_optimizer = job.optimizer is not None and config.optimizer == "sgd"
    used = {"lr": not given_optimizer, "momentum": config.optimizer == "momentum",
            "weight_decay": config.optimizer == "adamw", "precision": True,
            "loss_reduction": True, "lr_schedule": True, "warmup_steps": True,
            "min_lr": config.lr_schedule != "constant", "clip_grad_norm": True,
            # the schedule's length is the run's steps
            "steps": config.lr_schedule != "constant"}
    changed = changed_settings(checkpoint, dataclasses.asdict(config),
                               [name for name, counts in used.items() if counts])
    if changed:
        log.warning(f"resuming {checkpoint.path}, made with {', '.join(changed)}: the steps "
                    "after it follow this run's settings, so the result is neither run's")


DIGEST_BYTES = 1 << 20  # of rows read from each end of the training data for its digest
DIGEST_ROWS = 1024  # at most, from each end


def data_digest(job: Job) -> str | None:
    """The training data's digest, computed once; None for the reference batch (the flags
    make it). A checkpoint records it (a resume on other data is refused), and the ranks
    compare theirs at start-up."""
    if job.data_digest is None:
        job.data_digest = rows_digest(job.source) if job.source is not None else ""
    return job.data_digest or None


def rows_digest(source: RowSource) -> str:
    """A SHA-256 of the rows' count, of a row's shapes and dtypes, and of the rows at both
    ends (up to DIGEST_BYTES or DIGEST_ROWS from each), as ``source.read`` gives them: the
    same for the same rows in any file format or as tensors; other for other or reordered
    data, unless it differs only in the middle."""
    x, y = source.read(torch.arange(1))
    row_bytes = max(1, x.element_size() * x[0].numel() + y.element_size() * y[0].numel())
    count = min(source.rows, DIGEST_ROWS, max(1, DIGEST_BYTES // row_bytes))
    digest = hashlib.sha256(repr((source.rows, [(list(t.shape[1:]), str(t.dtype))
                                                for t in (x, y)])).encode())
    for indices in (torch.arange(count), torch.arange(source.rows - count, source.rows)):
        for tensor in source.read(indices):
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def job_facts(job: Job) -> dict[str, object]:
    """What the ranks must agree on beyond the flags (distnn.fit's arguments are not flags):
    the rows trained on and validated on, the loss and the optimizer. A rank that differs
    would train otherwise, or wait in a collective the others never call."""
    return {"training rows": job.plan.rows if job.plan else None,
            "training data": data_digest(job),
            "validation rows": job.val.rows if job.val else None,
            **job_objects(job)}


def job_objects(job: Job) -> dict[str, str | None]:
    """The loss and optimizer a job trains with, by class or function (distnn.fit takes the
    user's own objects, which the flags cannot name): a checkpoint records them, and a
    resume with others is refused."""
    objects = {"loss": qualified_name(job.loss_fn),
               "optimizer": qualified_name(job.optimizer) if job.optimizer else None}
    if job.scheduler is not None:
        objects["scheduler"] = qualified_name(job.scheduler)
    return objects


def qualified_name(thing: object) -> str:
    """``module:QualName`` of a function, or of an object's class (a loss module, an
    optimizer): what a checkpoint can record of a Python object."""
    named = thing if hasattr(thing, "__qualname__") else type(thing)
    return f"{named.__module__}:{named.__qualname__}"
