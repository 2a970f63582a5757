"""The record of every step's global loss, bounded whatever the run's length.

A step's loss goes into a window of ``WINDOW`` slots on the device (no host
synchronisation): :meth:`LossRecord.put` copies it there, or a compiled step writes it
itself (:attr:`LossRecord.target`: inside a CUDA graph a step cannot be told its number,
so it keeps the next slot's index on the device); :meth:`LossRecord.pull` moves the losses
written since the last pull to the host, at most every ``WINDOW`` steps (when the window is
full) and whenever someone needs them (the log's flush about once a second, the checks, a
checkpoint). On the host the record keeps only what the run reports: the newest ``TAIL``
losses (for checkpoints and messages) and the first non-finite loss. Listeners (rank 0's
StepLog) get every pulled loss once.

It records any one number a step: under --clip-grad-norm a second LossRecord keeps each
update's gradient norm the same way (its first non-finite one stops the run first).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch

WINDOW = 4096  # device slots: 16 KB
TAIL = 1000  # losses kept on the host (and in a checkpoint)


class LossRecord:
    """The global losses of steps ``start``, ``start + 1``, ... (``tail``: the losses of the
    steps just before ``start``, from a checkpoint, newest last)."""

    def __init__(self, device: torch.device, *, start: int = 0, tail: list[float] = (),
                 wait: Callable[[], None] | None = None, window: int = WINDOW) -> None:
        self._window = torch.zeros(window, device=device)
        # one view per slot, made once (a few ms and MB of host memory per run:
        # docs/benchmarks.md#measurements-behind-the-codes-choices): copying into a view
        # costs less host time than ``window[index] = loss``, whose indexing is parsed at
        # every step, and under --cuda-graph the step's host time is its loop's Python
        self._slots = self._window.unbind()
        # the slot the next step's loss goes in, for steps that write it themselves
        self._slot = torch.full((), start % window, dtype=torch.long, device=device)
        self._wait = wait  # called before the device values are read (a bounded wait)
        self.recorded = start  # steps written
        self.pulled = start  # steps moved to the host
        self.tail: deque[float] = deque(tail, maxlen=TAIL)
        self.first_bad: tuple[int, float, float | None] | None = None  # step, loss, previous
        self.listeners: list[Callable[[int, list[float]], None]] = []

    def put(self, step: int, loss: torch.Tensor) -> None:
        """Writes ``step``'s loss (steps come in order); pulls when the window is full."""
        # a loss of one value in any shape ([1] from a loss of the user's, say) goes in as
        # that value: the slot is 0-dim
        self._slots[step % len(self._slots)].copy_(loss.reshape(()) if loss.dim() else loss)
        self.recorded = step + 1
        if self.recorded - self.pulled >= len(self._window):
            self.pull()

    @property
    def target(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For a step that writes its own loss: the window, and the 0-dim device index of
        the slot for the next step's loss. The step writes ``window[slot] = loss`` and
        advances ``slot`` by one, modulo the window's length; then :meth:`wrote`. A run
        uses this or :meth:`put`, not both (``put`` does not move ``slot``): a run's
        WholeStep is given the target only without micro-batches, where a step is one compiled
        function that writes its loss (one process, the reference update) for every step
        of the run or for none (builder)."""
        return self._window, self._slot

    def wrote(self, step: int) -> None:
        """Records that ``step`` wrote its loss itself (see :attr:`target`)."""
        self.recorded = step + 1
        if self.recorded - self.pulled >= len(self._window):
            self.pull()

    def pull(self) -> None:
        """Moves the losses written since the last pull to the host (one synchronisation),
        checks them, keeps the newest, and hands them to the listeners."""
        if self.recorded == self.pulled:
            return
        if self._wait:
            self._wait()
        size = len(self._window)
        first = self.pulled % size
        stop = first + self.recorded - self.pulled
        values = self._window[first:min(stop, size)].tolist()
        if stop > size:
            values += self._window[:stop - size].tolist()
        for offset, loss in enumerate(values):
            if self.first_bad is None and not math.isfinite(loss):
                self.first_bad = (self.pulled + offset, loss,
                                  self.tail[-1] if self.tail else None)
            self.tail.append(loss)
        for listener in self.listeners:
            listener(self.pulled, values)
        self.pulled = self.recorded

    def last(self) -> float | None:
        """The newest pulled loss (None before any)."""
        return self.tail[-1] if self.tail else None
