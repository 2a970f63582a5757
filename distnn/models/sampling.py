"""Text from a trained next-token model: ``generate`` extends token sequences one token at a
time, each drawn from the model's scores for the position after the last.

Any model that maps token ids [N, T] (T up to its context) to next-token scores [N, T, V]
will do, in any output distnn's loss reads scores from (a tensor, ``.logits``, a dict's
"logits", a tuple's first element): distnn.models.gpt's, a Hugging Face causal LM, or your
own. ``python -m distnn.tools.sample`` runs it on a file distnn.train's --save wrote.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distnn.job.losses import scores_of


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, *, new_tokens: int, context: int,
             temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``ids`` [N, T0] followed by ``new_tokens`` more: [N, T0 + new_tokens].

    The model sees the last ``context`` tokens at most. Each new token is the highest scored
    one when ``temperature`` is 0; otherwise it is drawn from the softmax of the scores over
    ``temperature`` (below 1: surer, above: more varied), among the ``top_k`` highest only
    when given. ``generator`` makes the draws repeatable. ``ids``, the model and the
    generator are on one device. The model is put in eval mode.
    """
    if (new_tokens < 0 or context < 1 or not math.isfinite(temperature) or temperature < 0
            or (top_k is not None and top_k < 1)):
        raise ValueError(f"generate: new_tokens={new_tokens}, context={context}, "
                         f"temperature={temperature}, top_k={top_k}; allowed: new_tokens >= "
                         "0, context >= 1, a finite temperature >= 0, top_k >= 1 or None")
    model.eval()
    for _ in range(new_tokens):
        scores = scores_of(model(ids[:, -context:]))[:, -1, :].float()  # the next one's [N, V]
        if temperature == 0:
            chosen = scores.argmax(dim=-1, keepdim=True)
        else:
            if top_k is not None and top_k < scores.shape[-1]:
                kth = scores.topk(top_k, dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            # the best score 0 before the division: a tiny temperature tends to the best one
            # (-inf elsewhere), not to inf - inf
            scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature
            chosen = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)
        ids = torch.cat([ids, chosen.to(ids.dtype)], dim=1)
    return ids
