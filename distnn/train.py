"""Entry point: ``python -m distnn.train``, ``distnn-train``, or under torchrun/accelerate.

One step, on every rank: forward and sum loss over the rank's shard, backward, one SUM
all-reduce of the gradients (with the loss in the same buffer), then ``p -= lr * grad``.
Every rank applies the same update to the same weights, so the replicas stay identical and
the result equals the single-process reference program.

A run: agree on the config and find the newest good checkpoint -> steps, with checks
(non-finite values, replica agreement) and checkpoints every few steps -> summary and save.
It uses the same public pieces a user's own loop would (README, "Library API").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from distnn.checkpoint import Checkpoint, check_compatible, latest_checkpoint, save_checkpoint
from distnn.config import TrainConfig, UsageError, parse_config
from distnn.cudagraph import capture_step
from distnn.data import (
    config_for_data,
    inspect_data,
    load_shard,
    reference_setup,
    seeded_model,
    shard_bounds,
)
from distnn.environment import detect_launch
from distnn.faults import FaultPlan
from distnn.gradsync import FlatGradSync
from distnn.guards import RunFailed, check_replicas, disagreements, fingerprint
from distnn.logs import configure_logging
from distnn.metrics import StepLog
from distnn.preemption import StopRequests
from distnn.process_group import CollectiveFailed, DeviceStalled, DeviceWatch, gather_objects
from distnn.runtime import Runtime, setup
from distnn.weights import check_writable, save_weights

log = logging.getLogger("distnn")
# Gradient buffers up to this size are summed through rank 0 on gloo (see gradsync).
VIA_ROOT_MAX_MB = 1.0
PEER_GRACE_S = 2.0  # how long a rank that failed alone waits before exiting (see main)

STEPS_RANGE = "distnn: steps"  # the profiler range around the step loop and its last flush

# What a step returns: the global loss, and the sum of the ranks' stop votes (None alone).
Summed = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class TrainResult:
    """What a rank holds at the end: its model (identical on every rank)."""

    model: nn.Module
    wall_s: float


class Trainer:
    """One rank's part of a run. Rank 0 alone prints, writes metrics, checkpoints and saves."""

    def __init__(self, config: TrainConfig, runtime: Runtime, *,
                 environ: Mapping[str, str]) -> None:
        self.config = config  # with --data, replaced by the file's sizes at start-up
        self.rt = runtime
        self.fault = FaultPlan.from_environ(environ, restart_count=runtime.launch.restart_count,
                                            device=runtime.device)
        self.losses = torch.zeros(config.steps, device=runtime.device)  # global loss per step
        # Every read of step results waits through it: a GPU stuck behind a collective fails
        # after --timeout-s instead of hanging (also under --cuda-graph, out of NCCL's sight).
        self.watch = DeviceWatch(runtime.device, timeout_s=config.timeout_s)
        self.verified = 0  # steps checked for non-finite values so far
        self.last_checkpoint: str | None = None  # the newest written or resumed from
        self.log: StepLog | None = None
        # --compile, --cuda-graph: seconds spent compiling and capturing, outside the timings
        self.compile_s = 0.0

    def train(self) -> TrainResult:
        """load checkpoint -> steps -> checkpoint, summary, save. Raises RunFailed to stop."""
        with tf32_matmuls(self.config.precision == "tf32"):
            return self._train()

    def _train(self) -> TrainResult:
        checkpoint, start, model, x_shard, y_shard = self._start_up()
        sync = self._place_model(model, checkpoint, start)
        if self.rt.is_main:
            quiet = self.config.quiet
            self.log = StepLog(losses=self.losses, batch_size=self.config.batch_size,
                               log_every=self.config.log_every, metrics_path=self.config.metrics,
                               progress=False if quiet else None, print_steps=not quiet,
                               wait=self.watch.wait)
        stop = StopRequests(self.rt.device, self.watch)
        try:
            run_step = self._prepare_step(sync, stop,
                                          self._prepare_pieces(model, sync, x_shard, y_shard))
            with stop.installed():
                if self.log:
                    self.log.begin(start)
                # The range names the steps in a profile (python -m distnn.profile); it costs
                # nothing when no profiler runs.
                with torch.profiler.record_function(STEPS_RANGE):
                    started = time.perf_counter()
                    done = self._run_steps(model, sync, stop, start, run_step)
                    if self.log:
                        self.log.flush()  # waits for the device: the wall time is honest
                    wall_s = time.perf_counter() - started
            self._finish(model, sync, stop, start, done, wall_s)
        finally:
            if self.log:
                self.log.close()
        return TrainResult(model=model, wall_s=wall_s)

    # -- start-up -------------------------------------------------------------------------

    def _start_up(self) -> tuple[Checkpoint | None, int, nn.Module, torch.Tensor, torch.Tensor]:
        """Every rank's checks, shared in one gather: any rank's error stops all of them.

        Returns rank 0's checkpoint (None elsewhere), the step to start at, the initial model
        (on the CPU) and this rank's shard of x and y on its device.
        """
        error, checkpoint, loaded = None, None, None
        try:
            loaded = self._load()
            if self.rt.is_main:
                checkpoint = self._prepare_outputs()
        except UsageError as usage_error:
            error = str(usage_error)
        views = gather_objects({
            "error": error,
            "fingerprint": fingerprint(self.config),
            "done_losses": checkpoint.losses.tolist() if checkpoint else [],
        }, distributed=self.rt.distributed)
        errors = [view["error"] for view in views if view["error"]]
        if errors:
            raise UsageError(errors[0])
        differ = disagreements([view["fingerprint"] for view in views])
        if differ:
            raise UsageError("the ranks were started differently: " + "; ".join(differ)
                             + "; allowed: the same flags and library versions on every rank")
        done_losses = views[0]["done_losses"]
        start = len(done_losses)
        self.losses[:start] = torch.tensor(done_losses, dtype=torch.float32)
        self.verified = start
        if start:
            self.last_checkpoint = os.path.join(self.config.checkpoint_dir, f"step-{start}")
        model, x_shard, y_shard = loaded
        return checkpoint, start, model, x_shard.to(self.rt.device), y_shard.to(self.rt.device)

    def _load(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """The initial model and this rank's rows: from --data, or the reference's batch."""
        config, rt = self.config, self.rt
        if config.precision == "tf32":
            if rt.device.type != "cuda":
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
        if config.data:
            self.config = config = config_for_data(config, inspect_data(config.data))
            start, stop = shard_bounds(config.batch_size, rt.world_size, rt.rank)
            x_shard, y_shard = load_shard(config.data, start, stop)
            return seeded_model(config), x_shard, y_shard
        x, y, model = reference_setup(config)
        start, stop = shard_bounds(config.batch_size, rt.world_size, rt.rank)
        return model, x[start:stop], y[start:stop]

    def _prepare_outputs(self) -> Checkpoint | None:
        """Rank 0, before training: output paths writable, and the checkpoint to resume."""
        config = self.config
        if config.checkpoint_dir:
            try:
                os.makedirs(config.checkpoint_dir, exist_ok=True)
            except OSError as error:
                raise UsageError(f"--checkpoint-dir: cannot create {config.checkpoint_dir!r} "
                                 f"({error.strerror}); allowed: a writable directory") from None
            check_writable(os.path.join(config.checkpoint_dir, ".distnn-probe"),
                           "--checkpoint-dir")
        for flag, path in (("--metrics", config.metrics), ("--save", config.save)):
            if path:
                check_writable(path, flag)
        if not config.checkpoint_dir:
            return None
        checkpoint, notices = latest_checkpoint(config.checkpoint_dir)
        for notice in notices:
            log.warning(notice)
        if checkpoint:
            check_compatible(checkpoint, dataclasses.asdict(config))
            if checkpoint.step > config.steps:
                raise UsageError(f"--steps: got {config.steps} but {checkpoint.path} has already "
                                 f"done {checkpoint.step}; allowed: --steps >= {checkpoint.step}")
        return checkpoint

    def _place_model(self, model: nn.Module, checkpoint: Checkpoint | None,
                     start: int) -> FlatGradSync:
        """Moves the model to this rank's device with rank 0's weights (fresh or resumed)."""
        config = self.config
        if checkpoint:
            model.load_state_dict(checkpoint.weights)
            log.info(f"resuming from {checkpoint.path}: {start} of {config.steps} steps done")
            saved_world = checkpoint.state.get("world_size")
            if saved_world != self.rt.world_size:
                log.warning(f"the checkpoint was written by {saved_world} ranks and this run "
                            f"has {self.rt.world_size}: the result differs from an "
                            "uninterrupted run only by rounding")
        model.to(self.rt.device)
        # Slots after the gradients: the rank's loss and its stop vote. A group of one rank
        # (torchrun --nproc_per_node=1) uses neither: its steps sum nothing (see _step).
        gloo = self.rt.placement.backend == "gloo"
        sync = FlatGradSync(model, distributed=self.rt.communicates,
                            extra_slots=2, bucket_mb=config.bucket_mb,
                            via_root_max_mb=VIA_ROOT_MAX_MB if gloo else 0.0)
        sync.broadcast_parameters(src=0)
        return sync

    # -- the steps ------------------------------------------------------------------------

    def _prepare_pieces(self, model: nn.Module, sync: FlatGradSync, x_shard: torch.Tensor,
                        y_shard: torch.Tensor) -> list[tuple[Callable, torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches, each with the function that computes its sum loss.

        With --compile that function is ``torch.compile``d and compiled here, once per piece
        shape, so that compiling stays out of the step timings (``compile_s`` in the summary).
        """
        config = self.config
        loss_fn = nn.MSELoss(reduction="sum")

        def piece_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(model(x), y)

        compiled = torch.compile(piece_loss, dynamic=False) if config.compile else piece_loss
        pieces = []
        for index in range(config.micro_batches):
            first, stop = shard_bounds(len(x_shard), config.micro_batches, index)
            # An empty piece (more ranks or pieces than rows) adds nothing; eager handles it.
            function = compiled if stop > first else piece_loss
            pieces.append((function, x_shard[first:stop], y_shard[first:stop]))
        if config.compile:
            started = time.perf_counter()
            with sync.no_sync():  # compiles forward and backward; no collective starts
                for function, x_piece, y_piece in pieces:
                    with self._autocast():
                        warm_up = function(x_piece, y_piece)
                    warm_up.backward()
            sync.zero_grad()
            self.compile_s = time.perf_counter() - started
            log.info(f"compiled the forward and loss in {self.compile_s:.1f} s")
        return pieces

    def _step(self, sync: FlatGradSync, pieces: list[tuple[Callable, torch.Tensor, torch.Tensor]],
              vote: torch.Tensor) -> Summed:
        """One step's work on the device; returns the global loss and stop votes.

        Every piece but the last only accumulates its gradients; the last one's backward
        starts the all-reduce of the buckets. With other ranks the loss and ``vote`` travel
        in the gradients' all-reduce, and the sums returned are views into it. Alone, a
        rank's gradients and loss are the global ones already: nothing is packed or summed,
        and there are no votes (None), so one step is the tutorial loop's operators and no
        more (tests/test_fastpath.py).
        """
        sync.zero_grad()
        *early, last = pieces
        local_loss = None
        if early:
            with sync.no_sync():
                for piece in early:
                    piece_loss = self._backward(*piece).detach()
                    local_loss = piece_loss if local_loss is None else local_loss + piece_loss
        piece_loss = self._backward(*last)
        if local_loss is not None:
            piece_loss = local_loss + piece_loss.detach()
        if not sync.distributed:
            sync.sgd_step(self.config.lr)
            return piece_loss.detach(), None
        summed = sync.all_reduce(piece_loss, vote)
        sync.sgd_step(self.config.lr)
        return summed[0], summed[1]

    def _backward(self, loss_of: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one piece; returns its sum loss."""
        with self._autocast():
            loss = loss_of(x, y)
        loss.backward()
        return loss

    def _prepare_step(self, sync: FlatGradSync, stop: StopRequests,
                      pieces: list[tuple[Callable, torch.Tensor, torch.Tensor]]
                      ) -> Callable[[], Summed]:
        """The function that runs one step: eager, or a replay of the captured step.

        With --cuda-graph the step is captured here (warm-up included, with the weights put
        back after it), so capturing stays out of the step timings (in ``compile_s``). A
        replay returns the tensors the captured step returned, which it overwrites.
        """
        if not self.config.cuda_graph:
            return lambda: self._step(sync, pieces, stop.ballot())
        started = time.perf_counter()
        graph, summed = capture_step(lambda: self._step(sync, pieces, stop.ballot()),
                                     restore=[sync.flat_params])
        captured_s = time.perf_counter() - started
        self.compile_s += captured_s
        log.info(f"captured the step as a CUDA graph in {captured_s:.1f} s")

        def replay() -> Summed:
            stop.ballot()  # sets this rank's vote in the tensor the graph reads, once signalled
            graph.replay()
            return summed

        return replay

    def _run_steps(self, model: nn.Module, sync: FlatGradSync, stop: StopRequests, start: int,
                   run_step: Callable[[], Summed]) -> int:
        """Steps from ``start`` until ``--steps`` or an agreed stop; returns the steps done."""
        config, rank = self.config, self.rt.rank
        done = start
        for step in range(start, config.steps):
            if self.fault:
                self.fault.maybe_fire(step=step, rank=rank, flat_params=sync.flat_params)
            loss, votes = run_step()
            self.losses[step] = loss
            done = step + 1
            if self.log:
                self.log.record(step)
            if stop.agreed(votes):
                break
            if config.verify_every and done % config.verify_every == 0:
                self._verify(done, sync)
            if (config.checkpoint_dir and config.checkpoint_every
                    and done % config.checkpoint_every == 0 and done < config.steps):
                self._checkpoint(done, model, sync)
        return done

    def _autocast(self) -> AbstractContextManager:
        """bf16 autocast for --precision bf16 (weights, gradients and all-reduce stay fp32).

        Under --cuda-graph without autocast's weight-cast cache, as the torch.cuda.graphs
        documentation asks for capture: the casts are then kernels in the graph itself.
        """
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.rt.device.type, dtype=torch.bfloat16,
                                  cache_enabled=not self.config.cuda_graph)
        return nullcontext()

    def _verify(self, done: int, sync: FlatGradSync) -> None:
        """Stops the run (RunFailed, exit 3) on non-finite values or diverged replicas.

        A non-finite gradient makes the weights non-finite, and those the next loss, so the
        checks are: the losses since the last check, and the weights now. Every rank reaches
        the same verdict without communicating (the losses are all-reduced, so equal
        everywhere); the replica check is one small all-gather.
        """
        if done <= self.verified:
            return
        self.watch.wait()
        bad = (~self.losses[self.verified:done].isfinite()).nonzero().flatten().tolist()
        step = None
        if bad:
            step = self.verified + bad[0]
        elif not sync.flat_params.isfinite().all():
            step = done - 1  # the last update made the weights non-finite
        if step is not None:
            last = f"{self.losses[step - 1].item()!r} at step {step - 1}" if step else "none"
            kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was written")
            raise RunFailed(f"non-finite loss or gradient at step {step} (loss "
                            f"{self.losses[step].item()!r}; last finite loss {last}); stopping: "
                            f"{kept}; try a smaller --lr", 3)
        self.verified = done
        check_replicas(sync.flat_params, step=done, distributed=self.rt.communicates)

    def _checkpoint(self, done: int, model: nn.Module, sync: FlatGradSync) -> None:
        """Verifies, then rank 0 writes ``step-{done}``: a checkpoint never holds bad weights."""
        self._verify(done, sync)
        if self.rt.is_main:
            save_checkpoint(self.config.checkpoint_dir, step=done, weights=model.state_dict(),
                            losses=self.losses[:done], keep=self.config.keep_checkpoints,
                            state={"config": dataclasses.asdict(self.config),
                                   "world_size": self.rt.world_size})
            log.debug(f"wrote checkpoint step-{done}")
        self.last_checkpoint = os.path.join(self.config.checkpoint_dir, f"step-{done}")

    # -- the end --------------------------------------------------------------------------

    def _finish(self, model: nn.Module, sync: FlatGradSync, stop: StopRequests, start: int,
                done: int, wall_s: float) -> None:
        """Final check and checkpoint; then the summary and --save, or the preemption report."""
        config, rt = self.config, self.rt
        if config.checkpoint_dir and done > start:
            self._checkpoint(done, model, sync)
        else:
            self._verify(done, sync)
        if done < config.steps:
            name = signal.Signals(stop.signum or signal.SIGTERM).name
            if config.checkpoint_dir and done > start:
                saved = f"wrote {os.path.join(config.checkpoint_dir, f'step-{done}')}"
            elif config.checkpoint_dir:
                saved = "no new step to checkpoint"
            else:
                saved = "no --checkpoint-dir, so nothing was saved"
            raise RunFailed(f"preempted ({name}) after step {done} of {config.steps}: {saved}; "
                            "run the same command to continue", stop.exit_code, label="stopped")
        if self.log:
            ran = done - start
            self.log.summary({
                "world_size": rt.world_size,
                "device": rt.placement.device,
                "backend": rt.placement.backend if rt.distributed else "none",
                "steps": config.steps,
                "start_step": start,
                "wall_s": round(wall_s, 6),
                "compile_s": round(self.compile_s, 3),
                "samples_per_s": round(config.batch_size * ran / wall_s, 1) if ran else 0.0,
                "final_loss": self.log.final_loss(),
            })
        if rt.is_main and config.save:
            save_weights(model, config.save)


_REPORTED = (UsageError, RunFailed, CollectiveFailed)


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA float32 matmuls in TF32 (--precision tf32) or in full fp32 (fp32 and bf16: the
    reference's numbers), for one run; the process's own setting is put back after it.

    The setting is global to the process: set and left, one tf32 run would turn the fp32
    runs after it in the same process into TF32 (the benchmark's fp32 rows did exactly that).
    Compiling and capturing read it inside the run, so they see the run's own.
    """
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _report(error: Exception, config: TrainConfig | None) -> int:
    """Logs ``error`` as one line (naming the rank in a multi-rank job); returns the exit code.

    2 for usage and communication errors, RunFailed's own code otherwise.
    """
    message = " ".join(str(error).split())  # one line, whatever the error text held
    if isinstance(error, CollectiveFailed):
        timeout = f" (--timeout-s {config.timeout_s:g})" if config else ""
        message = (f"{message} (a peer died, is unreachable, or did not answer within the "
                   f"timeout{timeout})")
    if isinstance(error, RunFailed) and error.label == "stopped":
        log.warning(f"stopped: {message}")
    else:
        log.error(message)
    return error.exit_code if isinstance(error, RunFailed) else 2


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code.

    0: done. 2: bad input, bad launch environment, or a peer lost. 3: non-finite values or
    diverged replicas. 128+N: stopped by signal N (preempted), after a checkpoint.
    """
    launch, config = None, None
    configure_logging(rank=0, world_size=1)
    try:
        launch = detect_launch(os.environ)
        configure_logging(rank=launch.rank, world_size=launch.world_size)
        config = parse_config(argv)
        configure_logging(rank=launch.rank, world_size=launch.world_size,
                          verbosity=config.verbosity)
        with setup(device=config.device, backend=config.backend, timeout_s=config.timeout_s,
                   launch=launch) as runtime:
            try:
                Trainer(config, runtime, environ=os.environ).train()
            except _REPORTED as error:
                # Said before the group is torn down: once a peer exits, the launcher may
                # stop this rank at any moment.
                code = _report(error, config)
                if isinstance(error, DeviceStalled):
                    # The GPU is stuck behind a collective that will not finish, and tearing
                    # down the group or CUDA could wait on it for good. Files are closed.
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
                return code
    except _REPORTED as error:
        code = _report(error, config)
        if launch and launch.world_size > 1:
            # Failed before the ranks could share errors: each rank checks alone. As soon as
            # one exits, torchrun stops the others, so linger long enough for the slower
            # ranks (still importing torch, say) to say their own line first.
            time.sleep(PEER_GRACE_S)
        return code
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one
        log.error("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
