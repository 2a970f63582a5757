"""--tensorboard: rank 0 writes the records as TensorBoard scalars, read back here with
TensorBoard's own reader; a resumed run continues the curves without repeated steps."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from distnn.train import main
from tests.conftest import clean_env, read_metrics, run_cli

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard extra is not installed (make install installs it)")


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    reader = event_accumulator.EventAccumulator(str(directory))
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)]
            for tag in reader.Tags()["scalars"]}


def test_the_scalars_are_the_metrics_records(tmp_path, no_launcher):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=generator)
    save_file({"x": x, "y": (x[:, 0] > 0).long()}, tmp_path / "d.safetensors")
    save_file({"x": x[:10], "y": (x[:10, 0] > 0).long()}, tmp_path / "v.safetensors")
    assert main(["--data", str(tmp_path / "d.safetensors"), "--val-data",
                 str(tmp_path / "v.safetensors"), "--loss", "cross-entropy", "--optimizer",
                 "adamw", "--lr", "1e-2", "--batch-size", "10", "--epochs", "2", "--hidden",
                 "8", "--lr-schedule", "cosine", "--warmup-steps", "2", "--clip-grad-norm",
                 "1", "--metrics", str(tmp_path / "m.jsonl"), "--tensorboard",
                 str(tmp_path / "tb"), "--quiet"]) == 0
    records = read_metrics(tmp_path / "m.jsonl")
    steps = [r for r in records if "event" not in r]
    got = scalars(tmp_path / "tb")
    for key in ("loss", "lr", "grad_norm", "samples_per_s"):
        # drawn at the count of steps done: step s's record at s + 1
        assert got[f"train/{key}"] == [(r["step"] + 1, pytest.approx(r[key], rel=1e-6))
                                      for r in steps], key
    vals = [r for r in records if r.get("event") == "val"]
    assert [step for step, _ in got["val/loss"]] == [r["step"] for r in vals] == [4, 8]
    assert got["val/accuracy"][-1][1] == pytest.approx(vals[-1]["accuracy"])


def test_a_resumed_run_continues_the_curves_without_repeated_steps(tmp_path):
    """A run that goes back to an older checkpoint than its curves reach (its newer ones
    lost) purges what it is about to write again: each step once, the same values."""
    import shutil

    flags = [sys.executable, "-m", "distnn.train", "--steps", "12", "--hidden", "8",
             "--d-in", "6", "--checkpoint-every", "4", "--checkpoint-dir", str(tmp_path / "ck"),
             "--tensorboard", str(tmp_path / "tb"), "--log-every", "1", "--quiet"]
    assert run_cli(flags).returncode == 0
    first = scalars(tmp_path / "tb")["train/loss"]
    assert [step for step, _ in first] == list(range(1, 13))
    for step in (8, 12):
        shutil.rmtree(tmp_path / "ck" / f"step-{step}")
    assert run_cli(flags).returncode == 0  # resumes from step-4
    assert scalars(tmp_path / "tb")["train/loss"] == first  # steps 4 to 11 not twice


def test_a_missing_tensorboard_folder_that_cannot_be_made_is_one_line(tmp_path, no_launcher,
                                                                       capsys):
    (tmp_path / "file").write_text("")
    assert main(["--steps", "2", "--tensorboard", str(tmp_path / "file" / "tb")]) == 2
    assert "--tensorboard: cannot create" in capsys.readouterr().err


def test_a_resume_keeps_the_validation_at_its_checkpoint_and_a_new_run_starts_afresh(
        tmp_path):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=generator)
    save_file({"x": x, "y": x[:, :2].contiguous()}, tmp_path / "d.safetensors")
    flags = [sys.executable, "-m", "distnn.train", "--data", str(tmp_path / "d.safetensors"),
             "--val-data", str(tmp_path / "d.safetensors"), "--batch-size", "8", "--epochs",
             "3", "--hidden", "8", "--checkpoint-every", "5", "--checkpoint-dir",
             str(tmp_path / "ck"), "--tensorboard", str(tmp_path / "tb"), "--quiet"]
    assert run_cli(flags, env=clean_env(DISTNN_FAULT_STEP="7")).returncode == 1
    assert run_cli(flags).returncode == 0  # resumed from step-5, whose validation is kept
    got = scalars(tmp_path / "tb")
    assert [step for step, _ in got["val/loss"]] == [5, 10, 15]
    assert [step for step, _ in got["train/loss"]] == list(range(1, 16))
    (tmp_path / "ck2").mkdir()
    again = [*flags[:-5], "--checkpoint-dir", str(tmp_path / "ck2"), "--tensorboard",
             str(tmp_path / "tb"), "--quiet"]
    assert run_cli(again).returncode == 0  # a fresh run into the same folder
    assert [step for step, _ in scalars(tmp_path / "tb")["train/loss"]] == list(range(1, 16))


def test_a_tensorboard_folder_that_cannot_be_written_warns_and_the_run_finishes(tmp_path):
    result = run_cli([sys.executable, "-m", "distnn.train", "--steps", "40", "--hidden", "8",
                      "--d-in", "6", "--tensorboard", str(tmp_path / "tb"), "--log-every", "1",
                      "--quiet"],
                     env=clean_env(DISTNN_FAULT_STEP="3", DISTNN_FAULT_KIND="write-fail"))
    assert result.returncode == 0, result.stderr
    assert "could not write --tensorboard" in result.stderr and "Traceback" not in result.stderr


def test_tensorboard_naming_another_output_is_refused(tmp_path, no_launcher, capsys):
    path = str(tmp_path / "out")
    assert main(["--steps", "2", "--save", path, "--tensorboard", path]) == 2
    assert "--tensorboard: got" in capsys.readouterr().err
