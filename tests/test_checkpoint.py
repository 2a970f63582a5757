"""Checkpoint files: atomic, verified, the newest good one found, incompatible ones refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distnn.checkpoint import (
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from distnn.config import TrainConfig, UsageError
from distnn.model import build_model

CONFIG = dataclasses.asdict(TrainConfig(d_in=6, hidden=(4,), d_out=2, batch_size=8))


def save(directory, step, keep=3):
    torch.manual_seed(step)
    model = build_model(6, [4], 2)
    save_checkpoint(str(directory), step=step, weights=model.state_dict(),
                    losses=torch.arange(step, dtype=torch.float32), keep=keep,
                    state={"config": CONFIG, "world_size": 2})
    return model


def test_round_trip_and_contents(tmp_path):
    model = save(tmp_path, 5)
    checkpoint = read_checkpoint(str(tmp_path / "step-5"))
    assert checkpoint.step == 5 and checkpoint.state["world_size"] == 2
    assert torch.equal(checkpoint.losses, torch.arange(5, dtype=torch.float32))
    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint.weights[name], tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]  # no temporary left


def test_only_the_newest_are_kept(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep=2)
    assert list_checkpoints(str(tmp_path)) == [30, 40]


def test_a_later_corrupt_folder_neither_counts_nor_goes(tmp_path):
    (tmp_path / "step-1000").mkdir()
    (tmp_path / "step-1000" / "state.json").write_text("{")
    for step in (10, 20, 30):
        save(tmp_path, step, keep=1)
    assert list_checkpoints(str(tmp_path)) == [30, 1000]
    assert latest_checkpoint(str(tmp_path))[0].step == 30


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_notice(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    weights = tmp_path / "step-20" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    checkpoint, notices = latest_checkpoint(str(tmp_path))
    assert checkpoint.step == 10
    assert len(notices) == 1 and "step-20" in notices[0] and "checksum" in notices[0]


@pytest.mark.parametrize("damage", ["no state", "bad json", "missing file"])
def test_partial_checkpoints_are_skipped(tmp_path, damage):
    save(tmp_path, 10)
    save(tmp_path, 20)
    newest = tmp_path / "step-20"
    if damage == "no state":
        (newest / "state.json").unlink()
    elif damage == "bad json":
        (newest / "state.json").write_text('{"step": 2')
    else:
        (newest / "losses.safetensors").unlink()
    checkpoint, notices = latest_checkpoint(str(tmp_path))
    assert checkpoint.step == 10 and len(notices) == 1


def test_temporary_folders_of_an_interrupted_write_are_not_checkpoints(tmp_path):
    save(tmp_path, 10)
    (tmp_path / ".step-20.tmp-abc").mkdir()
    assert list_checkpoints(str(tmp_path)) == [10]


def test_an_empty_or_missing_directory_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path)) == (None, [])
    assert latest_checkpoint(str(tmp_path / "absent")) == (None, [])


def test_a_checkpoint_of_other_shapes_or_data_is_refused(tmp_path):
    save(tmp_path, 10)
    checkpoint = read_checkpoint(str(tmp_path / "step-10"))
    check_compatible(checkpoint, {**CONFIG, "lr": 0.5, "steps": 99})  # may change
    with pytest.raises(UsageError) as info:
        check_compatible(checkpoint, {**CONFIG, "hidden": (5,), "seed": 1})
    assert "--hidden 4 (now 5)" in str(info.value) and "--seed 0 (now 1)" in str(info.value)


def test_state_json_records_checksums(tmp_path):
    save(tmp_path, 3)
    state = json.loads((tmp_path / "step-3" / "state.json").read_text())
    assert set(state["sha256"]) == {"weights.safetensors", "losses.safetensors"}
    assert state["step"] == 3 and state["config"]["hidden"] == [4]
