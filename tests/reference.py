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
                  lr: float = 1e-4, data: str | None = None, bf16: bool = False,
                  ) -> tuple[tuple[float, ...], dict[str, torch.Tensor]]:
    """Returns (the loss printed at each step, the final state_dict).

    With ``data`` (a safetensors file holding x and y) the batch comes from the file and
    the seed draws only the weights. ``hidden`` lists the widths of the hidden layers.
    ``bf16``: the forward and the loss under ``torch.autocast`` in bfloat16 (the CPU's), as
    PyTorch's documentation writes mixed precision; the weights and the update stay fp32.
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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

    Tolerances as this project measured them: summing shard gradients instead of one
    full-batch reduction changes only rounding (relative < 1e-6 over the first 100 steps,
    final weights within 1.3e-6 after 500 steps).
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


def minibatch_reference(*, x, y, seed=0, batch_size=None, steps=None, epochs=None,
                        shuffle=True, drop_last=False, loss="mse", optimizer="sgd", lr=1e-4,
                        momentum=0.9, weight_decay=0.01, hidden=(100,), d_out=None,
                        build=None, val=None, val_every=0):
    """One process training on ``x``, ``y`` in mini-batches with torch.optim, as a user would
    write it (nothing from distnn): returns (the loss of every step, the final state_dict,
    the validation results as {"step", "loss", "samples", "accuracy"?} dicts).

    The order is the documented one: at epoch e, ``randperm(N)`` from a generator seeded with
    ``seed + e`` (or ``arange(N)``), batches of ``batch_size`` rows, the last one kept unless
    ``drop_last``. The model comes right after ``torch.manual_seed(seed)``: the MLP of
    ``hidden``, or ``build(d_in=..., d_out=...)``. ``val`` is (x, y); it is evaluated every
    ``val_every`` steps, else at the end of each epoch, and at the end.
    """
    rows, d_in = x.shape
    classes = y.dtype != torch.float32
    if d_out is None:
        d_out = int(y.max()) + 1 if classes else (y.shape[1] if y.dim() == 2 else 1)
    if not classes and y.dim() == 1:
        y = y.unsqueeze(1)
    batch_size = batch_size or rows
    torch.manual_seed(seed)
    if build is not None:
        model = build(d_in=d_in, d_out=d_out)
    else:
        layers = []
        for width_in, width_out in zip((d_in, *hidden[:-1]), hidden, strict=True):
            layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(hidden[-1], d_out))
    loss_fn = (torch.nn.CrossEntropyLoss(reduction="sum") if loss == "cross-entropy"
               else torch.nn.MSELoss(reduction="sum"))
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    elif optimizer == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = rows // batch_size if drop_last else -(-rows // batch_size)
    total = steps if steps is not None else epochs * per_epoch

    def evaluate(done):
        model.eval()
        with torch.no_grad():
            val_x, val_y = val
            if not classes and val_y.dim() == 1:
                val_y = val_y.unsqueeze(1)
            out = model(val_x)
            result = {"step": done, "loss": loss_fn(out, val_y).item(), "samples": len(val_x)}
            if classes:
                result["accuracy"] = (out.argmax(1) == val_y).sum().item() / len(val_x)
        model.train()
        return result

    losses, val_results, step, epoch = [], [], 0, 0
    while step < total:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        order = torch.randperm(rows, generator=generator) if shuffle else torch.arange(rows)
        for k in range(per_epoch):
            if step == total:
                break
            batch = order[k * batch_size:(k + 1) * batch_size]
            batch_loss = loss_fn(model(x[batch]), y[batch])
            losses.append(batch_loss.item())
            opt.zero_grad()
            batch_loss.backward()
            opt.step()
            step += 1
            if val is not None and (
                    (val_every and step % val_every == 0) or step == total
                    or (not val_every and k == per_epoch - 1)):
                val_results.append(evaluate(step))
        epoch += 1
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, weights, val_results


def assert_close_run(losses, weights, ref_losses, ref_weights, *, head=50, rtol=1e-5,
                     weight_atol=1e-4):
    """Per-step losses within relative ``rtol`` over the first ``head`` steps and the final
    weights within ``weight_atol``: the tolerances of a run on another world size, which
    sums the same gradients in another order."""
    assert len(losses) == len(ref_losses)
    got = torch.tensor(losses[:head], dtype=torch.float64)
    want = torch.tensor(ref_losses[:head], dtype=torch.float64)
    rel = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert rel <= rtol, f"loss differs from the reference by {rel:.3g} (relative)"
    assert sorted(weights) == sorted(ref_weights)
    for name, want_tensor in ref_weights.items():
        diff = (weights[name].to("cpu", torch.float32) - want_tensor).abs().max().item()
        assert diff <= weight_atol, f"{name} differs from the reference by {diff:.3g}"
