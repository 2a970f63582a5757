"""distnn.job.targets: the rules for targets that the command line and distnn.fit share."""

import torch

from distnn.job.targets import loss_mismatch, val_mismatch


def test_mse_takes_floats_and_cross_entropy_labels_or_probabilities():
    floats, labels = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    assert loss_mismatch("mse", floats, named="--loss {}") is None
    assert loss_mismatch("cross-entropy", labels, named="--loss {}") is None
    assert loss_mismatch("cross-entropy", torch.rand(4, 3), named="{}") is None  # probabilities
    assert loss_mismatch("mse", labels, named="--loss {}") == (
        "integer targets y (class labels?) under --loss mse",
        "floating-point targets with --loss mse, or --loss cross-entropy for class labels")
    what, allowed = loss_mismatch("cross-entropy", torch.rand(4, 3), named="--loss {}",
                                  probabilities=False)
    assert what == "targets y of shape [3] a row and dtype float32 under --loss cross-entropy"
    assert allowed == "integer class labels (y [N], or one a position: [N, T])"
    # labels of any shape: one a position of a sequence, as a language model's targets
    assert loss_mismatch("cross-entropy", torch.zeros(4, 7, dtype=torch.long),
                         named="{}") is None
    assert loss_mismatch("cross-entropy", torch.rand(4, 7, 3), named="{}") is None


def test_validation_rows_must_be_shaped_as_the_training_rows():
    x, y = torch.zeros(2, 6), torch.zeros(2, 1)
    assert val_mismatch(torch.zeros(5, 6), torch.ones(5, 1), x, y) is None
    assert val_mismatch(torch.zeros(0, 6), torch.zeros(0, 1), x[:0], y[:0]) is None  # no rows
    assert val_mismatch(torch.zeros(1, 7), y[:1], x, y) == (
        "inputs of shape [7] a row", "[6], as the training data's")
    assert val_mismatch(x, torch.zeros(2, dtype=torch.long), x, y)[0] == "integer class labels"
    assert val_mismatch(x, torch.zeros(2), x, y) == (
        "targets of shape [] a row", "[1], as the training data's")
