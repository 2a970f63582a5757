"""Where rank 0's metrics records go: a sink takes each record (a JSON-able dict: a logged
step's ``{"step", "loss", "ms_per_step", "samples_per_s"}``, with ``"lr"`` under a
schedule and ``"grad_norm"`` under clipping, an event such as
``{"event": "val", "step": S, ...}``, the closing ``{"event": "summary", ...}``).

The JSON Lines file of --metrics is one; another (TensorBoard, say) is one more class with
the same four methods, handed to the StepLog. A sink that cannot write warns once and
stops, not the run: the weights are the run's result, the metrics a record of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import IO, Any, Protocol

from distnn.resilience.outputs import write_file

log = logging.getLogger("distnn")


class MetricsSink(Protocol):
    def begin(self, steps: int) -> None:
        """Before the first step; ``steps`` were done already (by a checkpointed run)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None:
        """Safe to call more than once."""


class JsonLinesFile:
    """--metrics: one JSON object a line. A resumed run goes on where the checkpointed run
    left off: its records of the steps done (and of validations up to them) are kept, later
    ones (a run cut off after its checkpoint) dropped, so the file matches an uninterrupted
    run's. ``written()`` says up to which step the records went, for a failure's warning."""

    def __init__(self, path: str, *, written: Callable[[], int]) -> None:
        self.path = path
        self.written = written
        self.file: IO[str] | None = None

    def begin(self, steps: int) -> None:
        try:
            # (a pipe or a device holds no earlier records: reading it could wait for good)
            if steps and os.path.isfile(self.path):
                # whole or not at all: a run killed meanwhile leaves the earlier file
                kept = _records_before(self.path, steps)
                write_file(self.path, "".join(kept).encode("utf-8"))
                self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - the run's
            else:
                self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - the run's
        except OSError as error:
            self._failed(error)

    def write(self, record: dict[str, Any]) -> None:
        self._do(lambda file: file.write(json.dumps(record) + "\n"))

    def flush(self) -> None:
        self._do(lambda file: file.flush())

    def close(self) -> None:
        if self.file:
            self._do(lambda file: file.close())
            self.file = None

    def _do(self, action: Callable[[IO[str]], object]) -> None:
        if not self.file:
            return
        try:
            action(self.file)
        except OSError as error:  # no space, the folder gone, an I/O error
            self._failed(error)

    def _failed(self, error: OSError) -> None:
        log.warning(f"could not write --metrics {self.path} ({error.strerror or error}); "
                    "training goes on without metrics, which end before step "
                    f"{self.written()}")
        file, self.file = self.file, None
        if file is not None:
            with contextlib.suppress(OSError):  # the same failure, once more
                file.close()


def _records_before(path: str, steps: int) -> list[str]:
    """The lines of an earlier metrics file at ``path`` for the first ``steps`` steps: step
    records before ``steps``, events at ``steps`` or before; none if there is no file."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.readlines()
    except FileNotFoundError:
        return []
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short where the earlier run was stopped
        event, step = record.get("event"), record.get("step")
        if step is not None and (step < steps if event is None else step <= steps):
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class TensorBoardSink:
    """--tensorboard DIR: the records as TensorBoard scalars (torch.utils.tensorboard, which
    needs the ``tensorboard`` extra): per logged step ``train/loss``, ``train/lr``,
    ``train/grad_norm`` and ``train/samples_per_s``; per validation ``val/<name>`` for each
    number. TensorBoard's step is the count of steps done: step s's record (0-based) is drawn
    at s + 1, a validation after S steps at S. A run that starts after S steps (resumed, or
    0 for a fresh one) purges what earlier runs in the folder wrote past S, so the curves go
    on without repeated steps. A write that fails warns once and ends the scalars, not the
    run."""

    TRAIN = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
             "samples_per_s": "train/samples_per_s"}

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.writer = None
        self._excepthook = None

    def begin(self, steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # the optional extra

        # The writer's own thread writes the file: a failed write raises there (its
        # traceback printed by threading), then again here at the next call, which warns.
        self._excepthook = threading.excepthook
        threading.excepthook = self._quiet_writer_errors
        self._do(lambda: setattr(self, "writer", SummaryWriter(self.directory,
                                                               purge_step=steps + 1)))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        event, step = record.get("event"), record.get("step")
        if event is None:
            scalars = {tag: record[key] for key, tag in self.TRAIN.items() if key in record}
            step += 1
        elif event == "val":
            scalars = {f"val/{key}": value for key, value in record.items()
                       if key not in ("event", "step") and isinstance(value, (int, float))}
        else:
            return
        self._do(lambda: [self.writer.add_scalar(tag, value, step)
                          for tag, value in scalars.items()])

    def flush(self) -> None:
        if self.writer is not None:
            self._do(self.writer.flush)

    def close(self) -> None:
        if self.writer is not None:
            self._do(self.writer.close)
            self.writer = None
        if self._excepthook is not None:
            threading.excepthook, self._excepthook = self._excepthook, None

    def _quiet_writer_errors(self, args: threading.ExceptHookArgs) -> None:
        if not (issubclass(args.exc_type, OSError)
                and type(args.thread).__module__.startswith("tensorboard")):
            self._excepthook(args)

    def _do(self, action: Callable[[], object]) -> None:
        try:
            action()
        except OSError as error:  # no space, the folder gone (the writer's thread raises it)
            log.warning(f"could not write --tensorboard {self.directory} "
                        f"({error.strerror or error}); training goes on without its scalars")
            writer, self.writer = self.writer, None
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.close()
