"""Checkpoint files: atomic, verified, the newest good one found, incompatible ones refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from distnn.config import TrainConfig
from distnn.errors import UsageError
from distnn.job.model import build_model
from distnn.resilience.checkpoint import (
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from distnn.train import main

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


def _edit_state(folder, edit):
    path = folder / "state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps(edit(state)))


def _resaved_losses(folder, losses):
    # a losses file of another shape, with its checksum brought up to date (as an edit would)
    save_file({"loss": losses}, folder / "losses.safetensors")
    digest = hashlib.sha256((folder / "losses.safetensors").read_bytes()).hexdigest()
    return lambda state: {**state, "sha256": {**state["sha256"], "losses.safetensors": digest}}


# state.json has no checksum of its own: what an edit or a damaged write can leave in it
STATE_DAMAGE = {
    "a list": (lambda state: [], "state.json holds a list, not an object"),
    "null": (lambda state: None, "state.json holds a NoneType"),
    "config a list": (lambda state: {**state, "config": []}, "state.json's 'config' is []"),
    "val a number": (lambda state: {**state, "val": 5}, "state.json's 'val' is 5"),
    "val of numbers": (lambda state: {**state, "val": [1]}, "other things than validation"),
    "objects text": (lambda state: {**state, "objects": "x"}, "state.json's 'objects' is \"x\""),
    "step a float": (lambda state: {**state, "step": 20.7}, "state.json's 'step' is 20.7"),
    "step true": (lambda state: {**state, "step": True}, "state.json's 'step' is true"),
    "step not the folder's": (lambda state: {**state, "step": 25},
                              "state.json's step 25 is not the folder's"),
    "world size text": (lambda state: {**state, "world_size": "x"}, "'world_size' is \"x\""),
    "a file outside": (lambda state: {**state, "sha256": {**state["sha256"], "../x": "0"}},
                       "state.json lists \"../x\", not a file of the checkpoint"),
    "an endless file": (lambda state: {**state, "sha256": {**state["sha256"],
                                                            "/dev/zero": "0"}},
                        "state.json lists \"/dev/zero\", not a file of the checkpoint"),
}


@pytest.mark.parametrize("damage", sorted(STATE_DAMAGE))
def test_a_state_json_distnn_could_not_have_written_is_skipped(tmp_path, damage):
    save(tmp_path, 10)
    save(tmp_path, 20)
    edit, words = STATE_DAMAGE[damage]
    _edit_state(tmp_path / "step-20", edit)
    checkpoint, notices = latest_checkpoint(str(tmp_path))
    assert checkpoint.step == 10 and len(notices) == 1, notices
    assert words in notices[0], notices[0]


def test_losses_of_another_shape_or_a_fifo_listed_are_skipped(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    newest = tmp_path / "step-20"
    _edit_state(newest, _resaved_losses(newest, torch.zeros(4, 5)))
    assert latest_checkpoint(str(tmp_path))[1] == [
        f"checkpoint {newest} is corrupt or partial (holds losses of shape [4, 5] and dtype "
        "float32 for 20 steps); skipping it"]
    save(tmp_path, 20)
    os.mkfifo(newest / "pipe")  # read, it would never end
    _edit_state(newest, lambda state: {**state, "sha256": {**state["sha256"], "pipe": "0"}})
    checkpoint, notices = latest_checkpoint(str(tmp_path))
    assert checkpoint.step == 10 and "pipe is not a regular file" in notices[0], notices


def test_files_that_are_links_to_regular_files_are_read_through(tmp_path):
    # as git-annex or a DVC cache leave them
    save(tmp_path, 10)
    store = tmp_path / "store"
    store.mkdir()
    weights = tmp_path / "step-10" / "weights.safetensors"
    weights.rename(store / "w")
    weights.symlink_to(store / "w")
    assert latest_checkpoint(str(tmp_path))[0].step == 10


def test_a_step_folder_of_another_spelling_is_no_checkpoint(tmp_path):
    save(tmp_path, 10)
    shutil.copytree(tmp_path / "step-10", tmp_path / "step-030")  # no step's name
    assert list_checkpoints(str(tmp_path)) == [10]


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
    _edit_state(tmp_path / "step-10",
                lambda state: {**state, "config": {**state["config"], "seed": "0"}})
    with pytest.raises(UsageError, match=re.escape('--seed "0" (now 0)')):  # not "0 (now 0)"
        check_compatible(read_checkpoint(str(tmp_path / "step-10")), CONFIG)


def test_state_json_records_checksums(tmp_path):
    save(tmp_path, 3)
    state = json.loads((tmp_path / "step-3" / "state.json").read_text())
    assert set(state["sha256"]) == {"weights.safetensors", "losses.safetensors"}
    assert state["step"] == 3 and state["config"]["hidden"] == [4]


@pytest.fixture(scope="module")
def a_finished_run(tmp_path_factory):
    """A 6-step run on a 12-row file, checkpointed at steps 3 and 6."""
    folder = tmp_path_factory.mktemp("run")
    generator = torch.Generator().manual_seed(0)
    for name, rows in (("d.safetensors", 12), ("more.safetensors", 16)):
        save_file({"x": torch.randn(rows, 3, generator=generator),
                   "y": torch.randn(rows, 2, generator=generator)}, folder / name)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            patch.delenv(name, raising=False)
        assert main(flags(folder, folder / "ck")) == 0
    return folder


def flags(folder, ck, **change):
    """The run's flags, with ``change`` (``batch_size="6"``; True: a switch; None: left out)."""
    given = {"data": str(folder / "d.safetensors"), "batch_size": "4", "steps": "6",
             "hidden": "4", "checkpoint_every": "3", "checkpoint_dir": str(ck), "quiet": True,
             **change}
    argv = []
    for name, value in given.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", *([] if value is True else [value])]
    return argv


