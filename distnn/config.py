"""The run's configuration: one frozen dataclass, its validation, and the CLI made from it.

Every field is a command-line flag (``batch_size`` -> ``--batch-size``). A bad value raises
:class:`UsageError` naming the flag, the value given and what is allowed; the entry point
turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distnn.errors import UsageError

# what --bucket-mb and --shard default to and allow; the library's pieces use these too
DEFAULT_BUCKET_MB = 25.0
SHARD_MODES = ("none", "optimizer", "gradients", "parameters")


def _option(default: Any, help: str, *, minimum: float | None = None, inclusive: bool = False,
            maximum: float | None = None, choices: tuple[str, ...] | None = None,
            metavar: str | None = None) -> Any:
    return field(default=default, metadata={
        "help": help, "minimum": minimum, "inclusive": inclusive, "maximum": maximum,
        "choices": choices, "metavar": metavar})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a run. Defaults reproduce the reference program."""

    data: str | None = _option(None, "train on tensors x [N, ...] and y [N, ...] from this "
                               ".safetensors, .npz or .pt file (features [N, D_in] for the "
                               "MLP; token ids [N, T] and the like for --model), in "
                               "mini-batches of --batch-size rows, instead of the random batch",
                               metavar="PATH")
    batch_size: int | None = _option(None, "global batch size, split across the ranks (default: "
                                     "64, the reference's; with --data: the file's rows)",
                                     minimum=1)
    d_in: int | None = _option(None, "input features D_in (default: 1000; with --data: the "
                               "file's)", minimum=1)
    hidden: tuple[int, ...] | None = _option(None, "hidden units per layer of the MLP, "
                                             "comma-separated (default: 100; 512,256 is two "
                                             "hidden layers)", minimum=1, metavar="H[,H...]")
    d_out: int | None = _option(None, "output features D_out, or classes with --loss "
                                "cross-entropy (default: 10; with --data: the file's, or the "
                                "largest label + 1)", minimum=1)
    model: str | None = _option(None, "build the model with MODULE:FUNCTION(d_in=..., d_out=...) "
                                "instead of the MLP, where the MLP is built: after "
                                "torch.manual_seed(--seed) and, without --data, the random "
                                "batch",
                                metavar="MODULE:FUNCTION")
    model_args: str | None = _option(None, "a JSON object of keyword arguments for --model's "
                                     "function, after d_in and d_out (e.g. "
                                     "'{\"d_model\": 128}')", metavar="JSON")
    steps: int | None = _option(None, "training steps (default: 500, unless --epochs is given)",
                                minimum=1)
    epochs: int | None = _option(None, "passes over the data (instead of --steps)", minimum=1)
    no_shuffle: bool = _option(False, "take each epoch's rows in file order instead of the "
                               "seeded permutation randperm(N, seed + epoch)")
    drop_last: bool = _option(False, "drop each epoch's last batch when it is smaller than "
                              "--batch-size")
    loss: str = _option("mse", "mse: MSELoss(reduction='sum'); cross-entropy: "
                        "CrossEntropyLoss(reduction='sum') on integer class labels y [N, ...], "
                        "the model's scores [N, ..., classes] (classes last, as a language "
                        "model's next-token scores [N, T, V] against y [N, T])",
                        choices=("mse", "cross-entropy"))
    ignore_index: int = _option(-100, "class labels equal to this are not targets: "
                                "cross-entropy leaves them out, and a mean does not count them "
                                "(torch's ignore_index)", minimum=-2**63, maximum=2**63 - 1,
                                metavar="LABEL")  # a label is an int64
    optimizer: str = _option("sgd", "sgd: the reference's p -= lr * grad; momentum: "
                             "torch.optim.SGD with --momentum; adamw: torch.optim.AdamW "
                             "(fused) with --weight-decay", choices=("sgd", "momentum", "adamw"))
    lr: float = _option(1e-4, "learning rate", minimum=0.0,
                        maximum=3.4028234663852886e38)  # float32's largest: the update's dtype
    momentum: float = _option(0.9, "momentum of --optimizer momentum, in [0, 1)", minimum=0.0,
                              inclusive=True)
    weight_decay: float = _option(0.01, "weight decay of --optimizer adamw", minimum=0.0,
                                  inclusive=True)
    loss_reduction: str = _option("sum", "sum: the loss summed over the global batch (the "
                                  "reference's); mean: that sum divided by the global "
                                  "batch's count of targets (elements of y for mse, labels "
                                  "not equal to --ignore-index for cross-entropy), as "
                                  "reduction='mean' over the whole batch in one process",
                                  choices=("sum", "mean"))
    lr_schedule: str = _option("constant", "the learning rate of each update: constant, or "
                               "after --warmup-steps a linear or cosine decay from --lr to "
                               "--min-lr over the run's steps",
                               choices=("constant", "linear", "cosine"))
    warmup_steps: int = _option(0, "updates over which the rate rises linearly to --lr, "
                                "lr * (s + 1) / W for update s < W", minimum=0, metavar="W")
    min_lr: float = _option(0.0, "the rate a linear or cosine schedule decays to", minimum=0.0,
                            inclusive=True)
    clip_grad_norm: float | None = _option(None, "scale the gradients so that their global L2 "
                                           "norm is at most X, as "
                                           "torch.nn.utils.clip_grad_norm_ does",
                                           minimum=0.0, metavar="X")
    seed: int = _option(0, "torch.manual_seed before the data and weights are drawn; the "
                        "epoch order is seeded with seed + epoch", minimum=0,
                        maximum=2**62)  # seed + epoch stays a 64-bit integer
    val_data: str | None = _option(None, "validate on x and y from this file (the same formats "
                                   "and widths as --data)", metavar="PATH")
    val_every: int = _option(0, "validate every K steps; 0: at the end of each epoch; always "
                             "at the end of the run", minimum=0, metavar="K")
    device: str = _option("auto", "where each rank computes", choices=("auto", "cpu", "cuda"))
    backend: str = _option("auto", "torch.distributed backend", choices=("auto", "nccl", "gloo"))
    log_every: int = _option(1, "print the loss every K steps; 0 prints only the summary",
                             minimum=0, metavar="K")
    metrics: str | None = _option(None, "write JSON Lines metrics here (rank 0)", metavar="PATH")
    tensorboard: str | None = _option(None, "write the loss, learning rate, gradient norm, "
                                      "throughput and validation results as TensorBoard "
                                      "scalars into this folder (rank 0; needs the "
                                      "tensorboard extra)", metavar="DIR")
    save: str | None = _option(None, "write the final weights here as safetensors (rank 0)",
                               metavar="PATH")
    timeout_s: float = _option(300.0, "seconds a collective may wait for a peer (and, on a GPU, "
                               "a read of step results for the device) before failing",
                               minimum=1.0, inclusive=True, maximum=1e6)
    checkpoint_dir: str | None = _option(
        None, "write checkpoints here (rank 0) and resume from the newest good one",
        metavar="DIR")
    checkpoint_every: int = _option(100, "checkpoint every K steps, and at the end; 0: only at "
                                    "the end", minimum=0, metavar="K")
    keep_checkpoints: int = _option(3, "how many of the newest checkpoints to keep", minimum=1)
    verify_every: int = _option(50, "every K steps, check for non-finite values and compare the "
                                "replicas' weights; 0: only at checkpoints and the end",
                                minimum=0, metavar="K")

    bucket_mb: float = _option(DEFAULT_BUCKET_MB, "gradient bucket size in MiB: larger models "
                               "all-reduce bucket by bucket, overlapped with backward",
                               minimum=0.0)
    micro_batches: int = _option(1, "split each rank's shard into M pieces and accumulate their "
                                 "gradients before the one all-reduce (bounds activation "
                                 "memory; the result is unchanged)", minimum=1, metavar="M")
    shard: str = _option("none", "what each rank keeps 1/N of: none (every rank holds the whole "
                         "model, gradient and optimizer state), optimizer (its state: "
                         "ZeroRedundancyOptimizer), gradients (also the gradients: FSDP2), "
                         "parameters (also the parameters between uses: FSDP2 resharding "
                         "after forward)",
                         choices=SHARD_MODES)
    shard_blocks: str | None = _option(None, "the class names of the modules FSDP2 shards as "
                                       "units, comma-separated (default: each module in an "
                                       "nn.ModuleList of the model)", metavar="NAME[,NAME]")
    activation_checkpointing: bool = _option(False, "recompute each block's activations in "
                                             "the backward instead of keeping them "
                                             "(torch.utils.checkpoint; the blocks of "
                                             "--shard-blocks, or each module in an "
                                             "nn.ModuleList)")
    precision: str = _option("fp32", "fp32 (the reference's numbers), tf32 (CUDA matmuls in "
                             "TF32) or bf16 (autocast; fp32 weights and all-reduce)",
                             choices=("fp32", "tf32", "bf16"))
    compile: bool = _option(False, "torch.compile the whole step: forward, loss, backward and "
                            "update (compiled before the timed steps; compile_s in the "
                            "summary)")
    cuda_graph: bool = _option(False, "capture the whole step (forward, loss, backward, NCCL "
                               "all-reduce, update) as one CUDA graph and replay it; needs "
                               "CUDA, and NCCL when there are several ranks")
    quiet: bool = _option(False, "print only the summary, warnings and errors (--metrics "
                          "still gets every logged step)")
    verbose: bool = _option(False, "print debugging notes too")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        for first, second in (("quiet", "verbose"), ("steps", "epochs"), ("hidden", "model")):
            if getattr(self, first) not in (None, False) and getattr(self, second) not in (
                    None, False):
                raise UsageError(f"{flag_name(first)} and {flag_name(second)}: got both; "
                                 "allowed: one of them")
        if self.momentum >= 1:
            raise UsageError(f"--momentum: got {self.momentum!r}; allowed: a number in [0, 1)")
        if self.shard_blocks is not None and self.shard not in ("gradients", "parameters") \
                and not self.activation_checkpointing:
            raise UsageError(f"--shard-blocks: got {self.shard_blocks!r} with --shard "
                             f"{self.shard}; allowed: --shard-blocks with --shard gradients or "
                             "parameters (FSDP2's units), or --activation-checkpointing")
        if self.cuda_graph and self.shard != "none":
            raise UsageError(f"--cuda-graph: got it with --shard {self.shard}, which the "
                             "captured step does not take yet; allowed: --cuda-graph with "
                             "--shard none, or --shard without it")
        if self.model_args is not None:
            if self.model is None:
                raise UsageError("--model-args: got arguments without --model; allowed: "
                                 "--model-args with --model MODULE:FUNCTION")
            self.model_kwargs  # noqa: B018 - parses and checks it
        if self.model is not None and ":" not in self.model:
            raise UsageError(f"--model: got {self.model!r}; allowed: MODULE:FUNCTION, e.g. "
                             "mymodels:build")

    def resolved(self, **sizes: int | None) -> TrainConfig:
        """The config with its sizes filled in: what a flag gave, else ``sizes`` (from a data
        file: batch_size, d_in, d_out; steps counted from --epochs, which is then cleared),
        else the reference program's (steps only when --epochs is not given either)."""
        values = {name: getattr(self, name) for name in REFERENCE_SIZES}
        for name, value in sizes.items():
            if values[name] is None:
                values[name] = value
        epochs = None if values["steps"] is not None else self.epochs
        for name, default in REFERENCE_SIZES.items():
            left_open = ((name == "hidden" and self.model) or (name == "steps" and epochs))
            if values[name] is None and not left_open:
                values[name] = default
        return dataclasses.replace(self, **values, epochs=epochs)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """--model-args as keyword arguments ({} without it)."""
        if self.model_args is None:
            return {}
        try:
            kwargs = json.loads(self.model_args)
        except json.JSONDecodeError as error:
            raise UsageError(f"--model-args: got {self.model_args!r}, not JSON ({error.msg}); "
                             "allowed: a JSON object such as '{\"d_model\": 128}'") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--model-args: got {self.model_args!r}, a JSON "
                             f"{type(kwargs).__name__}; allowed: a JSON object of keyword "
                             "arguments")
        return kwargs

    @property
    def verbosity(self) -> int:
        """-1 with --quiet, 1 with --verbose, else 0."""
        return -1 if self.quiet else 1 if self.verbose else 0


