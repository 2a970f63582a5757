"""The flat buffers, in one process (without a process group, or in a real gloo group of one)
and in two real gloo ranks whose forward passes skip layers."""

from __future__ import annotations

import copy
import os
from datetime import timedelta

import pytest
import torch

from distnn.distributed.gradsync import ALIGN, FlatGradSync
from tests.conftest import free_port, start_ranks


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
    # backward's order, each parameter at the next multiple of ALIGN elements: 2, 6, 3, 12
    assert sync.offsets == [0, ALIGN, 2 * ALIGN, 3 * ALIGN] and sync.numel == 4 * ALIGN
    used = torch.zeros(sync.numel, dtype=torch.bool)
    for p, want, first in zip(sync.params, plain_gradients(x), sync.offsets, strict=True):
        assert p.data_ptr() == sync.flat_params[first:].data_ptr()
        assert p.grad.data_ptr() == sync.flat_grads[first:].data_ptr()
        assert torch.equal(p.grad, want)
        used[first:first + p.numel()] = True
    # the gaps between the parameters hold zeros, in the weights and in the summed gradients
    assert not sync.flat_params[~used].any() and not sync.flat_grads[:sync.numel][~used].any()


def test_every_parameter_starts_aligned_in_the_buffers(group_of_one):
    # Packed end to end, the reference net's first weight started 4440 bytes into the
    # buffer; GPU kernels take their slow, unvectorised path for a tensor not on 16 bytes.
    model = torch.nn.Sequential(torch.nn.Linear(1000, 100), torch.nn.ReLU(),
                                torch.nn.Linear(100, 10))
    before = [p.detach().clone() for p in model.parameters()]
    sync = FlatGradSync(model, distributed=True, extra_slots=2)
    base = sync.flat_params.data_ptr()
    for p in sync.params:
        assert (p.data_ptr() - base) % (ALIGN * p.element_size()) == 0
    assert all(torch.equal(p, want) for p, want in zip(model.parameters(), before, strict=True))
    assert sync.flat_grads.numel() == sync.numel + 2 and sync.numel % ALIGN == 0


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


def test_backward_tensors_are_let_go_as_each_bucket_starts(group_of_one):
    # A large model's gradients must not exist twice through backward: once a bucket's
    # all-reduce starts, its parameters' p.grad are views into the buffer (backward's own
    # tensors, held by nothing else, are freed); the last bucket's follow in all_reduce.
    model = small_model()
    x = torch.randn(5, 4)
    sync = FlatGradSync(model, distributed=True, bucket_mb=1e-5)  # one bucket per parameter
    sync.zero_grad()
    model(x).pow(2).sum().backward()

    def in_buffer(p: torch.nn.Parameter, first: int) -> bool:
        return p.grad.data_ptr() == sync.flat_grads[first:].data_ptr()

    *started, last = zip(sync.params, sync.offsets, strict=True)
    assert all(in_buffer(p, first) for p, first in started)
    assert not in_buffer(*last)  # not packed yet: the extras join it in all_reduce
    sync.all_reduce()
    assert in_buffer(*last)
    for p, want in zip(sync.params, plain_gradients(x), strict=True):
        assert torch.equal(p.grad, want)


# Two ranks, four equal layers, one bucket per layer: the ranks' control flow differs.
WIDTH, LAYERS = 32, 4
LAYER_MB = (WIDTH * WIDTH + WIDTH) * 4 / 2**20  # one layer's weight and bias, float32


class SkipNet(torch.nn.Module):
    """Equal layers, any of which a forward pass may skip (data- or rank-dependent flow)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, skip: set[int]) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            if index not in skip:
                x = torch.tanh(layer(x))
        return x


def _skip_worker(rank: int, port: int, steps: list[dict[int, set[int]]], out_dir: str) -> None:
    """Runs ``steps`` (each: the layers each rank skips) through FlatGradSync and, on a plain
    copy of the model, through plain autograd; saves both gradients of every step."""
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    try:
        model = SkipNet()
        plain = copy.deepcopy(model)
        sync = FlatGradSync(model, distributed=True, bucket_mb=LAYER_MB)
        assert sync.buckets >= LAYERS and not sync.via_root  # hooks start all but the last
        results = []
        for step, skips in enumerate(steps):
            skip = skips.get(rank, set())
            torch.manual_seed(100 * step + rank)
            x = torch.randn(8, WIDTH)
            sync.zero_grad()
            model(x, skip).pow(2).sum().backward()
            started = len(sync._handles)  # by backward's hooks, overlapping with it
            sync.all_reduce()
            plain.zero_grad(set_to_none=True)
            plain(x, skip).pow(2).sum().backward()
            results.append({
                "started": started,
                "synced": {n: None if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters()},
                "local": {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                          for n, p in plain.named_parameters()},
            })
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_skipping(tmp_path, steps: list[dict[int, set[int]]]) -> list[dict]:
    """Checks each step's gradients after all_reduce on both ranks against the sum of the
    ranks' plain ones; returns rank 0's results."""
    start_ranks(_skip_worker, (free_port(), steps, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    checked = []
    for step, (r0, r1) in enumerate(zip(*ranks, strict=True)):
        for name, want in r0["local"].items():
            want = want + r1["local"][name]
            for rank, got in enumerate((r0["synced"][name], r1["synced"][name])):
                assert got is not None, f"step {step}, rank {rank}: {name} has no gradient"
                off = (got - want).abs().max().item()
                assert off <= 1e-6, f"step {step}, rank {rank}: {name} is off by {off:g}"
        checked.append({"synced": r0["synced"], "started": [r0["started"], r1["started"]]})
    return checked


def test_buckets_start_in_one_order_when_one_rank_skips_a_layer(tmp_path):
    # Buckets hold the layers last first: rank 1 skipping layer 2 leaves bucket 1 unready while
    # bucket 2 (layer 1) becomes ready; started as ready, it would meet rank 0's bucket 1.
    # The second step, with every layer used, checks that zero_grad resets the order.
    steps = run_skipping(tmp_path, [{1: {2}}, {}])
    # Before all_reduce(): rank 1's buckets 1 and 2 waited (the overlap this costs); with
    # every layer used, backward started all but the last, on both ranks.
    assert [step["started"] for step in steps] == [[LAYERS - 1, 1], [LAYERS - 1, LAYERS - 1]]


def test_buckets_start_in_one_order_when_the_ranks_skip_different_layers(tmp_path):
    # Rank 0 skips layer 1 and rank 1 layer 2: each rank has a bucket ready the other lacks.
    run_skipping(tmp_path, [{0: {1}, 1: {2}}, {0: {2}, 1: {1}}])


def test_a_parameter_no_rank_uses_gets_a_zero_gradient(tmp_path):
    # The first step fills every slot of the buffers; in the second no rank uses layer 1.
    steps = run_skipping(tmp_path, [{}, {0: {1}, 1: {1}}])
    assert steps[0]["synced"]["layers.1.weight"].any()
    for name in ("layers.1.weight", "layers.1.bias"):
        assert not steps[1]["synced"][name].any(), name  # zero, and not None (checked)