@pytest.mark.parametrize("change, words", [
    ({"batch_size": "6"}, "made with --batch-size 4 (now 6)"),
    ({"hidden": "5"}, "made with --hidden 4 (now 5)"),
    ({"model": "tests.user_models:small_mlp", "hidden": None},
     "made with --hidden 4 (now none), --model none (now tests.user_models:small_mlp)"),
    ({"seed": "1"}, "made with --seed 0 (now 1)"),
    ({"no_shuffle": True}, "made with --no-shuffle off (now on)"),
    ({"drop_last": True}, "made with --drop-last off (now on)"),
    ({"optimizer": "momentum"}, "made with --optimizer sgd (now momentum)"),
    ({"data": "more.safetensors"}, "was made on 12 rows of data and this run has 16"),
    ({"steps": "2"}, "--steps: got 2 but"),
])
def test_a_resume_that_changes_what_the_checkpoint_recorded_is_refused(
        a_finished_run, tmp_path, capsys, no_launcher, change, words):
    shutil.copytree(a_finished_run / "ck", tmp_path / "ck")
    if "data" in change:
        change["data"] = str(a_finished_run / change["data"])
    assert main(flags(a_finished_run, tmp_path / "ck", **change)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and words in lines[0], lines


@pytest.mark.parametrize("extra, kept", [
    (["--keep-checkpoints", "2"], ["step-6", "step-8"]),  # and step-8 is the end
    (["--checkpoint-every", "0"], ["step-8"]),  # only at the end
])
def test_the_command_line_keeps_the_checkpoints_it_is_told_to(a_finished_run, tmp_path,
                                                               no_launcher, extra, kept):
    given = flags(a_finished_run, tmp_path / "ck", steps="8", checkpoint_every="2")
    assert main([*given, *extra]) == 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("step-")) \
        == kept


@pytest.mark.parametrize("entry", ["a link to itself", "a file", "a folder"])
def test_what_stands_at_a_step_s_name_is_replaced_by_its_checkpoint(tmp_path, entry):
    # a corrupt entry skipped at the resume must not block the write of that step
    path = tmp_path / "step-9"
    if entry == "a link to itself":
        path.symlink_to("step-9")
    elif entry == "a file":
        path.write_text("not a checkpoint")
    else:
        path.mkdir()
        (path / "state.json").write_text("{")
    assert latest_checkpoint(str(tmp_path))[0] is None
    save(tmp_path, 9)
    assert read_checkpoint(str(path)).step == 9
