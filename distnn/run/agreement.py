"""The start-up agreement: every rank's checks, shared in one gather, so that any rank's
error stops all of them with its line, and ranks started differently are refused. (The
model's output is looked at by rank 0 alone: the ranks' models are compared here.)"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distnn.config import TrainConfig
from distnn.distributed.process_group import gather_objects
from distnn.distributed.runtime import Runtime
from distnn.errors import EXIT_USAGE, RunFailed, UsageError
from distnn.job.checks import warn_random_layers
from distnn.job.spec import Job
from distnn.resilience.checkpoint import Checkpoint, FolderLock
from distnn.resilience.guards import disagreements, fingerprint, model_signature
from distnn.resilience.memory import out_of_memory
from distnn.run.startup import (
    check_job,
    check_placement,
    claim_checkpoint_dir,
    job_facts,
    prepare_outputs,
)

JobBuilder = Callable[[TrainConfig, Runtime], Job]


@dataclass
class Agreed:
    """What the ranks agreed to start from."""

    job: Job  # its config is the run's, resolved (the job's sizes filled in)
    start: int  # the step to start at (0, or the resumed checkpoint's)
    tail: list[float]  # the losses of the steps before ``start``, from the checkpoint
    val: list[dict]  # the validations before ``start``, from the checkpoint
    checkpoint: Checkpoint | None  # rank 0's checkpoint to resume from (None elsewhere)
    lock: FolderLock | None  # rank 0's hold on --checkpoint-dir (the caller releases it)


def agree_at_start(config: TrainConfig, runtime: Runtime, build_job: JobBuilder) -> Agreed:
    """Builds the job and runs every start-up check on every rank, then shares the verdicts,
    the config, the model's signature and the checkpoint to resume in one gather.

    Raises UsageError (exit 2) or RunFailed (its code) on every rank alike if any rank
    failed, if the ranks were started with other flags or library versions, or built other
    models.
    """
    error, code, checkpoint, lock, model, facts, job = None, EXIT_USAGE, None, None, None, {}, None
    try:
        check_placement(config, runtime)
        job = build_job(config, runtime)
        config = job.config
        check_job(job, ranks=runtime.world_size if runtime.communicates else 1,
                  main=runtime.is_main)
        if runtime.is_main:
            warn_random_layers(job)
        model = model_signature(job.model)  # compared across the ranks below
        facts = job_facts(job)  # so are these
        if runtime.is_main:
            lock = claim_checkpoint_dir(config)
            checkpoint = prepare_outputs(job)
    except UsageError as usage_error:
        error = str(usage_error)
    except RunFailed as failed:  # something does not fit in memory
        error, code = str(failed), failed.exit_code
    except RuntimeError as runtime_error:
        failed = out_of_memory(runtime_error, runtime.device)
        if failed is None:
            _release(lock)
            raise
        error, code = str(failed), failed.exit_code
    except BaseException:  # (a long-lived process may run again on the folder)
        _release(lock)
        raise
    try:
        views = gather_objects({
            "error": error,
            "code": code,
            "fingerprint": {**fingerprint(config), **facts},
            "model": model,
            "scored": job.scored if job is not None else False,
            "start": checkpoint.step if checkpoint else 0,
            "tail": checkpoint.losses.tolist() if checkpoint else [],
            "val": list(checkpoint.state.get("val", [])) if checkpoint else [],
        }, distributed=runtime.distributed)
        _refuse_disagreement(views)
    except BaseException:
        _release(lock)
        raise
    job.scored = views[0]["scored"]  # rank 0 alone looked at the model's output
    return Agreed(job=job, start=views[0]["start"], tail=views[0]["tail"], val=views[0]["val"],
                  checkpoint=checkpoint, lock=lock)


def _refuse_disagreement(views: list[dict]) -> None:
    failures = [view for view in views if view["error"]]
    if failures:
        if failures[0]["code"] == EXIT_USAGE:
            raise UsageError(failures[0]["error"])
        raise RunFailed(failures[0]["error"], failures[0]["code"])
    differ = disagreements([view["fingerprint"] for view in views])
    if differ:
        raise UsageError("the ranks were started differently: " + "; ".join(differ)
                         + "; allowed: the same flags (or distnn.fit arguments) and "
                         "library versions on every rank")
    models = {view["model"] for view in views}
    if len(models) > 1:
        said = ", ".join(f"rank {rank} {view['model']}" for rank, view in enumerate(views))
        raise UsageError(f"the ranks built different models: {said}; allowed: the same "
                         "model on every rank (built the same way, whatever the rank)")


def _release(lock: FolderLock | None) -> None:
    if lock:
        lock.release()
