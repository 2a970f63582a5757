"""The rules that targets must follow, in one place for the command line's data files and
distnn.fit's rows: which targets a built-in loss takes, and validation rows shaped as the
training rows. Each rule returns what is wrong as (what the rows hold, what is allowed),
or None; the caller names the rows (``--data: 'file'``, ``distnn.fit: train``) and raises."""

from __future__ import annotations

import torch

Mismatch = tuple[str, str] | None


def _row_shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape[1:])


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def loss_mismatch(loss: str, y: torch.Tensor, *, named: str,
                  probabilities: bool = True) -> Mismatch:
    """Whether targets ``y`` (one row or more) suit the built-in ``loss``: ``mse`` takes
    floating-point targets; ``cross-entropy`` integer class labels of any shape ([N], one
    a row; [N, T], one a position), or (when ``probabilities``) class probabilities, floats
    [N, ..., classes]. ``named(loss)``: the loss as the caller's user names it
    (``--loss mse``, ``loss='mse'``)."""
    labels = not y.is_floating_point()
    if loss == "mse" and labels:
        return (f"integer targets y (class labels?) under {named.format('mse')}",
                f"floating-point targets with {named.format('mse')}, or "
                f"{named.format('cross-entropy')} for class labels")
    soft = probabilities and not labels and y.dim() >= 2 and y.shape[-1] > 1
    if loss == "cross-entropy" and not soft and not labels:
        allowed = "integer class labels (y [N], or one a position: [N, T])"
        if probabilities:
            allowed += ", or class probabilities (y [N, ..., classes])"
        return (f"targets y of shape {_row_shape(y)} a row and dtype {_dtype(y)} under "
                f"{named.format('cross-entropy')}", allowed)
    return None


def val_mismatch(val_x: torch.Tensor, val_y: torch.Tensor, train_x: torch.Tensor,
                 train_y: torch.Tensor) -> Mismatch:
    """Whether validation rows (one or more) are shaped as the training rows and hold
    targets of their kind: otherwise the validation would fail only after the training,
    or (targets [N] against [N, 1] under mse) report a loss broadcast into a wrong sum."""
    if _row_shape(val_x) != _row_shape(train_x):
        return (f"inputs of shape {_row_shape(val_x)} a row",
                f"{_row_shape(train_x)}, as the training data's")
    if val_y.is_floating_point() != train_y.is_floating_point():
        kinds = {True: "floating-point targets", False: "integer class labels"}
        return (kinds[val_y.is_floating_point()],
                f"{kinds[train_y.is_floating_point()]}, as the training data holds")
    if _row_shape(val_y) != _row_shape(train_y):
        return (f"targets of shape {_row_shape(val_y)} a row",
                f"{_row_shape(train_y)}, as the training data's")
    return None
