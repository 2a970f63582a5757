"""The reference program's network."""

from __future__ import annotations

from torch import nn


def build_model(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """``Linear(d_in, hidden) -> ReLU -> Linear(hidden, d_out)``, on the CPU, default init.

    Its state_dict keys are ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``.
    """
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
