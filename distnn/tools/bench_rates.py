"""The yardsticks of the compute-bound workload, timed alone: the device's matmul rates (the
square matmul, a step's own matmuls in the shapes and layouts autograd uses, and the layouts
the first layer's weight gradient could be computed in), and pieces of the step's
elementwise work written two ways each (:func:`fusion_leads`). ``python -m distnn.tools.bench``
measures them in the same run as the steps it compares with them.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import grad_and_value

from distnn.step.wgrad import LAYOUTS
from distnn.tools.bench_loops import sync
from distnn.tools.workload import Workload


def _ms(run: Callable[[], object], device: torch.device, *, repeats: int, batch: int,
        warmup: int) -> float:
    """Milliseconds per call of ``run``: after ``warmup`` calls, the median over ``repeats``
    of ``batch`` back-to-back calls, each batch timed to a device sync."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(batch):
            run()
        sync(device)
        times.append((time.perf_counter() - started) / batch * 1e3)
    return statistics.median(times)


def _tflops(run: Callable[[], object], flop: float, device: torch.device, *, repeats: int,
            batch: int, warmup: int) -> float:
    """The rate of ``run`` (``flop`` each) in TFLOP/s, timed as :func:`_ms` times it."""
    ms = _ms(run, device, repeats=repeats, batch=batch, warmup=warmup)
    return flop / (ms * 1e-3) / 1e12


def matmul_tflops(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 5,
                  batch: int = 10) -> float:
    """The plain ``size``^3 matmul rate on this device in TFLOP/s: the median over ``repeats``
    of ``batch`` back-to-back matmuls (as a training step runs them)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return _tflops(lambda: a @ b, 2 * size**3, device, repeats=repeats, batch=batch,
                   warmup=3)


def step_matmuls(work: Workload, device: torch.device, dtype: torch.dtype
                 ) -> Callable[[], None]:
    """A function that runs one step's matmuls of ``work`` and nothing else: per layer
    Linear(a, b) on N rows, the forward ``x @ W.T`` ([N, a] by [a, b]), the weight gradient
    ``g.T @ x`` ([b, N] by [N, a]) and, for every layer but the first, the input gradient
    ``g @ W`` ([N, b] by [b, a]), with the layouts autograd uses."""
    widths = (work.d_in, *work.hidden, work.d_out)
    calls = []
    for layer, (a, b) in enumerate(itertools.pairwise(widths)):
        x = torch.randn(work.batch_size, a, device=device, dtype=dtype)
        w = torch.randn(b, a, device=device, dtype=dtype)
        g = torch.randn(work.batch_size, b, device=device, dtype=dtype)
        calls += [(x, w.t()), (g.t(), x)]
        if layer:
            calls.append((g, w))

    def run() -> None:
        for left, right in calls:
            torch.mm(left, right)

    return run


def step_matmul_tflops(work: Workload, device: torch.device, dtype: torch.dtype,
                       repeats: int = 5, batch: int = 3) -> float:
    """The rate of a step's own matmuls (:func:`step_matmuls`) run back to back, in TFLOP/s:
    what a step could reach if nothing but its matmuls took time. The layouts the backward
    pass needs (a transposed operand) can run slower than a square matmul, so this is the
    floor to compare a step with, beside the plain matmul rate. The median over ``repeats``
    of ``batch`` such steps."""
    return _tflops(step_matmuls(work, device, dtype), work.flop_per_step, device,
                   repeats=repeats, batch=batch, warmup=1)


def weight_grad_layouts(work: Workload, device: torch.device, dtype: torch.dtype,
                        repeats: int = 5, batch: int = 10) -> dict[str, float]:
    """The rate in TFLOP/s of the first layer's weight gradient of ``work`` (Linear(a, b) on
    N rows: g [N, b], x [N, a], dW [b, a]) in each way it can be computed:

    - those a run can use (``wgrad.LAYOUTS``, ``DISTNN_WEIGHT_GRAD``): autograd's
      ``g.T @ x``; the transposed product ``(x.T @ g).T``; ``g.T @ x`` with g, or g and x,
      transposed into row-major copies first (the copies counted);
    - ``(xT @ g).T, xT kept``: the transposed product from a row-major copy of x.T made
      once (a rank's shard of a fixed batch never changes): a plain row-major product.

    On a GPU the layouts can differ widely in speed (docs/benchmarks.md): this shows, on the
    machine at hand, which layout a custom linear layer should use. Medians over ``repeats``
    of ``batch`` back-to-back calls.
    """
    a, b = work.d_in, (*work.hidden, work.d_out)[0]
    x = torch.randn(work.batch_size, a, device=device, dtype=dtype)
    g = torch.randn(work.batch_size, b, device=device, dtype=dtype)
    x_t = x.t().contiguous()
    ways: dict[str, Callable[[], object]] = {
        **{name: functools.partial(compute, g, x) for name, compute in LAYOUTS.items()},
        "(xT @ g).T, xT kept": lambda: torch.mm(x_t, g).t(),
    }
    flop = 2.0 * work.batch_size * a * b
    return {name: _tflops(run, flop, device, repeats=repeats, batch=batch, warmup=2)
            for name, run in ways.items()}


def fusion_leads(work: Workload, device: torch.device, dtype: torch.dtype, repeats: int = 5,
                 batch: int = 10) -> dict[str, float]:
    """Milliseconds per call, at ``work``'s sizes in ``dtype``, of two pieces of the step's
    elementwise work written two ways each, to tell whether fusing them would pay (as
    written, the loss and its gradient are two passes over the same output and targets, and
    the ReLU a pass of its own after the first matmul):

    - the sum MSE loss and its gradient with respect to the output (``torch.func``, compiled
      whole as the step is), as the loss is written (``F.mse_loss``) and with the rows
      summed first, which inductor can compute with the gradient in one pass;
    - the first layer's ``addmm`` then ReLU, and the same with the ReLU as cuBLASLt's
      epilogue (``torch._addmm_activation``).

    Each pair is checked to compute the same values before it is timed.
    """
    n, a, h, d = work.batch_size, work.d_in, (*work.hidden, work.d_out)[0], work.d_out
    out = torch.randn(n, d, device=device, dtype=dtype)
    y = torch.randn(n, d, device=device)
    losses = {
        "loss and gradient, as written": lambda o: F.mse_loss(o.float(), y, reduction="sum"),
        "loss and gradient, rows summed first": lambda o: (o.float() - y).square().sum(1).sum(),
    }
    x = torch.randn(n, a, device=device, dtype=dtype)
    w = torch.randn(h, a, device=device, dtype=dtype)
    b = torch.randn(h, device=device, dtype=dtype)
    ways: dict[str, Callable[[], object]] = {
        name: functools.partial(torch.compile(grad_and_value(loss), dynamic=False,
                                              fullgraph=True), out)
        for name, loss in losses.items()}
    ways["addmm, then ReLU"] = lambda: torch.relu(torch.addmm(b, x, w.t()))
    ways["addmm with a ReLU epilogue"] = lambda: torch._addmm_activation(b, x, w.t())
    (grad, loss), (grad_rows, loss_rows), relu, epilogue = (run() for run in ways.values())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    if not (torch.allclose(grad, grad_rows, rtol=tolerance, atol=0)
            and torch.allclose(loss, loss_rows, rtol=1e-5)
            and torch.allclose(relu.float(), epilogue.float(), rtol=tolerance, atol=tolerance)):
        raise AssertionError("fusion_leads: the two ways of a piece of work disagree")
    return {name: _ms(run, device, repeats=repeats, batch=batch, warmup=2)
            for name, run in ways.items()}
