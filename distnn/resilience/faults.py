"""Fault injection for tests and drills, set through the environment.

``DISTNN_FAULT_STEP=K`` and ``DISTNN_FAULT_RANK=R`` make rank R misbehave when it reaches
step K, on the first attempt of a job only (TORCHELASTIC_RESTART_COUNT=0), so an elastic
restart runs clean. ``DISTNN_FAULT_KIND`` says how:

- ``exit`` (default): ``os._exit(1)``, no cleanup, as a crashed or killed process;
- ``hang``: sleeps forever without entering the step's collective, as a wedged process;
- ``diverge``: nudges one weight on that rank only, as a silent corruption would;
- ``stall`` (CUDA only): queues a kernel that keeps the rank's GPU busy for an hour before
  the step, as a collective waiting for a wedged peer does, while the host goes on;
- ``write-fail``: from that step on, every write that makes a file of that rank's larger
  fails in the kernel (RLIMIT_FSIZE 0, SIGXFSZ ignored: EFBIG, "File too large"), as a full
  disk would: checkpoints, --save and --metrics;
- ``oom``: asks torch for more memory than any machine has (2**50 bytes) on the rank's
  device in that step, so torch's own out-of-memory error is raised there, as an activation
  too large for the device would be.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from distnn.errors import UsageError

KINDS = ("exit", "hang", "diverge", "stall", "write-fail", "oom")
OOM_BYTES = 2**50
STALL_CYCLES = 3600 * 2 * 10**9  # an hour of GPU clock cycles at 2 GHz


@dataclass(frozen=True)
class FaultPlan:
    """One fault: which rank, at which step, of which kind."""

    step: int
    rank: int
    kind: str = "exit"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> FaultPlan | None:
        """The planned fault, or None (none asked for)."""
        if "DISTNN_FAULT_STEP" not in environ:
            alone = [name for name in ("DISTNN_FAULT_RANK", "DISTNN_FAULT_KIND") if name in environ]
            if alone:  # a drill mistyped would pass as one that did nothing
                raise UsageError(f"environment: {alone[0]} is set but DISTNN_FAULT_STEP is not; "
                                 "allowed: DISTNN_FAULT_STEP with it (a drill), or neither")
            return None
        values = {}
        for name, key in (("DISTNN_FAULT_STEP", "step"), ("DISTNN_FAULT_RANK", "rank")):
            text = environ.get(name, "0")
            if not (text.isascii() and text.isdigit()):  # ('²' is a digit to Python)
                raise UsageError(f"environment: {name}={text!r}; allowed: an integer >= 0")
            values[key] = int(text)
        kind = environ.get("DISTNN_FAULT_KIND", "exit")
        if kind not in KINDS:
            raise UsageError(f"environment: DISTNN_FAULT_KIND={kind!r}; "
                             f"allowed: {', '.join(KINDS)}")
        return cls(kind=kind, **values)

    def for_attempt(self, *, restart_count: int, device: torch.device,
                    world_size: int) -> FaultPlan | None:
        """The fault for this attempt of the job: None after an elastic restart (the restart
        runs clean). Checked when a rank starts, on every rank alike, so a fault that cannot
        happen (on ``device``, or on a rank the job does not have) stops them all at once
        rather than passing as a drill that did nothing."""
        if restart_count > 0:
            return None
        if self.kind == "stall" and device.type != "cuda":
            raise UsageError("environment: DISTNN_FAULT_KIND=stall needs a CUDA device; "
                             f"this rank computes on {device}")
        if self.rank >= world_size:
            raise UsageError(f"environment: DISTNN_FAULT_RANK={self.rank}, but the job has "
                             f"{world_size} rank(s); allowed: 0 to {world_size - 1}")
        return self

    def check_step(self, steps: int) -> None:
        """Refuses a fault at or past the run's last step (``steps``, known once the job is):
        it would never fire. A resumed run that has passed the step is fine: its first
        attempt fired it."""
        if self.step >= steps:
            raise UsageError(f"environment: DISTNN_FAULT_STEP={self.step}, but the run has "
                             f"{steps} step(s); allowed: 0 to {steps - 1}")

    def maybe_fire(self, *, step: int, rank: int, flat_params: torch.Tensor) -> None:
        """Misbehaves if this is the planned rank and step; otherwise does nothing."""
        if step != self.step or rank != self.rank:
            return
        if self.kind == "exit":
            os._exit(1)
        if self.kind == "hang":
            # Wedged, but a launcher's SIGTERM still ends it, as it would a process stuck in C.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(3600)
        if self.kind == "stall":
            torch.cuda._sleep(STALL_CYCLES)  # one spinning kernel on the current stream
            return
        if self.kind == "write-fail":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(
                resource.RLIMIT_FSIZE)[1]))
            return
        if self.kind == "oom":
            torch.empty(OOM_BYTES, dtype=torch.uint8, device=flat_params.device)
            return
        with torch.no_grad():
            flat_params[0] += 1e-3
