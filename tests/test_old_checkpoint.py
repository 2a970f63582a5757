"""A checkpoint written before the package moved into subpackages (commit 8a7582f: a
one-rank AdamW run on a small data file, stopped after step 5 with step-4 written) resumes
after the move, and the resumed run ends as an uninterrupted run does: bit for bit on the
CPU that wrote it (an Intel Xeon with AVX-512), within rounding on another (an AMD EPYC with
AVX2 rounds the first 4 steps' sums otherwise: 1.5e-8 apart at the end). That a resume is
bit for bit on one machine is test_faults.py's test_resume_is_bitwise_an_uninterrupted_run."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distnn.train import main
from tests.conftest import read_losses

SAVED = Path(__file__).parent / "data" / "checkpoint-8a7582f"
FLAGS = ["--data", "train.safetensors", "--loss", "cross-entropy", "--optimizer", "adamw",
         "--lr", "1e-2", "--batch-size", "10", "--epochs", "2", "--hidden", "8",
         "--checkpoint-every", "2", "--keep-checkpoints", "1", "--quiet"]


def test_a_checkpoint_of_the_flat_layout_resumes_to_the_uninterrupted_result(
        tmp_path, no_launcher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(SAVED / "train.safetensors", tmp_path)
    shutil.copytree(SAVED / "ck", tmp_path / "ck")
    assert main([*FLAGS, "--checkpoint-dir", "ck", "--metrics", "resumed.jsonl",
                 "--save", "resumed.safetensors"]) == 0
    assert main([*FLAGS, "--checkpoint-dir", "fresh", "--metrics", "fresh.jsonl",
                 "--save", "fresh.safetensors"]) == 0
    resumed, fresh = read_losses(tmp_path / "resumed.jsonl"), read_losses(tmp_path / "fresh.jsonl")
    assert len(fresh) == 8  # resumed at step 4, as written:
    assert resumed == pytest.approx(fresh[4:], rel=1e-6)
    for name, tensor in load_file("fresh.safetensors").items():
        torch.testing.assert_close(load_file("resumed.safetensors")[name], tensor, rtol=1e-6,
                                   atol=1e-7, msg=name)
    assert sorted(path.name for path in (tmp_path / "ck").iterdir() if path.is_dir()) == ["step-8"]
