"""Sharded checkpoints: under --shard gradients or parameters every rank writes its own
shards of the weights and the optimizer state, with torch.distributed.checkpoint (DCP),
into the checkpoint's folder; no rank ever holds the whole model.

A sharded ``step-N/`` holds, beside ``losses.safetensors`` and ``state.json`` as a whole
checkpoint does (checkpoint.py)::

    shards/.metadata      DCP's index: every tensor's global shape and where its pieces are
    shards/__R_0.distcp   rank R's pieces

``state.json`` says ``"format": "sharded"`` and lists the SHA-256 of every file above, each
rank's part hashed by the rank that wrote it. The folder is written under a temporary name
and renamed by rank 0 once every rank's part and the checksums are in it: a ``step-N``
folder is complete, as a whole checkpoint is.

The tensors are named ``model.<state_dict key>`` and ``optimizer.<parameter index>.<state
name>`` (the optimizer's parameters in order, as job.optimizers.state_tensors names them).
A resume reads them into what this run holds, whatever it is: a DTensor placed as this run's
parameter (DCP reads only the rows this rank keeps: another world size or mode reshards at
load time), or a whole tensor (--shard none or optimizer, or one process). Every rank reads
the folder, so the ranks must share it (run/checkpointer.py checks at start-up).

DCP's index (``.metadata``) is a pickle, which torch reads with ``pickle.load``: distnn
checks its SHA-256 against state.json first, but a checkpoint folder is still to be trusted
as code is. The tensors themselves are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from distnn.distributed.sharding import is_dtensor
from distnn.errors import UsageError
from distnn.resilience.checkpoint import sha256_of

SHARDS = "shards"
MODEL, OPTIMIZER = "model.", "optimizer."


def shard_state(model: nn.Module, optimizer: torch.optim.Optimizer | None
                ) -> dict[str, torch.Tensor]:
    """What a sharded checkpoint holds, by name: this rank's DTensors (and the tensors every
    rank holds alike, which DCP writes once)."""
    state = {MODEL + name: value for name, value in model.state_dict().items()}
    if optimizer is not None:
        for index, values in optimizer.state_dict()["state"].items():
            for name, value in values.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {index}.{name} is a "
                                    f"{type(value).__name__}, not a tensor; it cannot be "
                                    "checkpointed")
                state[f"{OPTIMIZER}{index}.{name}"] = value
    return state


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """The bytes of this rank's part of ``state`` (a DTensor's local shard)."""
    total = 0
    for value in state.values():
        local = value.to_local() if is_dtensor(value) else value
        total += local.numel() * local.element_size()
    return total


def write_shards(folder: str, state: dict[str, torch.Tensor], *, rank: int,
                 distributed: bool) -> dict[str, str]:
    """Every rank: writes its part of ``state`` into ``folder/shards`` (each file flushed to
    disk) and returns the SHA-256 of the files it wrote, by their path in the checkpoint
    (rank 0's include DCP's index). Raises OSError or DCP's CheckpointException (on every
    rank alike when any rank's write failed)."""
    import torch.distributed.checkpoint as dcp  # here: 50 ms that unsharded runs need not pay

    shards = os.path.join(folder, SHARDS)
    os.makedirs(shards, exist_ok=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(shards, sync_files=True),
             no_dist=not distributed)
    own = [name for name in os.listdir(shards)
           if name.startswith(f"__{rank}_") or (rank == 0 and name == ".metadata")]
    return {f"{SHARDS}/{name}": sha256_of(os.path.join(shards, name)) for name in sorted(own)}


def load_shards(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                distributed: bool) -> dict[str, torch.Tensor]:
    """Every rank: reads a sharded checkpoint's weights into ``model`` (in place, whatever
    its placement) and returns its optimizer state as job.optimizers.state_tensors names it,
    each tensor placed as its parameter is (a DTensor for a sharded one, else whole on the
    CPU). Raises UsageError (the same on every rank) when the checkpoint does not fit: other
    weights' names or shapes, or optimizer state for parameters this run does not have."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(os.path.join(path, SHARDS))
    saved = reader.read_metadata().state_dict_metadata
    model_state = {MODEL + name: value for name, value in model.state_dict().items()}
    misfits = sorted(set(model_state) ^ {k for k in saved if k.startswith(MODEL)})
    misfits += [f"{name} {list(saved[name].size)} (now {list(value.shape)})"
                for name, value in model_state.items()
                if name in saved and tuple(saved[name].size) != tuple(value.shape)]
    if misfits:
        raise UsageError(f"--checkpoint-dir: {path} holds weights that do not fit the model "
                         f"({', '.join(m.removeprefix(MODEL) for m in misfits[:4])}"
                         f"{', ...' if len(misfits) > 4 else ''}); allowed: resume with the "
                         "same model")
    params = ([p for group in optimizer.param_groups for p in group["params"]]
              if optimizer is not None else [])
    optimizer_state = {}
    for name, meta in saved.items():
        if not name.startswith(OPTIMIZER):
            continue
        index = int(name[len(OPTIMIZER):].partition(".")[0])
        if index >= len(params):
            raise UsageError(f"--checkpoint-dir: {path} holds optimizer state for parameter "
                             f"{index} and this run's optimizer steps {len(params)}; allowed: "
                             "resume with the same model and optimizer")
        param, size = params[index], tuple(meta.size)
        dtype = meta.properties.dtype
        if is_dtensor(param) and size == tuple(param.shape):
            from torch.distributed.tensor import empty as dtensor_empty

            optimizer_state[name] = dtensor_empty(*size, dtype=dtype,
                                                  device_mesh=param.device_mesh,
                                                  placements=param.placements)
        else:
            optimizer_state[name] = torch.empty(size, dtype=dtype)
    dcp.load({**model_state, **optimizer_state}, storage_reader=reader,
             no_dist=not distributed)
    model.load_state_dict({name[len(MODEL):]: value for name, value in model_state.items()})
    return {name[len(OPTIMIZER):]: value for name, value in optimizer_state.items()}
