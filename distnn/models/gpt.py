"""A small decoder-only transformer (GPT) for token sequences.

``build(d_in=T, d_out=V, ...)`` is the ``--model distnn.models.gpt:build`` function: the
context length T is the rows' width (token ids ``x`` [N, T]) and the vocabulary V the
classes (next-token labels ``y`` [N, T]); ``--model-args '{"d_model": 128, ...}'`` sets the
rest. The model maps ids [N, T] to next-token scores [N, T, V], each position seeing only
itself and the positions before it (``F.scaled_dot_product_attention`` with a causal mask:
flash attention on a GPU). Its blocks are the modules of one ``nn.ModuleList``
(``model.blocks``), the units a sharded run wraps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        # no bias: a key's bias adds the same to every score of a query, which softmax
        # ignores, so its gradient is rounding noise that AdamW would scale into steps
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, positions, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # [N, T, C] -> [N, heads, T, C / heads]
        q, k, v = (t.view(rows, positions, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(rows, positions, width))


class Block(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_heads)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x))
        return x + self.mlp(self.norm_mlp(x))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layers`` blocks, a final norm and the scores."""

    def __init__(self, *, vocab: int, context: int, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.context = context
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.scores = nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, T] (T at most the context) -> next-token scores [N, T, vocab]."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.scores(self.norm(x))


def build(*, d_in: int, d_out: int, d_model: int = 64, n_layers: int = 2,
          n_heads: int = 4) -> GPT:
    """The GPT for rows of ``d_in`` token ids and a vocabulary of ``d_out`` (--model)."""
    return GPT(vocab=d_out, context=d_in, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
