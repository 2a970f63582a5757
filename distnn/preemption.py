"""Preemption: SIGTERM or SIGINT stops every rank at the same step, cleanly.

A signal only sets a flag. Each step every rank adds its vote (1 if it was signalled) to a
slot of the step's all-reduce, so all ranks see the same total and stop after the same
step, with no extra collective. On the CPU the total is read at once; on a GPU it is read
one step late, from a copy that finished while the next step ran, so the loop never waits
for the device.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Collects stop signals and turns the ranks' votes into one agreed decision."""

    def __init__(self, device: torch.device) -> None:
        self.signum: int | None = None
        self.on_cpu = device.type == "cpu"
        self._host = torch.zeros((), pin_memory=not self.on_cpu and torch.cuda.is_available())
        self._ready: torch.cuda.Event | None = None

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """Catches SIGTERM and SIGINT while training; the previous handlers come back after.

        A second signal gets the previous handler's behaviour (Ctrl-C twice still kills).
        """
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def handler(signum: int, frame: object) -> None:
            self.signum = signum
            for sig, old in previous.items():
                signal.signal(sig, old)

        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def vote(self) -> float | None:
        """This rank's vote for the step's all-reduce: 1.0 once signalled, else None (the
        slot stays at the zero it was cleared to, so a quiet step writes nothing)."""
        return 1.0 if self.signum is not None else None

    def agreed(self, votes: torch.Tensor) -> bool:
        """Whether the ranks agreed to stop, from the all-reduced ``votes`` (a 0-dim tensor).

        Every rank gets the same answer at the same step.
        """
        if self.on_cpu:
            return votes.item() > 0
        stop = False
        if self._ready is not None:
            self._ready.synchronize()  # the previous step's copy, long done by now
            stop = self._host.item() > 0
        self._host.copy_(votes, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()
        return stop

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as shells report a process ended by that signal."""
        return 128 + (self.signum or signal.SIGTERM)
