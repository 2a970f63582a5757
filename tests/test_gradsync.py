"""The flat buffers, in one process (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from distnn.gradsync import FlatGradSync


def small_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_parameters_and_gradients_are_views_into_the_buffers_after_backward():
    model = small_model()
    sync = FlatGradSync(model, distributed=False)
    sync.zero_grad()
    model(torch.randn(5, 4)).pow(2).sum().backward()
    assert [id(p) for p in sync.params] == [id(p) for p in model.parameters()][::-1]
    offset = 0
    for p in sync.params:  # in the order backward produces their gradients
        assert p.data_ptr() == sync.flat_params[offset:].data_ptr()
        assert p.grad.data_ptr() == sync.flat_grads[offset:].data_ptr()
        assert torch.equal(p.grad.reshape(-1), sync.flat_grads[offset:offset + p.numel()])
        offset += p.numel()
    assert offset == sync.numel == 4 * 3 + 3 + 3 * 2 + 2


def test_one_step_equals_the_per_parameter_update():
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    plain, flat = small_model(), small_model()
    loss_fn = torch.nn.MSELoss(reduction="sum")

    plain_loss = loss_fn(plain(x), y)
    plain.zero_grad()
    plain_loss.backward()
    with torch.no_grad():
        for p in plain.parameters():
            p -= 0.01 * p.grad

    sync = FlatGradSync(flat, distributed=False)
    sync.zero_grad()
    flat_loss = loss_fn(flat(x), y)
    flat_loss.backward()
    global_loss = sync.all_reduce(flat_loss)[0]
    sync.sgd_step(0.01)

    assert global_loss.item() == plain_loss.item()
    pairs = zip(plain.state_dict().items(), flat.state_dict().values(), strict=True)
    for (name, want), got in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=name)


def test_zero_grad_clears_gradients_and_loss_slot_in_place():
    model = small_model()
    sync = FlatGradSync(model, distributed=False)
    grad_ptr = sync.flat_grads.data_ptr()
    model(torch.randn(2, 4)).sum().backward()
    sync.all_reduce(torch.tensor(3.0))
    sync.zero_grad()
    assert sync.flat_grads.data_ptr() == grad_ptr
    assert not sync.flat_grads.any()


def test_mixed_dtypes_are_refused():
    model = small_model()
    model[2].double()
    with pytest.raises(ValueError, match="one dtype"):
        FlatGradSync(model, distributed=False)
