"""distnn/step/fusions.py: the bf16 whole step's loss and Linear+ReLU pairs in fewer passes, against
the same work as written (F.mse_loss; nn.Linear then nn.ReLU under autograd)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from distnn.step import fusions
from tests.test_wholestep import assert_eager_autocast_gradients


def test_the_loss_with_rows_summed_first_is_the_sum_mse_loss():
    generator = torch.Generator().manual_seed(0)
    output, target = torch.randn(64, 10, generator=generator), torch.randn(64, 10,
                                                                            generator=generator)
    want = F.mse_loss(output, target, reduction="sum")
    assert fusions.mse_rows_first(output, target).item() == pytest.approx(want.item(), rel=1e-6)
    # bf16 outputs are compared in fp32, as autocast computes mse_loss
    half = output.bfloat16()
    got = fusions.mse_rows_first(half, target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(F.mse_loss(half.float(), target, reduction="sum").item(),
                                       rel=1e-6)
    # shapes it does not sum by rows (broadcasting, one dimension) are F.mse_loss's own
    vector = torch.randn(10, generator=generator)
    assert torch.equal(fusions.mse_rows_first(vector, vector * 2),
                       F.mse_loss(vector, vector * 2, reduction="sum"))


def test_only_a_plain_sum_mse_loss_is_rewritten():
    assert fusions.loss_in_one_pass(nn.MSELoss(reduction="sum")) is fusions.mse_rows_first
    hooked = nn.MSELoss(reduction="sum")
    hooked.register_forward_hook(lambda module, args, output: output * 2)
    for other in (nn.MSELoss(), nn.CrossEntropyLoss(reduction="sum"), hooked,
                  lambda output, target: (output - target).abs().sum()):
        assert fusions.loss_in_one_pass(other) is None


def test_linear_relu_in_one_call_gives_autograd_s_values_and_gradients():
    generator = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*shape, generator=generator, dtype=torch.float64,
                           requires_grad=True) for shape in ((16, 8), (5, 8), (5,)))
    assert torch.autograd.gradcheck(fusions.LinearReLU.apply, (x, w, b))
    got = fusions.LinearReLU.apply(x, w, b)
    want = F.relu(F.linear(x, w, b))
    assert torch.allclose(got, want)
    g = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad(got, (x, w, b), g),
                    torch.autograd.grad(want, (x, w, b), g), strict=True):
        assert torch.allclose(a, c)


def test_a_sequential_runs_with_its_linear_relu_pairs_fused_and_the_rest_as_written():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                          nn.Sequential(nn.Linear(16, 4)), nn.Tanh(), nn.Linear(4, 6), nn.ReLU())
    x = torch.randn(32, 8)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert fusions.relu_epilogues(model)
    assert torch.allclose(fusions.sequential_forward(model, tensors, x),
                          functional_call(model, tensors, (x,)), atol=1e-6)


def test_a_layer_placed_twice_runs_twice_and_a_frozen_linear_runs_as_written():
    """nn.Sequential runs a module placed twice twice (named_children lists it once); a
    frozen Linear's tensors are not among those the step differentiates, so it uses its own
    (as functional_call does with the names it is not given)."""
    torch.manual_seed(5)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 8), relu, nn.Linear(8, 4), relu, nn.Linear(4, 4),
                          nn.ReLU())
    model[4].requires_grad_(False)
    x = torch.randn(16, 4)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert fusions.relu_epilogues(model)
    got = fusions.sequential_forward(model, trained, x)
    assert torch.allclose(got, functional_call(model, trained, (x,)), atol=1e-6)
    assert torch.allclose(got, model(x), atol=1e-6)


def test_models_it_cannot_run_as_it_would_be_run_are_left_alone():
    class Own(nn.Sequential):
        pass

    hooked = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    hooked[0].register_forward_hook(lambda module, args, output: output * 2)
    shared = nn.Linear(4, 4)
    tied = nn.Sequential(shared, nn.ReLU(), shared)  # one weight read by two layers
    for model in (Own(nn.Linear(4, 4), nn.ReLU()), hooked, tied,
                  nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU()),
                  nn.Sequential(nn.ReLU(), nn.Linear(4, 4)), nn.Linear(4, 4)):
        assert not fusions.relu_epilogues(model)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        assert not fusions.relu_epilogues(plain)  # a hook on every module's forward
    finally:
        handle.remove()
    assert fusions.relu_epilogues(plain)


@pytest.mark.parametrize("fused", [True, False])
def test_the_bf16_whole_step_keeps_eager_autocast_s_gradients_fused_or_not(fused):
    """The compiled bf16 step of the reference's shape of model (Linear, ReLU, Linear, the sum
    MSE loss), with the fusions and without: eager autocast's loss and fp32 gradients, for
    one piece and four."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    step = assert_eager_autocast_gradients(model, in_features=32, out_features=8,
                                           fusions=fused)
    assert step._relu_epilogues is fused


def test_the_bf16_step_compiled_as_one_function_updates_as_eager_autocast_would():
    """Alone, with the reference program's update, the fused step is one compiled function (forward,
    backward, update, the bf16 copies' refresh): its loss and new weights are those of an
    eager autocast step followed by ``p -= lr * p.grad``."""
    from distnn.distributed.gradsync import FlatGradSync
    from distnn.step.wholestep import WholeStep

    generator = torch.Generator().manual_seed(6)
    x, y = torch.randn(64, 32, generator=generator), torch.randn(64, 8, generator=generator)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    eager = copy.deepcopy(model)
    loss_fn = nn.MSELoss(reduction="sum")
    sync = FlatGradSync(model, distributed=False, extra_slots=2)
    step = WholeStep(model, loss_fn, sync, lr=1e-3, bf16=True, optimizer=None)
    assert step._relu_epilogues and step._fused([(x, y)])
    for _ in range(3):
        loss, _ = step([(x, y)], torch.zeros(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = loss_fn(eager(x), y)
        eager.zero_grad()
        want.backward()
        with torch.no_grad():
            for p in eager.parameters():
                p -= 1e-3 * p.grad
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        for p, q in zip(model.parameters(), eager.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_a_bad_distnn_bf16_fusions_fails_the_run_in_one_line_with_exit_2(no_launcher,
                                                                         monkeypatch, capsys):
    from distnn.train import main

    monkeypatch.setenv("DISTNN_BF16_FUSIONS", "off")
    assert main(["--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "distnn: error: environment: DISTNN_BF16_FUSIONS='off'; allowed: 1"), err
