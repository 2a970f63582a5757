"""Preemption: SIGTERM, SIGINT or SIGHUP stops every rank at the same step, cleanly.

A signal only sets a flag. Each step every rank adds its vote (1 if it was signalled) to a
slot of the step's all-reduce (read from a device tensor, which a captured step can read
too), so all ranks see the same total and stop after the same step, with no extra
collective. The total is looked at every ``VOTE_EVERY`` steps: on the CPU it is read then;
on a GPU it is copied to the host then and read at the next look, by which time that copy
has long finished. So the host queues steps ahead of the device instead of waiting for it,
and pays for one small copy every few steps rather than every step (a small model's
captured step takes well under 0.1 ms on a GPU:
docs/benchmarks.md#the-reference-workload-the-graphs-against-the-floors). A rank alone (one
process, or a group of one) has no votes to sum: it stops after the step its signal
arrived in, reading nothing from the device.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from distnn.distributed.process_group import DeviceWatch
from distnn.errors import EXIT_SIGNAL_BASE

log = logging.getLogger("distnn")

# SIGHUP: the terminal closed (an ssh session dropped); torchrun forwards it as it is
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
VOTE_EVERY = 4  # steps between looks at the vote total


class StopRequests:
    """Collects stop signals and turns the ranks' votes into one agreed decision."""

    def __init__(self, device: torch.device, watch: DeviceWatch) -> None:
        self.signum: int | None = None
        self._watch = watch  # waits for the vote copies, within --timeout-s
        self.on_cpu = device.type == "cpu"
        self._steps = 0
        self._host: torch.Tensor | None = None  # on a GPU: the latest copy of the total
        self._copied: torch.cuda.Event | None = None  # ... done when this event is
        self._ballot = torch.zeros(1, device=device)
        self._ballot_cast = False

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """Catches the stop signals while training; the previous handlers come back after.

        The first signal asks for the stop. Another SIGTERM or SIGHUP is the same request
        (torchrun forwards its own copy of a signal the scheduler sent every process of
        the job), so it changes nothing; a second SIGINT gets the previous handler's
        behaviour (Ctrl-C twice still interrupts).
        """
        if threading.current_thread() is not threading.main_thread():
            # Python lets only the main thread handle signals: the program's own handlers
            # stay, and a stop comes from the main thread's code (or not at all)
            log.info("training outside the main thread: stop signals are not caught")
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS
                    # a SIGHUP ignored (nohup) stays ignored: the run outlives the terminal
                    if not (sig == signal.SIGHUP
                            and signal.getsignal(sig) == signal.SIG_IGN)}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        def handler(signum: int, frame: object) -> None:
            if self.signum is None:
                self.signum = signum
            elif signum == signal.SIGINT:
                restore()
                signal.raise_signal(signum)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            restore()

    def ballot(self) -> torch.Tensor:
        """This rank's vote for the step's all-reduce: a 1-element device tensor, 1.0 once
        signalled, else 0.0. Call it before each step: a captured step (--cuda-graph) reads
        the tensor at every replay, so it must be set before the replay, not captured as a
        number."""
        if self.signum is not None and not self._ballot_cast:
            self._ballot.fill_(1.0)
            self._ballot_cast = True
        return self._ballot

    def agreed(self, votes: torch.Tensor | None) -> bool:
        """Whether the ranks agreed to stop, from the all-reduced ``votes`` (1 element).

        Every rank gets the same answer at the same step. ``votes`` None: a rank alone has
        nobody to agree with, so its own signal decides, after the step it arrived in.
        """
        if votes is None:
            return self.signum is not None
        self._steps += 1
        if self._steps % VOTE_EVERY:
            return False
        if self.on_cpu:
            return votes.item() > 0
        stop = False
        if self._copied is None:
            self._host = torch.zeros((), pin_memory=True)
            self._copied = torch.cuda.Event()
        else:
            self._watch.wait(self._copied)  # VOTE_EVERY steps ago: done by now, or nearly
            stop = self._host.item() > 0
        self._host.copy_(votes, non_blocking=True)
        self._copied.record()
        return stop

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as shells report a process ended by that signal."""
        return EXIT_SIGNAL_BASE + (self.signum or signal.SIGTERM)
