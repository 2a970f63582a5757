"""Rank 0's record of the run: loss lines on stdout, JSON Lines metrics, a progress bar.

Losses stay on the device during the step loop and are copied to the host in batches
(about once a second and at the end), so logging never makes a step wait for the device.
What is printed is the same as printing every step as it happens.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import torch
from tqdm import tqdm

log = logging.getLogger("distnn")
FLUSH_SECONDS = 1.0


class StepLog:
    """Writes the logged steps' global losses from the trainer's per-step loss tensor.

    ``record`` only counts; the losses stay on the device until a flush. Steps
    ``0, K, 2K, ...`` (K = ``log_every``) are printed as ``step loss``, the reference
    program's format; K = 0 prints none. The metrics file, when given, is opened at once and
    gets one object per logged step (``step``, ``loss``, and the ``ms_per_step`` and
    ``samples_per_s`` measured over the flush window holding that step), events such as
    ``{"event": "val", "step": S, ...}`` (after step S - 1's line: S steps were done), then a
    final ``{"event": "summary", ...}`` object. On an interactive terminal a progress bar (tqdm)
    shows the step, the loss and steps/s, with the loss lines printed above it.
    """

    def __init__(self, *, losses: torch.Tensor, log_every: int, batch_size: int,
                 metrics_path: str | None, out: IO[str] | None = None,
                 progress: bool | None = None, print_steps: bool = True,
                 wait: Callable[[], None] | None = None) -> None:
        self.losses = losses  # the trainer's per-step global losses, on the device
        self.wait = wait  # called before the losses are read: a bounded wait for the device
        self.log_every = log_every
        self.print_steps = print_steps  # False (--quiet): logged steps go to the metrics only
        self.batch_size = batch_size
        self.out = out if out is not None else sys.stdout
        self.recorded = 0  # steps recorded so far
        self.written = 0  # steps already moved to the host and written
        self.last_flush = time.perf_counter()
        self.metrics_path = metrics_path
        self.metrics = open(metrics_path, "w", encoding="utf-8") if metrics_path else None
        if progress is None:
            progress = self.out.isatty()
        # A terminal that reports no size (some ptys) gets 80 columns, not an empty bar.
        self.bar = (tqdm(total=losses.numel(), unit="step", file=self.out,
                         ncols=shutil.get_terminal_size().columns) if progress else None)

    def begin(self, steps: int = 0, events: list[dict[str, Any]] = ()) -> None:
        """Call just before the first step; ``steps`` were already done (by a checkpointed run).

        Their losses, and the ``events`` of those steps (validation results: dicts with a
        ``step``), go to the metrics file, not to stdout, so the file matches an
        uninterrupted run. The timing of the first flush window starts now.
        """
        if self.metrics:
            pending = sorted(events, key=lambda event: event["step"])
            for step, loss in enumerate(self.losses[:steps].tolist()):
                if self.log_every and step % self.log_every == 0:
                    self._to_metrics(json.dumps({"step": step, "loss": loss}) + "\n")
                while pending and pending[0]["step"] == step + 1:
                    self._to_metrics(json.dumps({"event": "val", **pending.pop(0)}) + "\n")
        self.recorded = self.written = steps
        if self.bar:
            self.bar.update(steps)
        self.last_flush = time.perf_counter()

    def record(self, step: int) -> None:
        """Notes that ``losses[step]`` now holds that step's loss (steps come in order)."""
        self.recorded = step + 1
        if time.perf_counter() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Writes every recorded step not yet written (one host synchronisation)."""
        if self.recorded > self.written:
            if self.wait:
                self.wait()
            values = self.losses[self.written:self.recorded].tolist()  # waits for the device
            now = time.perf_counter()
            seconds_per_step = (now - self.last_flush) / len(values)
            timing = {"ms_per_step": round(seconds_per_step * 1e3, 6),
                      "samples_per_s": round(self.batch_size / seconds_per_step, 1)}
            for step, loss in enumerate(values, start=self.written):
                if self.log_every and step % self.log_every == 0:
                    self._write({"step": step, "loss": loss, **timing},
                                f"{step} {loss}" if self.print_steps else None)
            if self.bar:
                self.bar.set_postfix(loss=f"{values[-1]:.6g}", refresh=False)
                self.bar.update(len(values))
            self.written = self.recorded
        self.out.flush()
        self._to_metrics(None)
        self.last_flush = time.perf_counter()

    def event(self, record: dict[str, Any]) -> None:
        """Writes an event after the steps recorded so far: a line (``val 100 loss=...``)
        and the record itself in the metrics file."""
        self.flush()
        fields = " ".join(f"{key}={_format(value)}" for key, value in record.items()
                          if key not in ("event", "step"))
        self._write(record, f"{record['event']} {record['step']} {fields}"
                    if self.print_steps else None)
        self.flush()

    def final_loss(self) -> float:
        """The global loss of the last recorded step."""
        return self.losses[self.recorded - 1].item()

    def summary(self, fields: dict[str, Any]) -> None:
        """Writes the summary line and the metrics file's closing object."""
        self.flush()
        if self.bar:
            self.bar.close()
            self.bar = None
        text = " ".join(f"{key}={_format(value)}" for key, value in fields.items())
        self._write({"event": "summary", **fields}, f"summary: {text}")
        self.flush()

    def close(self) -> None:
        """Writes what is pending and closes the metrics file; safe to call more than once."""
        try:
            self.flush()
        finally:
            if self.bar:
                self.bar.close()
                self.bar = None
            if self.metrics:
                try:
                    self.metrics.close()
                except OSError as error:
                    self._metrics_failed(error)
                self.metrics = None

    def _write(self, record: dict[str, Any], line: str | None) -> None:
        if line is not None:
            if self.bar:
                self.bar.write(line, file=self.out)
            else:
                print(line, file=self.out)
        self._to_metrics(json.dumps(record) + "\n")

    def _to_metrics(self, text: str | None) -> None:
        """Writes ``text`` to the metrics file (None: flushes it). A write that fails (no
        space, the folder gone, an I/O error) warns once and ends the metrics, not the run:
        the weights are the run's result, the metrics a record of it."""
        if not self.metrics:
            return
        try:
            if text is None:
                self.metrics.flush()
            else:
                self.metrics.write(text)
        except OSError as error:
            self._metrics_failed(error)

    def _metrics_failed(self, error: OSError) -> None:
        log.warning(f"could not write --metrics {self.metrics_path} "
                    f"({error.strerror or error}); training goes on without metrics, which "
                    f"end before step {self.written}")
        metrics, self.metrics = self.metrics, None
        try:
            metrics.close()
        except OSError:
            pass  # the same failure, once more


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
