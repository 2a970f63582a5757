"""Sharding bounds and the data contract."""

from __future__ import annotations

import pytest
import torch

from distnn.config import TrainConfig
from distnn.data.shards import reference_setup, shard_bounds


@pytest.mark.parametrize("total", [0, 1, 3, 7, 64, 65])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
def test_shards_are_contiguous_cover_the_batch_and_differ_by_at_most_one(total, world_size):
    bounds = [shard_bounds(total, world_size, rank) for rank in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        assert stop == start
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 0


def test_batch_of_three_on_four_ranks_leaves_the_last_empty():
    assert [shard_bounds(3, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]


@pytest.mark.parametrize("args", [(5, 0, 0), (5, 2, 2), (5, 2, -1), (-1, 2, 0)])
def test_invalid_shard_requests_raise(args):
    with pytest.raises(ValueError):
        shard_bounds(*args)


def test_reference_setup_draws_what_the_reference_program_draws():
    x, y, model = reference_setup(TrainConfig(seed=5, batch_size=4, d_in=6, hidden=(3,), d_out=2))
    torch.manual_seed(5)
    want_x, want_y = torch.randn(4, 6), torch.randn(4, 2)
    want_model = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    for name, tensor in want_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
