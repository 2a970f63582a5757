"""The run's configuration: one frozen dataclass, its validation, and the CLI made from it.

Every field is a command-line flag (``batch_size`` -> ``--batch-size``). A bad value raises
:class:`UsageError` naming the flag, the value given and what is allowed; the entry point
turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class UsageError(ValueError):
    """A mistake the user can fix: a bad flag value, a bad launch environment, an unusable path."""


def _option(default: Any, help: str, *, minimum: float | None = None,
            choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    return field(default=default, metadata={
        "help": help, "minimum": minimum, "choices": choices, "metavar": metavar})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a run. Defaults reproduce the reference program."""

    data: str | None = _option(None, "train on tensors x [N, D_in] and y [N, D_out] from this "
                               ".safetensors, .npz or .pt file instead of the random batch; "
                               "N, D_in and D_out then come from the file", metavar="PATH")
    batch_size: int = _option(64, "global batch size N, split across the ranks", minimum=1)
    d_in: int = _option(1000, "input features D_in", minimum=1)
    hidden: tuple[int, ...] = _option((100,), "hidden units per layer, comma-separated "
                                      "(512,256 is two hidden layers)", minimum=1,
                                      metavar="H[,H...]")
    d_out: int = _option(10, "output features D_out", minimum=1)
    steps: int = _option(500, "training steps", minimum=1)
    lr: float = _option(1e-4, "learning rate of the update p -= lr * grad", minimum=0.0)
    seed: int = _option(0, "torch.manual_seed before the data and weights are drawn", minimum=0)
    device: str = _option("auto", "where each rank computes", choices=("auto", "cpu", "cuda"))
    backend: str = _option("auto", "torch.distributed backend", choices=("auto", "nccl", "gloo"))
    log_every: int = _option(1, "print the loss every K steps; 0 prints only the summary",
                             minimum=0, metavar="K")
    metrics: str | None = _option(None, "write JSON Lines metrics here (rank 0)", metavar="PATH")
    save: str | None = _option(None, "write the final weights here as safetensors (rank 0)",
                               metavar="PATH")
    timeout_s: float = _option(300.0, "seconds a collective may wait for a peer (and, on a GPU, "
                               "a read of step results for the device) before failing",
                               minimum=0.0)
    checkpoint_dir: str | None = _option(
        None, "write checkpoints here (rank 0) and resume from the newest good one",
        metavar="DIR")
    checkpoint_every: int = _option(100, "checkpoint every K steps, and at the end; 0: only at "
                                    "the end", minimum=0, metavar="K")
    keep_checkpoints: int = _option(3, "how many of the newest checkpoints to keep", minimum=1)
    verify_every: int = _option(50, "every K steps, check for non-finite values and compare the "
                                "replicas' weights; 0: only at checkpoints and the end",
                                minimum=0, metavar="K")

    bucket_mb: float = _option(25.0, "gradient bucket size in MiB: larger models all-reduce "
                               "bucket by bucket, overlapped with backward", minimum=0.0)
    micro_batches: int = _option(1, "split each rank's shard into M pieces and accumulate their "
                                 "gradients before the one all-reduce (bounds activation "
                                 "memory; the result is unchanged)", minimum=1, metavar="M")
    precision: str = _option("fp32", "fp32 (the reference's numbers), tf32 (CUDA matmuls in "
                             "TF32) or bf16 (autocast; fp32 weights and all-reduce)",
                             choices=("fp32", "tf32", "bf16"))
    compile: bool = _option(False, "torch.compile the forward and loss (compiled before the "
                            "timed steps; compile_s in the summary)")
    cuda_graph: bool = _option(False, "capture the whole step (forward, loss, backward, NCCL "
                               "all-reduce, update) as one CUDA graph and replay it; needs "
                               "CUDA, and NCCL when there are several ranks")
    quiet: bool = _option(False, "print only the summary, warnings and errors (--metrics "
                          "still gets every logged step)")
    verbose: bool = _option(False, "print debugging notes too")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if self.quiet and self.verbose:
            raise UsageError("--quiet and --verbose: got both; allowed: one of them")

    @property
    def verbosity(self) -> int:
        """-1 with --quiet, 1 with --verbose, else 0."""
        return -1 if self.quiet else 1 if self.verbose else 0


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def flag_text(value: Any) -> str:
    """A value as it is written on the command line (lists comma-separated)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _allowed(f: dataclasses.Field) -> str:
    """The words of 'allowed: ...' for a field."""
    minimum, choices = f.metadata["minimum"], f.metadata["choices"]
    if choices:
        return ", ".join(choices)
    if f.type == "int":
        return f"an integer >= {int(minimum)}"
    if f.type == "tuple[int, ...]":
        return f"integers >= {int(minimum)}, comma-separated"
    if f.type == "float":
        return f"a finite number > {minimum:g}"
    if f.type == "bool":
        return "true or false"
    return "a file path"


def _check_field(f: dataclasses.Field, value: Any) -> None:
    minimum, choices = f.metadata["minimum"], f.metadata["choices"]
    bad = False
    if f.type == "bool":
        bad = not isinstance(value, bool)
    elif f.type == "int":
        bad = isinstance(value, bool) or not isinstance(value, int) or value < minimum
    elif f.type == "tuple[int, ...]":
        bad = (not isinstance(value, tuple) or not value
               or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                      for v in value))
    elif f.type == "float":
        bad = (isinstance(value, bool) or not isinstance(value, (int, float))
               or not math.isfinite(value) or value <= minimum)
    elif choices:
        bad = value not in choices
    elif value is not None:
        bad = not isinstance(value, str) or value == ""
    if bad:
        raise UsageError(f"{flag_name(f.name)}: got {value!r}; allowed: {_allowed(f)}")


def _convert(f: dataclasses.Field, text: str) -> Any:
    """Turns a flag's text into the field's type, or raises UsageError."""
    try:
        if f.type == "int":
            return int(text)
        if f.type == "float":
            return float(text)
        if f.type == "tuple[int, ...]":
            return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{flag_name(f.name)}: got {text!r}; allowed: {_allowed(f)}") from None
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit
        raise UsageError(f"{message}; see distnn-train --help")


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per TrainConfig field, every value taken as text."""
    parser = _Parser(
        prog="distnn-train",
        description="Train the two-layer net data-parallel; the result equals one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        if f.type == "bool":
            parser.add_argument(flag_name(f.name), dest=f.name, action="store_true",
                                help=f.metadata["help"])
            continue
        parser.add_argument(
            flag_name(f.name), dest=f.name, default=f.default, help=f.metadata["help"],
            metavar=f.metadata["metavar"] or (
                "{" + ",".join(f.metadata["choices"]) + "}" if f.metadata["choices"] else None))
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parses and validates the command line; raises UsageError on any bad value."""
    namespace = build_parser().parse_args(argv)
    values = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(namespace, f.name)
        values[f.name] = _convert(f, value) if isinstance(value, str) else value
    return TrainConfig(**values)
