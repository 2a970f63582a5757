"""Models a user would bring with --model MODULE:FUNCTION (used by the tests)."""

from __future__ import annotations

import os

import torch
from torch import nn


class Routed(nn.Module):
    """Each row goes to one of four equal experts, chosen by the sign of its first two
    inputs. A rank whose rows never reach an expert does not use that expert's parameters,
    so the ranks skip different parameters, while every row's output (and so the sum loss
    of any batch) is what one process computes."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
        out = x.new_zeros(len(x), self.experts[0].out_features)
        for index, expert in enumerate(self.experts):
            chosen = route == index
            if chosen.any():  # data-dependent: the expert runs only for its rows
                out = out.index_put((chosen,), expert(x[chosen]))
        return out


def routed(d_in: int, d_out: int) -> nn.Module:
    return Routed(d_in, d_out)


def small_mlp(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, d_out))


def flat_output(d_in: int, d_out: int) -> nn.Module:
    """A regression model whose output is [N] where the targets are [N, 1]: torch's
    MSELoss would broadcast the two to [N, N]."""
    return nn.Sequential(nn.Linear(d_in, 1), nn.Flatten(0))


def not_a_module(d_in: int, d_out: int) -> str:
    return "a string"


def raises(d_in: int, d_out: int) -> nn.Module:
    raise RuntimeError("the user's bug")


class FailsOnRank1(nn.Sequential):
    """An MLP whose forward raises on rank 1 at its third call: a bug in a user's model
    that only one rank's data or state reaches."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FailsOnRank1.calls += 1
        if os.environ.get("RANK") == "1" and FailsOnRank1.calls == 3:
            raise ValueError("this model cannot take that row")
        return super().forward(x)


def fails_on_rank_1(d_in: int, d_out: int) -> nn.Module:
    return FailsOnRank1(nn.Linear(d_in, 8), nn.ReLU(), nn.Linear(8, d_out))


def wider_on_rank_1(d_in: int, d_out: int) -> nn.Module:
    """A model built differently on rank 1 (its hidden layer), which distnn must refuse."""
    width = 6 if os.environ.get("RANK") == "1" else 4
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d_out))


def lazy(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, d_out))


class CastsItsInput(nn.Module):
    """A float64 model that casts the (float32) rows it is given."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.float64)).float()


def casts_its_input(d_in: int, d_out: int) -> nn.Module:
    return CastsItsInput(d_in, d_out)


def on_the_meta_device(d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out, device="meta")


def frozen(d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out).requires_grad_(False)


def frozen_first_layer_of_the_rank(d_in: int, d_out: int) -> nn.Module:
    """An MLP whose first layer is frozen and drawn from a seed of the rank's own, with a
    buffer of the rank's own too: rank 0's values are the ones every rank must train with."""
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(d_in, 8).requires_grad_(False), nn.Tanh(),
                          nn.Linear(8, d_out))
    model.register_buffer("scale", torch.tensor([1.0 + rank]))
    model.register_buffer("code", torch.tensor([7 + rank], dtype=torch.uint16))  # not gloo's
    return model


def batch_norm(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, d_out))


def with_dropout(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 8), nn.Dropout(0.2), nn.Linear(8, d_out))


def bag_of_tokens(d_in: int, d_out: int) -> nn.Module:
    """Token ids [N, T] to one score vector a row, [N, d_out]: not a next-token model."""
    return nn.EmbeddingBag(d_out, d_out)


class LogitsInADict(nn.Module):
    """distnn's GPT whose forward returns {"logits": scores}, as some libraries' models do."""

    def __init__(self, d_in: int, d_out: int, **kwargs) -> None:
        super().__init__()
        from distnn.models.gpt import build

        self.gpt = build(d_in=d_in, d_out=d_out, **kwargs)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.gpt(ids)}


def logits_in_a_dict(d_in: int, d_out: int, **kwargs) -> nn.Module:
    return LogitsInADict(d_in, d_out, **kwargs)
