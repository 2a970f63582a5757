"""--activation-checkpointing: each block's activations recomputed in the backward instead
of kept from the forward (``torch.utils.checkpoint``, non-reentrant), sharded or not.

A block's forward then keeps only its inputs; the backward runs the block's forward again
to get the rest. The recomputation gives the same values (the same operations on the same
inputs), so the gradients, and the run, are the same; what changes is the memory of the
activations, which grows with the batch, against one more forward per block. A block
whose forward draws random numbers (dropout) draws the same ones again: torch's checkpoint
restores the generator's state before recomputing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import nn
from torch.utils.checkpoint import checkpoint


def recompute_in_backward(blocks: Sequence[nn.Module]) -> None:
    """Makes each of ``blocks`` recompute its activations in the backward. Its forward is
    wrapped on the module itself, so its parameters, their names and the state dict stay
    as they were (a checkpoint of either run resumes the other)."""
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Callable, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
