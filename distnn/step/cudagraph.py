"""``--cuda-graph``: the whole training step captured once as a CUDA graph, then replayed.

For the reference model a step is about 20 small kernels of a few microseconds each, while
Python needs tens of microseconds to launch each one: the GPU mostly waits for the host. A
captured step is launched with one call and the GPU runs its kernels back to back, an
order of magnitude faster for that model (docs/benchmarks.md#measurements-behind-the-codes-choices).

What a graph needs, and how the trainer provides it:

- Fixed memory. A replay reads and writes the addresses seen at capture: the parameters and
  gradients (flat buffers), this rank's shard, the extra slots (loss, stop vote; one rank
  alone returns its own loss instead) and the graph's own intermediates. Anything the host
  changes between steps is a device tensor the step reads, never a Python number, which
  would be frozen into the graph.
- No host work inside the step. The step's Python runs once, at capture.
- NCCL. Its collectives are captured as graph nodes; gloo's run on the CPU and cannot be.
- A warm-up before capture, on a side stream, so that lazy initialisation (cuBLAS handles,
  the NCCL communicator, autograd's streams, compiled kernels) does not happen during it.
  The warm-up steps really update the weights, so the caller names the tensors to restore.

A replay runs the same kernels on the same inputs in the same order as the eager step, so it
gives the same bits on the same device (tests/test_gpu.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Output = TypeVar("Output")
WARMUP_STEPS = 3  # the torch.cuda.graphs documentation warms up a few iterations too


class Replay:
    """Runs a captured step again: ``replay()``.

    It holds the step it was captured from. A replay reads and writes the memory seen at
    capture, so whatever the step holds (the batch it was captured on, a bf16 copy of the
    weights, inputs cast once) must live as long as the graph: freed, that memory would be
    handed out again, and the graph would compute on whatever was put there.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, step: Callable[[], object]) -> None:
        self.graph, self.step = graph, step

    def __call__(self) -> None:
        self.graph.replay()


def capture_step(step: Callable[[], Output], *, restore: Sequence[torch.Tensor],
                 warmup_steps: int = WARMUP_STEPS) -> tuple[Replay, Output]:
    """Warms ``step`` up, captures it, and puts ``restore`` back as it was before.

    Returns the replay (which holds ``step``, so what it holds lives on) and what ``step``
    returned during capture: tensors that each replay overwrites in place. Every rank must
    call this at the same point (the warm-up runs the step's collectives for real).
    """
    saved = [tensor.detach().clone() for tensor in restore]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread may query events while this thread captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = step()
    with torch.no_grad():
        for tensor, value in zip(restore, saved, strict=True):
            tensor.copy_(value)
    return Replay(graph, step), output
