"""The update: the reference program's ``p -= lr * grad`` or a ``torch.optim`` optimizer,
and the optimizer's state as tensors for a checkpoint.

``--optimizer sgd`` is the reference program's update, applied by FlatGradSync over its
flat buffer (no optimizer object). ``momentum`` and ``adamw`` are torch.optim's own SGD
and AdamW (its fused kernel), stepping on the summed gradients, so their numbers are
torch's. Their state (momentum buffers, AdamW's moments and step counts) is saved as
safetensors and restored bitwise.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def build_optimizer(name: str, parameters: Iterable[nn.Parameter], *, lr: float,
                    momentum: float, weight_decay: float) -> torch.optim.Optimizer | None:
    """The torch.optim optimizer of ``--optimizer name``; None for ``sgd`` (the reference
    program's update)."""
    if name == "sgd":
        return None
    if name == "momentum":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    if name == "adamw":
        # fused: one kernel over every parameter instead of a loop of small ones (on this
        # project's CPU 0.8 ms a step instead of 2.7 for the 137K-parameter GPT, ~6% of its
        # step: docs/benchmarks.md); the same update, rounded within a few ulps of the loop's
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {name!r}; allowed: sgd, momentum, adamw")


def state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The per-parameter state as ``{"<param index>.<name>": tensor}`` (CPU copies).

    Only tensors: the hyperparameters are the run's flags, not the checkpoint's.
    """
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{name} is a {type(value).__name__}, "
                                "not a tensor; it cannot be checkpointed")
            tensors[f"{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def state_by_index(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """:func:`state_tensors`' format back as an optimizer state dict's ``"state"``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    return state


def load_state_tensors(optimizer: torch.optim.Optimizer,
                       tensors: dict[str, torch.Tensor]) -> None:
    """Puts back what :func:`state_tensors` saved, keeping the optimizer's hyperparameters."""
    saved = optimizer.state_dict()
    saved["state"] = state_by_index(tensors)
    optimizer.load_state_dict(saved)