# What the reference program uses where neither a flag nor a data file says otherwise.
REFERENCE_SIZES = {"batch_size": 64, "d_in": 1000, "hidden": (100,), "d_out": 10, "steps": 500}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def flag_text(value: Any) -> str:
    """A value as it is written on the command line (lists comma-separated), a switch as on
    or off, a flag not given as none."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _base_type(f: dataclasses.Field) -> str:
    """The field's type without ``| None`` (an optional field: None means not given)."""
    return f.type.removesuffix(" | None")


def _allowed(f: dataclasses.Field) -> str:
    """The words of 'allowed: ...' for a field."""
    minimum, choices = f.metadata["minimum"], f.metadata["choices"]
    kind = _base_type(f)
    if choices:
        return ", ".join(choices)
    most = f.metadata["maximum"]
    if kind == "int":
        return f"an integer >= {int(minimum)}" + (f" and <= {most}" if most else "")
    if kind == "tuple[int, ...]":
        return f"integers >= {int(minimum)}, comma-separated"
    if kind == "float":
        return (f"a finite number {'>=' if f.metadata['inclusive'] else '>'} {minimum:g}"
                + (f" and <= {most:g}" if most else ""))
    if f.type == "bool":
        return "true or false"
    return "a file path"


def _check_field(f: dataclasses.Field, value: Any) -> None:
    minimum, maximum, choices = (f.metadata[key] for key in ("minimum", "maximum", "choices"))
    kind = _base_type(f)
    bad = False
    if value is None and kind != f.type:
        return  # an optional field left out
    if kind == "bool":
        bad = not isinstance(value, bool)
    elif kind == "int":
        bad = isinstance(value, bool) or not isinstance(value, int) or value < minimum
    elif kind == "tuple[int, ...]":
        bad = (not isinstance(value, tuple) or not value
               or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                      for v in value))
    elif kind == "float":
        bad = (isinstance(value, bool) or not isinstance(value, (int, float))
               or not math.isfinite(value)
               or (value < minimum if f.metadata["inclusive"] else value <= minimum))
    elif choices:
        bad = value not in choices
    elif value is not None:
        bad = not isinstance(value, str) or value == ""
    if bad or (maximum is not None and value > maximum):
        raise UsageError(f"{flag_name(f.name)}: got {value!r}; allowed: {_allowed(f)}")


def _convert(f: dataclasses.Field, text: str) -> Any:
    """Turns a flag's text into the field's type, or raises UsageError."""
    kind = _base_type(f)
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "tuple[int, ...]":
            return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{flag_name(f.name)}: got {text!r}; allowed: {_allowed(f)}") from None
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit
        raise UsageError(f"{message}; see distnn-train --help")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, except where there is none to show (None, or an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per TrainConfig field, every value taken as text."""
    parser = _Parser(
        prog="distnn-train",
        description="Train data-parallel: the result equals one process, for any number of ranks.",
        formatter_class=_Help,
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
