"""The network: the reference program's, or deeper with more hidden layers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def build_model(d_in: int, hidden: Sequence[int], d_out: int) -> nn.Sequential:
    """``Linear(d_in, h1) -> ReLU -> ... -> Linear(hk, d_out)``, on the CPU, default init.

    With one hidden layer (the reference program's) its state_dict keys are ``0.weight``,
    ``0.bias``, ``2.weight``, ``2.bias``; each further hidden layer adds a Linear and a ReLU.
    """
    widths = [d_in, *hidden]
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], d_out))
