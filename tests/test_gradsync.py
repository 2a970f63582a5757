"""The flat buffers, in one process: without a process group, or in a real gloo group of one."""

from __future__ import annotations

import pytest
import torch

from distnn.gradsync import FlatGradSync
from tests.conftest import free_port


@pytest.fixture
def group_of_one():
    """A real gloo process group with this process as its only rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def small_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def plain_gradients(x: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of a separate copy of the model, by plain autograd, in sync.params order."""
    model = small_model()
    model(x).pow(2).sum().backward()
    return [p.grad for p in model.parameters()][::-1]


def test_parameters_are_views_and_the_gradients_are_views_after_all_reduce(group_of_one):
    model = small_model()
    sync = FlatGradSync(model, distributed=True)
    x = torch.randn(5, 4)
    sync.zero_grad()
    model(x).pow(2).sum().backward()
    sync.all_reduce()
    assert [id(p) for p in sync.params] == [id(p) for p in model.parameters()][::-1]
    offset = 0
    for p, want in zip(sync.params, plain_gradients(x), strict=True):  # backward's order
        assert p.data_ptr() == sync.flat_params[offset:].data_ptr()
        assert p.grad.data_ptr() == sync.flat_grads[offset:].data_ptr()
        assert torch.equal(p.grad, want)
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


def test_a_step_packs_only_its_own_gradients_and_extras():
    model = small_model()
    sync = FlatGradSync(model, distributed=False, extra_slots=2)
    grad_ptr = sync.flat_grads.data_ptr()
    model(torch.randn(2, 4)).pow(2).sum().backward()
    sync.all_reduce(torch.tensor(3.0), 1.0)
    sync.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    extras = sync.all_reduce(torch.tensor(7.0))  # the vote slot not given: zero
    assert sync.flat_grads.data_ptr() == grad_ptr
    assert extras.tolist() == [7.0, 0.0]
    for p, want in zip(sync.params, plain_gradients(x), strict=True):
        assert torch.equal(p.grad, want)  # not accumulated onto the first step's


def test_a_parameter_without_a_gradient_counts_as_zero(group_of_one):
    model = small_model()
    sync = FlatGradSync(model, distributed=True)
    sync.zero_grad()
    model[2](torch.randn(3, 3)).sum().backward()  # the first layer takes no part
    sync.all_reduce()
    assert not model[0].weight.grad.any() and not model[0].bias.grad.any()
    assert model[2].bias.grad.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("distributed", [False, True])
def test_a_step_without_zero_grad_is_an_error(distributed, request):
    if distributed:
        request.getfixturevalue("group_of_one")
    model = small_model()
    sync = FlatGradSync(model, distributed=distributed)
    sync.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    sync.all_reduce()
    model(torch.randn(2, 4)).sum().backward()  # no zero_grad: it adds to the last step's
    with pytest.raises(RuntimeError, match="called again without zero_grad"):
        sync.all_reduce()


def test_more_extras_than_slots_is_an_error():
    model = small_model()
    sync = FlatGradSync(model, distributed=False, extra_slots=1)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="2 extras given, but there are 1 extra slots"):
        sync.all_reduce(1.0, 2.0)


def test_mixed_dtypes_are_refused():
    model = small_model()
    model[2].double()
    with pytest.raises(ValueError, match="one dtype"):
        FlatGradSync(model, distributed=False)


def test_dropping_the_sync_frees_it_and_its_buffers_even_while_the_model_lives(group_of_one):
    import weakref

    model = small_model()
    sync = FlatGradSync(model, distributed=True, bucket_mb=1e-5)  # one bucket per parameter
    assert sync.buckets == 4  # so backward hooks start the buckets' all-reduces
    sync.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    sync.all_reduce()
    dropped = weakref.ref(sync)
    del sync  # no gc.collect(): reference counting alone must free it
    assert dropped() is None
    model(torch.randn(5, 4)).sum().backward()  # the model still trains; its old hooks are inert
    assert model[0].weight.grad is not None
