"""The reference program, written out independently of distnn: the yardstick for every test.

This is the tutorial's two-layer net with ``torch.manual_seed(seed)`` first, trained in one
process on the whole batch. Nothing here imports distnn.
"""

from __future__ import annotations

import functools

import torch
from safetensors.torch import load_file


@functools.cache
def reference_run(*, seed: int = 0, batch_size: int = 64, d_in: int = 1000,
                  hidden: tuple[int, ...] = (100,), d_out: int = 10, steps: int = 500,
                  lr: float = 1e-4, data: str | None = None,
                  ) -> tuple[tuple[float, ...], dict[str, torch.Tensor]]:
    """Returns (the loss printed at each step, the final state_dict).

    With ``data`` (a safetensors file holding x and y) the batch comes from the file and
    the seed draws only the weights. ``hidden`` lists the widths of the hidden layers.
    """
    torch.manual_seed(seed)
    if data is None:
        x = torch.randn(batch_size, d_in)
        y = torch.randn(batch_size, d_out)
    else:
        tensors = load_file(data)
        x, y = tensors["x"].float(), tensors["y"].float()
        d_in, d_out = x.shape[1], y.shape[1]
    layers = []
    for width_in, width_out in zip((d_in, *hidden[:-1]), hidden, strict=True):
        layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(hidden[-1], d_out))
    loss_fn = torch.nn.MSELoss(reduction="sum")
    losses = []
    for _ in range(steps):
        y_pred = model(x)
        loss = loss_fn(y_pred, y)
        losses.append(loss.item())
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                param.data -= lr * param.grad
    return tuple(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_matches_reference(losses, weights, *, rtol_first_100: float = 1e-5,
                             weight_atol: float = 1e-5, **run_kwargs) -> None:
    """Checks a run's per-step global losses and final weights against the reference.

    Tolerances from ../shared/FACTS.md: summing shard gradients instead of one full-batch
    reduction changes only rounding (relative < 1e-6 over the first 100 steps, final weights
    within 1.3e-6 after 500 steps).
    """
    ref_losses, ref_weights = reference_run(**run_kwargs)
    assert len(losses) == len(ref_losses)
    head = min(100, len(ref_losses))
    got = torch.tensor(losses[:head], dtype=torch.float64)
    want = torch.tensor(ref_losses[:head], dtype=torch.float64)
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= rtol_first_100, f"loss differs from the reference by {rel:.3g} (relative)"
    assert sorted(weights) == sorted(ref_weights)
    for name, want_tensor in ref_weights.items():
        diff = (weights[name].to("cpu", torch.float32) - want_tensor).abs().max().item()
        assert diff <= weight_atol, f"{name} differs from the reference by {diff:.3g}"
