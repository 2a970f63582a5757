"""The run's numeric precision, one object: ``--precision fp32|tf32|bf16``.

fp32 computes as the reference program does. tf32 lets CUDA's float32 matmuls use TF32.
bf16 runs the forward and the loss under bf16 autocast; the weights, gradients, the
all-reduce and the update stay fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch


class Precision:
    """What ``--precision`` means on this rank's device: the autocast context of a forward
    (:meth:`autocast`) and the matmul mode of a run (:meth:`matmuls`)."""

    def __init__(self, mode: str, *, device: torch.device, cuda_graph: bool = False) -> None:
        self.mode = mode
        self.device = device
        # Under --cuda-graph without autocast's weight-cast cache, as the torch.cuda.graphs
        # documentation asks for capture: the casts are then kernels in the graph itself.
        self.cache_casts = not cuda_graph

    @property
    def bf16(self) -> bool:
        return self.mode == "bf16"

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast for a forward and loss under bf16; nothing otherwise."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                  cache_enabled=self.cache_casts)
        return nullcontext()

    def matmuls(self) -> AbstractContextManager:
        """For a whole run: TF32 matmuls under tf32, full fp32 ones otherwise."""
        return tf32_matmuls(self.mode == "tf32")


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA float32 matmuls in TF32 (``enabled``) or in full fp32, for one run; the process's
    own setting is put back after it.

    The setting is global to the process: set and left, one tf32 run would turn the fp32
    runs after it in the same process into TF32. Compiling and capturing read it inside
    the run, so they see the run's own.
    """
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
