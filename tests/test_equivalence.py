"""The distributed result equals the single-process reference, over real gloo process groups."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_world
from tests.reference import assert_matches_reference


def assert_replicas_identical(weights: list[dict[str, torch.Tensor]]) -> None:
    for rank, state in enumerate(weights[1:], start=1):
        for name, tensor in state.items():
            assert torch.equal(tensor, weights[0][name]), f"rank {rank} {name} differs from rank 0"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_world_sizes_match_the_reference(world_size, tmp_path):
    result = run_world(world_size, [], tmp_path)
    assert_matches_reference(result["losses"], result["weights"][0])
    assert_replicas_identical(result["weights"])


def test_batch_smaller_than_world_trains_like_one_process(tmp_path):
    # 3 rows on 4 ranks: shards of 1, 1, 1 and 0 rows.
    result = run_world(4, ["--batch-size", "3", "--steps", "200"], tmp_path)
    assert_matches_reference(result["losses"], result["weights"][0], batch_size=3, steps=200)
    assert_replicas_identical(result["weights"])


def test_uneven_shards_and_other_sizes_match(tmp_path):
    argv = ["--batch-size", "7", "--d-in", "13", "--hidden", "5", "--d-out", "3",
            "--steps", "300", "--lr", "1e-3", "--seed", "11"]
    result = run_world(3, argv, tmp_path)  # shards of 3, 2 and 2 rows
    assert_matches_reference(result["losses"], result["weights"][0], batch_size=7, d_in=13,
                             hidden=(5,), d_out=3, steps=300, lr=1e-3, seed=11)
    assert_replicas_identical(result["weights"])


def test_same_world_size_is_bitwise_reproducible(tmp_path):
    first = run_world(2, ["--steps", "100"], tmp_path / "a")
    second = run_world(2, ["--steps", "100"], tmp_path / "b")
    assert first["losses"] == second["losses"]
    for name, tensor in first["weights"][0].items():
        assert torch.equal(tensor, second["weights"][0][name]), name
