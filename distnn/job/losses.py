"""The training objectives: sums over the batch, so the ranks' gradients add up.

The reference program sums its squared errors (``MSELoss(reduction='sum')``);
classification sums its cross-entropies the same way. With a sum, the gradient of a batch is
the sum of the gradients of any split of it, so an all-reduce with SUM and no division by
the world size gives the one-process result (a mean would weigh a rank's rows by its
shard's size; --loss-reduction mean divides the global sum by the global count instead).

distnn's own losses (``--loss``) take the model's output as models return it: a tensor, an
object with ``.logits`` (a Hugging Face model's), a tuple (the scores first) or a dict with
``"logits"``; and cross-entropy takes the classes on the scores' last dimension, as language
models give them: scores [N, ..., V] against labels [N, ...], each label a target, those
equal to the ignored label (``--ignore-index``, torch's -100 by default) left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from distnn.errors import UsageError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sum_loss(name: str, *, ignore_index: int = -100) -> LossFn:
    """The loss of ``--loss name`` with ``reduction='sum'``: ``mse`` or ``cross-entropy``
    (on class labels, those equal to ``ignore_index`` left out, or on probabilities)."""
    if name == "mse":
        return nn.MSELoss(reduction="sum")
    if name == "cross-entropy":
        return nn.CrossEntropyLoss(reduction="sum", ignore_index=ignore_index)
    raise ValueError(f"unknown loss {name!r}; allowed: mse, cross-entropy")


def scores_of(output: object) -> torch.Tensor:
    """The scores in a model's output: the tensor itself, its ``.logits``, a dict's
    ``"logits"``, or a tuple's or list's first element. Raises UsageError otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    keys = f" with keys {sorted(map(str, output))}" if isinstance(output, Mapping) else ""
    raise UsageError(f"the model returned a {type(output).__name__}{keys}, which holds no "
                     "scores distnn's loss can find; allowed: a tensor, an object with a "
                     ".logits tensor, a dict with a 'logits' tensor, a tuple or list whose "
                     "first element is the scores, or a loss function of your own")


def classes_last(scores: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [N, ..., V] with labels [N, ...] (or probabilities [N, ..., V]) as one row a
    position: [M, V] with [M] (or [M, V]), M the positions; [N, V] with [N] as they are."""
    if scores.dim() <= 2:
        return scores, targets
    classes = scores.shape[-1]
    rows = targets.reshape(-1, classes) if targets.is_floating_point() else targets.reshape(-1)
    return scores.reshape(-1, classes), rows


def apply_loss(loss_fn: LossFn, builtin: bool, output: object,
               targets: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` on a model's ``output`` and the ``targets``: a loss of the user's own
    (``builtin`` False) gets the output as the model returned it; distnn's own gets the
    scores in it (:func:`scores_of`), the classes last for cross-entropy."""
    if not builtin:
        return loss_fn(output, targets)
    scores = scores_of(output)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        scores, targets = classes_last(scores, targets)
    return loss_fn(scores, targets)


def counted_targets(targets: torch.Tensor, *, ignore_index: int,
                    probabilities: bool = False) -> torch.Tensor:
    """The targets a mean divides by (a 0-dim int64 tensor): class labels (integer
    ``targets``) not equal to ``ignore_index``; the positions of class ``probabilities``
    [N, ..., V]; else every element (a regression's values)."""
    if not targets.is_floating_point():
        return (targets != ignore_index).sum()
    if probabilities:
        return torch.tensor(targets.numel() // max(1, targets.shape[-1]))
    return torch.tensor(targets.numel())


def correct_predictions(scores: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int) -> torch.Tensor:
    """How many counted labels are their position's largest score (scores [N, ..., V],
    labels [N, ...]; a 0-dim tensor, on their device)."""
    return ((scores.argmax(dim=-1) == labels) & (labels != ignore_index)).sum()
