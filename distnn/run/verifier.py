"""The run's guard: stops it on non-finite values or diverged replicas (exit 3)."""

from __future__ import annotations

from collections.abc import Callable

from distnn.distributed.sharding import GradSync
from distnn.errors import EXIT_GUARD, RunFailed
from distnn.resilience.guards import check_replicas
from distnn.run.lossrecord import LossRecord


class Verifier:
    """Checks the steps since its last check: every ``every`` steps (--verify-every), before
    each checkpoint and at the end.

    A non-finite gradient makes the weights non-finite, and those the next loss, so the
    checks are: the losses since the last check, and the weights now. Every rank reaches the
    same verdict (the losses are all-reduced, so equal everywhere; replicated weights are
    checked without communicating, sharded ones with one all-reduce of the ranks' verdicts);
    the replica check is one small all-gather. ``kept()`` says where the last good weights are,
    for the report.
    """

    def __init__(self, losses: LossRecord, *, every: int, start: int, distributed: bool,
                 kept: Callable[[], str], grad_norms: LossRecord | None = None) -> None:
        self.losses = losses
        self.grad_norms = grad_norms  # under --clip-grad-norm: each update's norm
        self.every = every
        self.verified = start  # steps checked so far
        self.distributed = distributed
        self.kept = kept

    def due(self, done: int) -> bool:
        return bool(self.every) and done % self.every == 0

    def verify(self, done: int, sync: GradSync) -> None:
        """Raises RunFailed (exit 3) if a step up to ``done`` went bad or replicas differ
        (``sync``: the weights' holder; a sharded run compares what it holds alike)."""
        if done <= self.verified:
            return
        self.losses.pull()  # waits for the device, within --timeout-s
        bad = self.losses.first_bad
        if self.grad_norms is not None:
            self.grad_norms.pull()
            norm_bad = self.grad_norms.first_bad
            # a non-finite norm at step s makes the loss of step s + 1 non-finite: say it first
            if norm_bad is not None and (bad is None or norm_bad[0] < bad[0]):
                step, norm, _ = norm_bad
                raise RunFailed(f"non-finite gradient norm at step {step} ({norm!r}); "
                                f"stopping: {self.kept()}; try a smaller --lr", EXIT_GUARD)
        if bad is None and not sync.weights_finite():
            # the last update made the weights non-finite; the loss was still finite
            raise RunFailed(f"non-finite weights after step {done - 1} (its loss "
                            f"{self.losses.last()!r} was finite); stopping: {self.kept()}; "
                            "try a smaller --lr", EXIT_GUARD)
        if bad is not None:
            step, loss, previous = bad
            last = f"{previous!r} at step {step - 1}" if previous is not None else "none"
            raise RunFailed(f"non-finite loss or gradient at step {step} (loss {loss!r}; last "
                            f"finite loss {last}); stopping: {self.kept()}; try a smaller "
                            "--lr", EXIT_GUARD)
        self.verified = done
        replicated = sync.replicated()
        if replicated is not None:
            check_replicas(replicated, step=done, distributed=self.distributed)
