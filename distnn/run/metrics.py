"""Rank 0's record of the run: loss lines on stdout, metrics records (to the sinks of
distnn.run.sinks: the --metrics file, ...), a progress bar.

Losses stay on the device during the step loop and are copied to the host in batches
(about once a second and at the end), so logging never makes a step wait for the device.
What is printed is the same as printing every step as it happens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from tqdm import tqdm

from distnn.run.lossrecord import LossRecord
from distnn.run.sinks import JsonLinesFile, MetricsSink

log = logging.getLogger("distnn")
FLUSH_SECONDS = 1.0


DEFAULT_BAR_SIZE = (80, 24)  # (columns, lines) for a terminal that reports no size


def bar_size(reported: tuple[int, int] | None, environ: Mapping[str, str]) -> tuple[int, int]:
    """The progress bar's (columns, lines): COLUMNS and LINES when set (as in
    shutil.get_terminal_size), else the terminal's own size, else ``DEFAULT_BAR_SIZE``.

    ``reported`` is os.get_terminal_size() of the bar's stream (None when it has none). A
    pseudo-terminal may report 0 x 0 (``script -c CMD /dev/null`` run outside a terminal, some
    CI runners): left to itself tqdm then takes -1 lines, draws nothing, and the bar never
    shows; each zero gets the default instead.
    """
    sizes = []
    for name, size, default in zip(("COLUMNS", "LINES"), reported or (0, 0), DEFAULT_BAR_SIZE,
                                   strict=True):
        try:
            size = int(environ.get(name, "")) or size
        except ValueError:
            pass
        sizes.append(size if size > 0 else default)
    return sizes[0], sizes[1]


def _reported_size(out: IO[str]) -> tuple[int, int] | None:
    try:
        return tuple(os.get_terminal_size(out.fileno()))  # type: ignore[return-value]
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        return None


class StepLog:
    """Writes the logged steps' global losses as the LossRecord hands them over.

    The losses stay on the device until a flush pulls them (:meth:`maybe_flush` after each
    step: about once a second; and whenever the record is pulled for another reason). Steps
    ``0, K, 2K, ...`` (K = ``log_every``) are printed as ``step loss``, the reference
    program's format; K = 0 prints none. Each metrics sink (the --metrics file when
    ``metrics_path`` is given, and ``sinks``) gets one record per logged step (``step``,
    ``loss``, and the ``ms_per_step`` and ``samples_per_s`` measured over the flush window
    holding that step), events such as ``{"event": "val", "step": S, ...}`` (after step
    S - 1's line: S steps were done), then a final ``{"event": "summary", ...}`` object.
    On an interactive terminal a progress bar (tqdm) shows the step, the loss and steps/s,
    with the loss lines printed above it.
    """

    def __init__(self, *, record: LossRecord, steps: int, log_every: int,
                 rows_between: Callable[[int, int], int],
                 metrics_path: str | None, out: IO[str] | None = None,
                 progress: bool | None = None, print_steps: bool = True,
                 sinks: list[MetricsSink] = (), rate: Callable[[int], float] | None = None,
                 grad_norms: LossRecord | None = None) -> None:
        self.loss_record = record
        record.listeners.append(self._take)
        # a logged step's record also holds its learning rate (``rate(step)``, under a
        # schedule) and its gradient norm (from ``grad_norms``, under clipping)
        self.rate = rate
        self.grad_norms = grad_norms
        self._norms: dict[int, float] = {}  # pulled norms of steps not yet written
        if grad_norms is not None:
            grad_norms.listeners.append(
                lambda first, values: self._norms.update(enumerate(values, start=first)))
        self.log_every = log_every
        self.print_steps = print_steps  # False (--quiet): logged steps go to the metrics only
        self.rows_between = rows_between  # (start, stop) -> rows steps start..stop-1 train on
        # stdout closed at start (``>&-``): Python has no sys.stdout, so nothing is printed
        if out is None:
            out = sys.stdout if sys.stdout is not None else open(os.devnull, "w")  # noqa: SIM115
        self.out = out
        self.written = record.pulled  # steps already written
        self.last_flush = time.perf_counter()
        self.sinks: list[MetricsSink] = list(sinks)
        if metrics_path:
            self.sinks.insert(0, JsonLinesFile(metrics_path, written=lambda: self.written))
        if progress is None:
            progress = self.out.isatty()
        self.bar = None
        if progress:
            columns, lines = bar_size(_reported_size(self.out), os.environ)
            self.bar = tqdm(total=steps, unit="step", file=self.out, ncols=columns, nrows=lines)

    def begin(self, steps: int = 0) -> None:
        """Call just before the first step; ``steps`` were already done (by a checkpointed
        run): each sink goes on where that run left off. The timing of the first flush
        window starts now."""
        for sink in self.sinks:
            sink.begin(steps)
        self.written = steps
        if self.bar:
            self.bar.update(steps)
        self.last_flush = time.perf_counter()

    def maybe_flush(self) -> None:
        """Called after every step: flushes once ``FLUSH_SECONDS`` have passed since the
        last flush."""
        if time.perf_counter() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Writes every recorded step not yet written (pulls the record: one host sync)."""
        if self.grad_norms is not None:
            self.grad_norms.pull()
        self.loss_record.pull()
        self._to_out(self.out.flush)
        for sink in self.sinks:
            sink.flush()
        self.last_flush = time.perf_counter()

    def _take(self, first: int, values: list[float]) -> None:
        """The record's listener: steps ``first``, ``first + 1``, ... have ``values``."""
        now = time.perf_counter()
        seconds = max(now - self.last_flush, 1e-9)
        rows = self.rows_between(first, first + len(values))  # an epoch's last batch may be smaller
        timing = {"ms_per_step": round(seconds / len(values) * 1e3, 6),
                  "samples_per_s": round(rows / seconds, 1)}
        if self.grad_norms is not None and self.grad_norms.recorded > self.grad_norms.pulled:
            self.grad_norms.pull()  # the losses were pulled on their own (a check, say)
        for step, loss in enumerate(values, start=first):
            norm = self._norms.pop(step, None)
            rate = self.rate(step) if self.rate is not None else None
            if self.log_every and step % self.log_every == 0:
                record = {"step": step, "loss": loss, **timing}
                if rate is not None:
                    record["lr"] = rate
                if norm is not None:
                    record["grad_norm"] = norm
                self._write(record, f"{step} {loss}" if self.print_steps else None)
        if self.bar:
            self.bar.set_postfix(loss=f"{values[-1]:.6g}", refresh=False)
            self.bar.update(len(values))
        self.written = first + len(values)
        self.last_flush = now

    def event(self, record: dict[str, Any]) -> None:
        """Writes an event after the steps recorded so far: a line (``val 100 loss=...``)
        and the record itself in the metrics file."""
        self.flush()
        fields = " ".join(f"{key}={_format(value)}" for key, value in record.items()
                          if key not in ("event", "step"))
        self._write(record, f"{record['event']} {record['step']} {fields}"
                    if self.print_steps else None)
        self.flush()

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
            for sink in self.sinks:
                sink.close()

    def _write(self, record: dict[str, Any], line: str | None) -> None:
        if line is not None:
            if self.bar:
                self._to_out(lambda: self.bar.write(line, file=self.out))
            else:
                self._to_out(lambda: print(line, file=self.out))
        for sink in self.sinks:
            sink.write(record)

    def _to_out(self, write: Callable[[], None]) -> None:
        """Runs ``write`` (of stdout). A failure (a closed pipe, a full disk) warns once and
        ends the printed lines, not the run, as for the metrics: the weights, checkpoints
        and the metrics file do not depend on them."""
        try:
            write()
        except (OSError, ValueError) as error:
            if isinstance(error, ValueError) and not getattr(self.out, "closed", False):
                raise  # not the stream's failure (a closed stream raises ValueError)
            reason = getattr(error, "strerror", None) or error
            log.warning(f"could not write to stdout ({reason}); training goes on without "
                        f"printing its loss lines, which end before step {self.written}")
            self.bar = None
            if self.out is sys.stdout:  # what Python would flush into it at exit goes nowhere
                with contextlib.suppress(OSError, ValueError):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stdout.fileno())
                    os.close(devnull)
            self.out = open(os.devnull, "w")  # noqa: SIM115 - for the run

def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
