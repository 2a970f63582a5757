"""The bf16 whole step's elementwise work in fewer passes over memory than as written.

In the compiled bf16 step of a large MLP the matmuls run near their rate, and most of the
rest of the GPU time is elementwise work around them, each piece a pass over a whole
activation (a kernel profile: docs/results/profile-gpu-h100.md). Two of those pieces can be
done in fewer passes, with the same arithmetic, and each is faster so, timed alone at the
compute workload's size by ``bench_rates.fusion_leads`` (which checks first that both ways
agree) in
docs/benchmarks.md#the-ninth-session-the-aligned-buffers-measured-a-replays-memory-the-bf16-fusions:

- **The sum MSE loss and its gradient**, with each row summed first. Inductor computes a
  sum over the whole output as a split reduction of its own, then the gradient in another
  pass over the output and targets; with the rows summed first, one kernel computes the
  row sums and the gradient together. Only the sum MSE loss (``--loss mse``, or a plain
  ``nn.MSELoss(reduction='sum')`` without hooks) is rewritten: any other loss is computed
  as written.
- **Linear then ReLU**, as one cuBLASLt call with a ReLU epilogue
  (``torch._addmm_activation``). Inductor calls cuBLAS for the matmul and adds a pass of
  its own for the ReLU; the epilogue applies it as the matmul writes its output. The
  backward (the ReLU's mask, then the layer's three products) is autograd's, written out,
  as that op has no derivative in torch.

Both apply to the bf16 whole step (wholestep.py) alone, the step they are measured faster
in, unless the environment sets ``DISTNN_BF16_FUSIONS=0`` (the benchmark runs the step both
ways). In fp32 the reference model's loss and its gradient are one fused kernel already,
and its compiled step takes more GPU time with cuBLASLt preferred
(``TORCH_BLAS_PREFER_CUBLASLT=1``) than with cuBLAS (docs/results/profile-gpu-h100.md). The
rounding differs from the step as written only in the order the loss's squares are added.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

Tensors = dict[str, torch.Tensor]


def loss_in_one_pass(loss_fn: Callable) -> Callable | None:
    """For the sum MSE loss (distnn's ``--loss mse``, or an ``nn.MSELoss(reduction='sum')``
    of your own without hooks: the same sum), the same loss with each row summed first (see
    the module's docstring); None for any other loss."""
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "sum" and not _hooked(loss_fn):
        return mse_rows_first
    return None


def mse_rows_first(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(output, target, reduction='sum')`` with the squares of each row added
    first, computed in at least fp32 (as autocast computes ``mse_loss``)."""
    if output.shape != target.shape or output.dim() < 2:
        return nn.functional.mse_loss(output, target, reduction="sum")
    dtype = torch.promote_types(torch.promote_types(output.dtype, target.dtype),
                                torch.float32)
    return (output.to(dtype) - target.to(dtype)).square().sum(-1).sum()


def relu_epilogues(model: nn.Module) -> bool:
    """Whether :func:`sequential_forward` has a Linear and ReLU pair of ``model`` to run as
    one call: an ``nn.Sequential`` itself (not a subclass, whose forward may differ) with a
    biased ``nn.Linear`` followed by an ``nn.ReLU``, no hooks anywhere in it, and no tensor
    shared by two of its modules (``functional_call`` ties those only when given the whole
    model, while :func:`sequential_forward` calls each layer on its own)."""
    if (type(model) is not nn.Sequential or _global_hooks()
            or any(_hooked(module) for module in model.modules())):
        return False
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    if len({id(tensor) for _, tensor in named}) != len(named):
        return False
    return any(_pair(first, second) for first, second in zip(model, model[1:], strict=False))


def sequential_forward(model: nn.Sequential, tensors: Tensors, x: torch.Tensor) -> torch.Tensor:
    """``functional_call(model, tensors, (x,))`` for an ``nn.Sequential``, with each biased
    ``nn.Linear`` followed by an ``nn.ReLU`` run as one matmul with a ReLU epilogue
    (:class:`LinearReLU`), on a batch of rows. ``tensors`` maps the model's parameter and
    buffer names to the tensors to use; a layer whose tensors are not there (a frozen one:
    only what is trained is in the flat buffer) uses its own and runs as written."""
    # the layers as nn.Sequential runs them: a module placed twice runs twice (which
    # named_children, listing each module once, would not say)
    layers = list(model._modules.items())
    index = 0
    while index < len(layers):
        name, module = layers[index]
        following = layers[index + 1][1] if index + 1 < len(layers) else None
        weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
        if (_pair(module, following) and weight is not None and bias is not None
                and x.dim() == 2 and weight.shape[1] > 0):
            x = LinearReLU.apply(x.to(weight.dtype), weight, bias)
            index += 2
            continue
        own = {key[len(name) + 1:]: value for key, value in tensors.items()
               if key.startswith(f"{name}.")}
        x = functional_call(module, own, (x,))
        index += 1
    return x


class LinearReLU(torch.autograd.Function):
    """``relu(x @ w.T + b)`` as one cuBLASLt call; the backward is autograd's for the
    Linear and the ReLU (the ReLU's mask, then ``g @ w``, ``g.T @ x`` and ``g.sum(0)``)."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch._addmm_activation(b, x, w.t())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, _ = inputs
        ctx.save_for_backward(x, w, output)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, output = ctx.saved_tensors
        g = g.masked_fill(output <= 0, 0)  # ReLU's backward: autograd's threshold_backward
        dx = g @ w if ctx.needs_input_grad[0] else None
        dw = g.t() @ x if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def _pair(first: nn.Module, second: nn.Module | None) -> bool:
    return (type(first) is nn.Linear and first.bias is not None
            and type(second) is nn.ReLU)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Whether hooks registered for every module (``nn.modules.module.
    register_module_forward_hook`` and the like) are set: the fused pairs would skip them."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks
                or module._global_backward_hooks or module._global_backward_pre_hooks)
