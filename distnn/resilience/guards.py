"""Guards against silent failure: the ranks' agreement on the config (fingerprints) and on
the replicas' weights (checksums). The finite checks are the weights' holders'
(gradsync.all_finite, ShardedSync.weights_finite) and the loss record's."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
from typing import Any

import safetensors
import torch
import torch.distributed as dist
from torch import nn

from distnn._version import __version__
from distnn.config import TrainConfig, flag_name
from distnn.distributed.process_group import collective
from distnn.errors import EXIT_GUARD, RunFailed


def fingerprint(config: TrainConfig) -> dict[str, Any]:
    """What every rank of one job must agree on: its config and its library versions."""
    return {
        **{flag_name(f.name): getattr(config, f.name) for f in dataclasses.fields(config)},
        "distnn": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def model_signature(model: nn.Module) -> str:
    """The model as far as the ranks must agree on it: its parameters' and buffers' names,
    shapes and dtypes, summed up in a line (a count, the values, a digest of the list)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    listed = ";".join(f"{name}:{list(t.shape)}:{t.dtype}" for name, t in tensors)
    digest = hashlib.sha256(listed.encode()).hexdigest()[:12]
    return f"{len(tensors)} tensors of {sum(t.numel() for _, t in tensors)} values ({digest})"


def disagreements(fingerprints: list[dict[str, Any]]) -> list[str]:
    """One description per field on which some rank differs from rank 0 (empty: all agree)."""
    differ = []
    for key, value in fingerprints[0].items():
        others = {rank: fp.get(key) for rank, fp in enumerate(fingerprints) if fp.get(key) != value}
        if others:
            described = ", ".join(f"rank {rank} {v!r}" for rank, v in others.items())
            differ.append(f"{key} (rank 0 {value!r}, {described})")
    return differ


CHECKSUM_CHUNK = 1 << 20  # elements widened to int64 at a time: 8 MB, and 8 MB squared


def replica_checksum(flat_params: torch.Tensor) -> torch.Tensor:
    """Two int64 sums over the parameters' bit patterns: equal iff the replicas (almost surely) are.

    Exact integer arithmetic (wrapping modulo 2**64), so the result does not depend on
    summation order. Taken CHECKSUM_CHUNK elements at a time: widened whole, the bit patterns
    and their squares were two int64 copies of the weights, 16 bytes a parameter on top of a
    run's 16 (AdamW) at every check.
    """
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat_params.element_size()]
    total = torch.zeros(2, dtype=torch.int64, device=flat_params.device)
    for chunk in flat_params.view(int_type).split(CHECKSUM_CHUNK):
        bits = chunk.to(torch.int64)
        total[0] += bits.sum()
        total[1] += (bits * bits).sum()
    return total


def check_replicas(flat_params: torch.Tensor, *, step: int, distributed: bool) -> None:
    """Compares every rank's weights (one small all-gather); raises RunFailed if they differ."""
    if not distributed:
        return
    local = replica_checksum(flat_params)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    with collective("the replica check"):
        dist.all_gather(gathered, local)
    differ = [rank for rank, value in enumerate(gathered) if not torch.equal(value, gathered[0])]
    if differ:
        raise RunFailed(f"replicas diverged: after step {step} the weights of rank(s) "
                        f"{', '.join(map(str, differ))} differ from rank 0's; stopping",
                        EXIT_GUARD)
