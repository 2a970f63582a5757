"""Rank 0's record of the run: loss lines on stdout and JSON Lines in a metrics file.

Losses stay on the device during the step loop and are copied to the host in batches
(about once a second and at the end), so logging never makes a step wait for the device.
What is printed is the same as printing every step as it happens.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

import torch

FLUSH_SECONDS = 1.0


class StepLog:
    """Writes the logged steps' global losses from the trainer's per-step loss tensor.

    ``record`` only counts; the losses stay on the device until a flush. Steps
    ``0, K, 2K, ...`` (K = ``log_every``) are printed as ``step loss``, the reference
    program's format; K = 0 prints none. The metrics file, when given, is opened at once
    (so an unwritable path fails before any training) and gets one ``{"step", "loss"}``
    object per logged step and a final ``{"event": "summary", ...}`` object.
    """

    def __init__(self, *, losses: torch.Tensor, log_every: int, metrics_path: str | None,
                 out: IO[str] | None = None) -> None:
        self.losses = losses  # the trainer's per-step global losses, on the device
        self.log_every = log_every
        self.out = out if out is not None else sys.stdout
        self.recorded = 0  # steps recorded so far
        self.written = 0  # steps already moved to the host and written
        self.last_flush = time.monotonic()
        self.metrics = open(metrics_path, "w", encoding="utf-8") if metrics_path else None

    def restore(self, steps: int) -> None:
        """Takes the first ``steps`` losses as recorded (steps done by a checkpointed run).

        They go to the metrics file, not to stdout, so the file matches an uninterrupted run.
        """
        if self.metrics:
            for step, loss in enumerate(self.losses[:steps].tolist()):
                if self.log_every and step % self.log_every == 0:
                    self.metrics.write(json.dumps({"step": step, "loss": loss}) + "\n")
        self.recorded = self.written = steps

    def record(self, step: int) -> None:
        """Notes that ``losses[step]`` now holds that step's loss (steps come in order)."""
        self.recorded = step + 1
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Writes every recorded step not yet written (one host synchronisation)."""
        if self.recorded > self.written:
            values = self.losses[self.written:self.recorded].tolist()
            for step, loss in enumerate(values, start=self.written):
                if self.log_every and step % self.log_every == 0:
                    self._write({"step": step, "loss": loss}, f"{step} {loss}")
            self.written = self.recorded
        self.out.flush()
        if self.metrics:
            self.metrics.flush()
        self.last_flush = time.monotonic()

    def final_loss(self) -> float:
        """The global loss of the last recorded step."""
        return self.losses[self.recorded - 1].item()

    def summary(self, fields: dict[str, Any]) -> None:
        """Writes the summary line and the metrics file's closing object."""
        self.flush()
        text = " ".join(f"{key}={_format(value)}" for key, value in fields.items())
        self._write({"event": "summary", **fields}, f"summary: {text}")
        self.flush()

    def close(self) -> None:
        """Writes what is pending and closes the metrics file; safe to call more than once."""
        try:
            self.flush()
        finally:
            if self.metrics:
                self.metrics.close()
                self.metrics = None

    def _write(self, record: dict[str, Any], line: str) -> None:
        print(line, file=self.out)
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
