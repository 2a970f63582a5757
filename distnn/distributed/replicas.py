"""The model on every rank: placed on the rank's device with rank 0's values, and its
trainable parameters in the flat buffer whose gradients the ranks sum."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distnn.distributed.gradsync import VIA_ROOT_MAX_MB, FlatGradSync
from distnn.distributed.process_group import collective
from distnn.distributed.runtime import Runtime
from distnn.errors import UsageError


def replicate(model: nn.Module, runtime: Runtime, *, bucket_mb: float) -> FlatGradSync:
    """Moves ``model`` to this rank's device, gives every rank rank 0's values of all its
    tensors, and returns the gradient sync over its trainable parameters.

    The sync has two slots after the gradients: the rank's loss and its stop vote. A group
    of one rank (torchrun --nproc_per_node=1) uses neither: its steps sum nothing.
    """
    model.to(runtime.device)
    gloo = runtime.placement.backend == "gloo"
    try:
        sync = FlatGradSync(model, distributed=runtime.communicates, extra_slots=2,
                            bucket_mb=bucket_mb,
                            via_root_max_mb=VIA_ROOT_MAX_MB if gloo else 0.0)
    except ValueError as error:  # the same on every rank: the same model everywhere
        raise UsageError(f"the model: {error}; allowed: a model whose trainable "
                         "parameters share one dtype and device") from None
    sync.broadcast_parameters(src=0)
    broadcast_the_rest(model, communicates=runtime.communicates)
    return sync


def place_whole(model: nn.Module, runtime: Runtime) -> None:
    """Moves ``model`` to this rank's device with rank 0's values of all its tensors, before
    it is sharded (every rank holds it whole until then)."""
    model.to(runtime.device)
    if not runtime.communicates:
        return
    with collective("broadcasting the parameters"), torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    broadcast_the_rest(model, communicates=True)


def broadcast_the_rest(model: nn.Module, *, communicates: bool) -> None:
    """Rank 0's values of the model's tensors outside the flat buffer (frozen parameters and
    buffers: a frozen layer drawn unseeded, or a resumed BatchNorm's statistics, which rank
    0 alone read from the checkpoint) on every rank."""
    rest = [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]
    if not (communicates and rest):
        return
    with collective("broadcasting the frozen parameters and buffers"), torch.no_grad():
        for tensor in rest:
            # as bytes: dense, and of a dtype every backend sends (gloo has no uint32)
            dense = tensor.contiguous()
            dist.broadcast(dense.reshape(-1).view(torch.uint8), src=0)
            if dense is not tensor:
                tensor.copy_(dense)
