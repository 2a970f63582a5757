"""The run's checkpoints and outputs: resume from one, write one when due, --save at the end.

Rank 0 alone reads and writes a whole checkpoint; every rank learns the outcome of a write
(one small collective), so a full disk on rank 0 stops every rank with the same line (exit
4) rather than looking like a lost peer. A sharded run (--shard gradients, parameters)
writes sharded checkpoints: every rank writes its own shards into the folder rank 0 made,
and rank 0 completes it (distnn/resilience/shards.py); a resume from one is read by every
rank. That needs a --checkpoint-dir every rank sees; where one does not, the shards are
gathered onto rank 0 into a whole checkpoint, with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import uuid
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from distnn.distributed.process_group import collective, gather_objects
from distnn.distributed.runtime import Runtime
from distnn.distributed.sharding import (
    GradSync,
    consolidated_state,
    is_zero,
    load_zero_state,
    shard_optimizer_state,
)
from distnn.errors import EXIT_OUTPUT, RunFailed, UsageError
from distnn.job.optimizers import load_state_tensors, state_by_index, state_tensors
from distnn.job.spec import Job
from distnn.resilience.checkpoint import (
    Checkpoint,
    FolderLock,
    save_checkpoint,
    temporary_folder,
)
from distnn.resilience.outputs import check_space, describe_os_error, save_weights
from distnn.resilience.shards import load_shards, shard_state, state_bytes, write_shards
from distnn.run.lossrecord import LossRecord
from distnn.run.startup import data_digest, job_objects
from distnn.run.verifier import Verifier

log = logging.getLogger("distnn")


class Checkpointer:
    """``step-N`` folders in --checkpoint-dir: what a run resumes from (``resumed``, rank
    0's; None elsewhere), and one written every --checkpoint-every steps and at the end,
    each verified first (a checkpoint never holds bad weights). Holds rank 0's lock on the
    folder (:meth:`close` releases it)."""

    def __init__(self, job: Job, runtime: Runtime, losses: LossRecord, *,
                 resumed: Checkpoint | None, start: int, lock: FolderLock | None) -> None:
        self.job, self.config, self.rt = job, job.config, runtime
        self.losses = losses
        self.resumed = resumed
        self.lock = lock
        self.verifier: Verifier | None = None  # set by the Trainer: run before each write
        self.sync: GradSync | None = None  # whole or sharded weights (use())
        self.sharded_files = False  # write sharded checkpoints (use())
        self.shared = True  # every rank sees the --checkpoint-dir rank 0 does (use())
        # the newest written or resumed from
        self.last = (os.path.join(self.config.checkpoint_dir, f"step-{start}") if start
                     else None)

    def use(self, sync: GradSync) -> None:
        """Every rank, once the model is placed: checkpoints of its weights as ``sync``
        holds them; sharded files when they are sharded and every rank sees the folder
        (a file rank 0 makes there, looked for by every rank)."""
        self.sync = sync
        config, rt = self.config, self.rt
        if not (config.checkpoint_dir and rt.communicates):
            return
        missing = unshared_rank(config.checkpoint_dir, rt)
        self.shared = missing is None
        self.sharded_files = sync.sharded and self.shared
        if sync.sharded and not self.shared and rt.is_main:
            log.warning(f"--checkpoint-dir: rank {missing} does not see {config.checkpoint_dir} "
                        "as rank 0 does, so each checkpoint gathers the shards onto rank 0 "
                        "(one tensor at a time) rather than every rank writing its own; a "
                        "folder every node shares avoids that")

    def kept(self) -> str:
        """Where the last good weights are, for a report of a failure."""
        if self.last:
            return f"the last good checkpoint is {self.last}"
        return "no checkpoint was written"

    # -- resume ---------------------------------------------------------------------------

    def restore_weights(self, model: nn.Module) -> None:
        """Rank 0: loads the resumed checkpoint's weights into ``model`` (before the model is
        placed and broadcast; that they fit was checked at start-up, check_resume)."""
        checkpoint, config = self.resumed, self.config
        if checkpoint is None:
            return
        if not checkpoint.sharded:  # (a sharded one is read once the model is placed)
            model.load_state_dict(checkpoint.weights)
        log.info(f"resuming from {checkpoint.path}: {checkpoint.step} of {config.steps} "
                 "steps done")
        saved_world = checkpoint.state.get("world_size")
        if saved_world != self.rt.world_size:
            log.warning(f"the checkpoint was written by {saved_world} ranks and this run "
                        f"has {self.rt.world_size}: the result differs from an "
                        "uninterrupted run only by rounding")

    def restore_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      start: int) -> None:
        """Every rank, once the model is placed: a sharded checkpoint's weights (each rank
        reads what it holds), and the resumed optimizer state."""
        if not start:
            return
        resumed = self.resumed
        sharded = [resumed.path if resumed and resumed.sharded else None]
        if self.rt.communicates:
            with collective("sharing the checkpoint's format"):
                dist.broadcast_object_list(sharded, src=0)
        if sharded[0] is None:
            self._restore_optimizer(optimizer)
            return
        if not self.shared:
            raise UsageError(f"--checkpoint-dir: {sharded[0]} is sharded (each rank wrote its "
                             "own part) and not every rank sees the folder rank 0 does; "
                             "allowed: resume with a --checkpoint-dir every node shares")
        with collective("reading the sharded checkpoint"):
            tensors = load_shards(sharded[0], model, optimizer,
                                  distributed=self.rt.communicates)
        if is_zero(optimizer):  # every rank keeps its part
            load_zero_state(optimizer, state_by_index(tensors))
        elif optimizer is not None:
            load_state_tensors(optimizer, tensors)

    def _restore_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Every rank: a whole checkpoint's optimizer state (rank 0 read it)."""
        if optimizer is None:
            return
        state = [self.resumed.optimizer if self.resumed else None]
        if self.rt.communicates:  # rank 0 alone read the checkpoint
            with collective("broadcasting the optimizer state"):
                dist.broadcast_object_list(state, src=0)
        if is_zero(optimizer):  # every rank keeps its part
            load_zero_state(optimizer, state_by_index(state[0]))
        elif self.sync is not None and self.sync.sharded:  # each tensor's shard
            load_state_tensors(optimizer, shard_optimizer_state(optimizer, state[0]))
        else:
            load_state_tensors(optimizer, state[0])

    def restore_scheduler(self, scheduler: torch.optim.lr_scheduler.LRScheduler | None
                          ) -> None:
        """Every rank: a user's scheduler (distnn.fit) as the resumed checkpoint left it, and
        its optimizer's rates with it (the optimizer's checkpoint holds tensors only)."""
        if scheduler is None:
            return
        state = [self.resumed.state.get("scheduler") if self.resumed else None]
        if self.rt.communicates:  # rank 0 alone read the checkpoint
            with collective("broadcasting the scheduler's state"):
                dist.broadcast_object_list(state, src=0)
        if state[0] is None:
            return
        scheduler.load_state_dict(state[0])
        for group, rate in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(),
                               strict=True):
            group["lr"] = rate

    # -- write ----------------------------------------------------------------------------

    def due(self, done: int) -> bool:
        """Every --checkpoint-every steps, but not at the end (:meth:`save` then)."""
        config = self.config
        return bool(config.checkpoint_dir and config.checkpoint_every
                    and done % config.checkpoint_every == 0 and done < config.steps)

    def save(self, done: int, sync: GradSync, *, val: list[dict],
             before_write: Callable[[], None] | None = None) -> None:
        """Verifies, then rank 0 writes ``step-{done}`` (``before_write`` first: the metrics
        file then holds every step up to the checkpoint). Every rank learns whether the
        write worked; if not, all stop (exit 4). Sharded weights and optimizer state: each
        rank writes its own shards into a folder every rank shares, or, where the ranks do
        not share it, they are gathered whole for rank 0 first (every rank takes part)."""
        if self.verifier:
            self.verifier.verify(done, sync)
        config = self.config
        path = os.path.join(config.checkpoint_dir, f"step-{done}")
        failed = f"could not write the checkpoint {path}"
        last = self.last
        if last and not os.path.isdir(last):  # (rank 0's view is the one reported)
            kept = f"the last checkpoint, {last}, is gone too"
        else:
            kept = self.kept()
        after = f"{kept}; make room (or make the folder again) and run the same command to continue"
        if self.sharded_files:
            weights = optimizer = None
            written = self._write_shards(done, failed, after)
        else:
            weights, optimizer = self._whole_weights(), self._whole_optimizer_state()
            written = None
        if before_write:
            before_write()

        def write() -> None:
            save_checkpoint(config.checkpoint_dir, step=done, weights=weights,
                            losses=torch.tensor(list(self.losses.tail)),
                            keep=config.keep_checkpoints, state=self._record(done, val),
                            optimizer=optimizer, written=written, recipe=self.job.recipe)
            log.debug(f"wrote checkpoint step-{done}")

        write_on_rank_0(self.rt, write, failed, after)
        self.last = path

    def _record(self, done: int, val: list[dict]) -> dict:
        """What state.json says of the run besides the checksums."""
        job = self.job
        state = {"config": dataclasses.asdict(self.config), "world_size": self.rt.world_size,
                 "rows": job.plan.rows if job.plan else None,
                 "data": data_digest(job), "val": val,
                 "objects": job_objects(job)}
        if self.sharded_files:
            state["format"] = "sharded"
            state["optimizer_state"] = job.optimizer is not None
        if job.scheduler is not None:
            state["scheduler"] = job.scheduler.state_dict()
        if job.plan:  # where the run is in its epoch (the step alone says it too)
            state["epoch"], state["batch_in_epoch"] = job.plan.position(done)
        return state

    def _write_shards(self, done: int, failed: str, after: str
                      ) -> tuple[str, dict[str, str]] | None:
        """Every rank writes its shards into a temporary folder rank 0 makes (after checking
        the space all of them need); returns, on rank 0, the folder and every file's
        checksum (None elsewhere). Any rank's failure stops every rank with one line
        (exit 4), and rank 0 removes the folder."""
        rt, directory = self.rt, self.config.checkpoint_dir
        state = shard_state(self.job.model, self.job.optimizer)
        needed = torch.tensor([state_bytes(state)], dtype=torch.float64, device=rt.device)
        with collective("summing the checkpoint's size"):
            dist.all_reduce(needed, op=dist.ReduceOp.SUM)
        made: list = [None, None]  # the folder, or rank 0's error
        if rt.is_main:
            try:
                check_space(directory, int(needed.item()))
                made[0] = temporary_folder(directory, done)
            except OSError as error:
                made[1] = describe_os_error(error)
        with collective("sharing the checkpoint's folder"):
            dist.broadcast_object_list(made, src=0)
        if made[1]:
            raise RunFailed(f"{failed} ({made[1]}); {after}", EXIT_OUTPUT)
        from torch.distributed.checkpoint import CheckpointException

        error, digests = None, {}
        try:
            with collective("writing the sharded checkpoint"):
                digests = write_shards(made[0], state, rank=rt.rank, distributed=True)
        except OSError as os_error:
            error = f"rank {rt.rank}: {describe_os_error(os_error)}"
        except CheckpointException as dcp_error:  # raised on every rank alike
            error = dcp_failure(dcp_error)
        views = gather_objects((error, digests), distributed=True,
                               what="gathering the checkpoint's checksums")
        errors = [view[0] for view in views if view[0]]
        if errors:
            if rt.is_main:
                shutil.rmtree(made[0], ignore_errors=True)
            raise RunFailed(f"{failed} ({errors[0]}); {after}", EXIT_OUTPUT)
        if not rt.is_main:
            return None
        return made[0], {name: digest for _, part in views for name, digest in part.items()}

    def save_weights(self) -> None:
        """--save: rank 0 writes the trained weights as one safetensors file, and in its
        metadata how to build the model again (job.recipe; none for distnn.fit's)."""
        config, recipe = self.config, self.job.recipe
        kept = (f"the trained weights are in the final checkpoint {self.last}" if self.last
                else "the trained weights are lost (no --checkpoint-dir)")
        weights = self._whole_weights()
        write_on_rank_0(self.rt, lambda: save_weights(weights, config.save, recipe),
                        f"could not write --save {config.save}", kept)

    def _whole_weights(self) -> dict[str, torch.Tensor] | None:
        """The model's state dict, whole, on rank 0 (None elsewhere when sharded)."""
        state = self.job.model.state_dict()
        if self.sync is None or not self.sync.sharded:
            return state
        return self.sync.full_state(state, main=self.rt.is_main)

    def _whole_optimizer_state(self) -> dict[str, torch.Tensor] | None:
        """The optimizer's state as tensors (state_tensors), whole, on rank 0: a
        ZeroRedundancyOptimizer's gathered there, a sharded one's tensors each gathered."""
        optimizer = self.job.optimizer
        if optimizer is None:
            return None
        if is_zero(optimizer):
            consolidated_state(optimizer)
            return state_tensors(optimizer) if self.rt.is_main else None
        if self.sync is not None and self.sync.sharded:
            local = {f"{index}.{name}": value
                     for index, values in optimizer.state_dict()["state"].items()
                     for name, value in values.items()}
            return self.sync.full_state(local, main=self.rt.is_main)
        return state_tensors(optimizer) if self.rt.is_main else None

    def close(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None


def dcp_failure(error: BaseException) -> str:
    """The first failing rank's error of a DCP write (its CheckpointException), in one
    line."""
    failures = getattr(error, "failures", None) or {}
    for rank in sorted(failures):
        failure = failures[rank]  # (the exception, its stack)
        cause = failure[0] if isinstance(failure, tuple) else failure
        text = (describe_os_error(cause) if isinstance(cause, OSError)
                else f"{type(cause).__name__}: {cause}")
        return f"rank {rank}: {text.splitlines()[0] if text else type(cause).__name__}"
    return str(error).splitlines()[0] if str(error) else "the sharded write failed"


def unshared_rank(directory: str, runtime: Runtime) -> int | None:
    """All ranks: the first rank that does not see ``directory`` as rank 0 does (not a
    folder every node shares), else None. Rank 0 leaves a file of a fresh name there for
    the others to look for, then removes it. (Where rank 0 cannot make it, a full disk say,
    None: the first checkpoint's write then says what is wrong, on every rank.)"""
    name: list[str | None] = [f".distnn-shared-{uuid.uuid4().hex}"]
    probe = os.path.join(directory, name[0]) if runtime.is_main else None
    if probe:
        try:
            with open(probe, "w", encoding="utf-8"):
                pass
        except OSError:
            name[0] = probe = None
    what = "checking that the ranks share --checkpoint-dir"
    try:
        with collective(what):
            dist.broadcast_object_list(name, src=0)
        seen = name[0] is None or os.path.exists(os.path.join(directory, name[0]))
        views = gather_objects(seen, distributed=True, what=what)
    finally:
        if probe:
            with contextlib.suppress(OSError):
                os.remove(probe)
    return next((rank for rank, seen in enumerate(views) if not seen), None)


def write_on_rank_0(runtime: Runtime, write: Callable[[], None], failed: str,
                    after: str) -> None:
    """Rank 0 runs ``write``; every rank learns its outcome (one small collective) and, if
    it failed, stops with the same line: ``failed`` (reason) ``after``, exit 4."""
    error = None
    if runtime.is_main:
        try:
            write()
        except OSError as os_error:
            error = f"{failed} ({describe_os_error(os_error)}); {after}"
    if runtime.communicates:
        outcome = [error]
        with collective("sharing whether rank 0's write worked"):
            dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error:
        raise RunFailed(error, EXIT_OUTPUT)
