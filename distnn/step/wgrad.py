"""A linear layer's weight gradient, ``dW = g.T @ x``, computed in a chosen memory layout.

A matmul library picks its kernel by the operands' layouts (which of them is transposed),
and the weight gradient's ``g.T @ x`` is the layout cuBLAS serves slowest in TF32, well
below the forward's ``x @ W.T`` and the input gradient's ``g @ W``, while bf16 serves all
three at the same rate (measured: docs/benchmarks.md#against-the-gpu-targets-of-issue-3). The
same product can be asked for in other layouts, at the price of a transposed copy of an
operand for some of them; :data:`LAYOUTS` names them, and ``python -m distnn.tools.bench``
times each on the GPU at hand (``bench_rates.weight_grad_layouts``).

:class:`Layout` makes every 2-dim ``F.linear`` (every ``nn.Linear`` on a batch of rows)
inside it compute its weight gradient in one of them; the product's value is the same,
its rounding may differ in the last bits (another kernel sums in another order). A run's
steps (eager or compiled whole) use the layout the environment variable
``DISTNN_WEIGHT_GRAD`` names, in fp32 and TF32 (bf16 runs every layout at the full rate),
or, unset, :func:`default`'s: for the whole step compiled in TF32 on a CUDA GPU the
forward's layout, both operands copied (inductor writes the copies in the kernels that
make g and x, so every matmul runs in cuBLAS's fast layout; measured faster there:
docs/benchmarks.md#the-compute-workload-n8192-4096---4096---4096-second-call); for every
other run autograd's, which needs no mode at all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from distnn.errors import UsageError

WeightGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (g, x) -> g.T @ x

AUTOGRAD = "g.T @ x"
BOTH_COPIED = "g.T @ x, both copied"
LAYOUTS: dict[str, WeightGrad] = {
    # autograd's: both operands read through transposed views
    AUTOGRAD: lambda g, x: torch.mm(g.t(), x),
    # the transposed product, read back through a transposed view
    "(x.T @ g).T": lambda g, x: torch.mm(x.t(), g).t(),
    # g transposed into a row-major copy first
    "g.T @ x, g.T copied": lambda g, x: torch.mm(g.t().contiguous(), x),
    # both copied: the forward's layout (a row-major left operand, a transposed right one)
    BOTH_COPIED: lambda g, x: torch.mm(g.t().contiguous(), x.t().contiguous().t()),
}


def default(*, precision: str, compiled: bool, device: torch.device) -> str:
    """The layout a run uses when ``DISTNN_WEIGHT_GRAD`` is unset: both operands copied for
    the whole step compiled in TF32 on a CUDA GPU (measured faster there), else autograd's
    (the mode's copies and its Python cost in the eager step buy nothing measured)."""
    if precision == "tf32" and compiled and device.type == "cuda":
        return BOTH_COPIED
    return AUTOGRAD


def resolve(name: str | None, *, precision: str, compiled: bool, device: torch.device) -> str:
    """The layout a run uses: ``name`` (``DISTNN_WEIGHT_GRAD``, distnn.settings), or
    :func:`default`'s when None. A UsageError for a name not in :data:`LAYOUTS`, or for a
    bf16 run, whose layers autocast runs in bf16."""
    name = name or default(precision=precision, compiled=compiled, device=device)
    if name not in LAYOUTS:
        raise UsageError(f"environment: DISTNN_WEIGHT_GRAD={name!r}; allowed: "
                         + ", ".join(repr(known) for known in LAYOUTS))
    if name != AUTOGRAD and precision == "bf16":
        raise UsageError(f"environment: DISTNN_WEIGHT_GRAD={name!r} with --precision bf16; "
                         "it applies to fp32 and tf32 runs (bf16 runs every layout at the "
                         "full rate)")
    return name


def layout(name: str) -> AbstractContextManager:
    """A :class:`Layout` for ``name``; for autograd's, no mode at all (nothing to change)."""
    return nullcontext() if name == AUTOGRAD else Layout(name)


class Layout(TorchFunctionMode):
    """Inside, ``F.linear(x, w, b)`` on a batch of rows (x and w 2-dim) computes its weight
    gradient in the layout ``name`` (of :data:`LAYOUTS`); its output, input gradient
    (``g @ w``) and bias gradient (``g.sum(0)``) are autograd's. Other calls, and calls
    under autocast (whose bf16 products the layouts are not for), are left as they are."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.linear = _LINEARS[name]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            named = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
            x, w, b = named.get("input"), named.get("weight"), named.get("bias")
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 2
                    and w.dim() == 2 and not torch.is_autocast_enabled(x.device.type)):
                return self.linear.apply(x, w, b)
        return func(*args, **kwargs)


def _linear(weight_grad: WeightGrad) -> type[torch.autograd.Function]:
    """An autograd.Function for ``x @ w.T + b`` whose backward computes ``dW`` with
    ``weight_grad``: one class per layout, as torch.compile traces a static backward."""

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            return F.linear(x, w, b)

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            x, w, b = inputs
            ctx.save_for_backward(x, w)
            ctx.has_bias = b is not None

        @staticmethod
        def backward(ctx, g: torch.Tensor):
            x, w = ctx.saved_tensors
            dx = g @ w if ctx.needs_input_grad[0] else None
            dw = weight_grad(g, x) if ctx.needs_input_grad[1] else None
            db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return dx, dw, db

    return Linear


_LINEARS = {name: _linear(compute) for name, compute in LAYOUTS.items()}
