"""--tensorboard: rank 0 writes the records as TensorBoard scalars, read back here with
TensorBoard's own reader; a resumed run continues the curves without repeated steps."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from distnn.train import main
from tests.conftest import read_metrics, run_cli

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
        assert got[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6))
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
    assert [step for step, _ in first] == list(range(12))
    for step in (8, 12):
        shutil.rmtree(tmp_path / "ck" / f"step-{step}")
    assert run_cli(flags).returncode == 0  # resumes from step-4
    assert scalars(tmp_path / "tb")["train/loss"] == first  # steps 4 to 11 not twice


def test_a_missing_tensorboard_folder_that_cannot_be_made_is_one_line(tmp_path, no_launcher,
                                                                       capsys):
    (tmp_path / "file").write_text("")
    assert main(["--steps", "2", "--tensorboard", str(tmp_path / "file" / "tb")]) == 2
    assert "--tensorboard: cannot create" in capsys.readouterr().err
