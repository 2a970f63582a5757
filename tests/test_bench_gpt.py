"""python -m distnn.tools.bench_gpt on the CPU: a tiny GPT through both variants writes the
table; the same first loss (the same weights and rows, fp32); MFU is nanoGPT's arithmetic."""

from __future__ import annotations

import json

import pytest

from distnn.models.gpt import build
from distnn.tools.bench_gpt import DISTNN, PLAIN, flops_per_token, main

TINY = ["--device", "cpu", "--precision", "fp32", "--no-compile", "--n-layers", "2",
        "--d-model", "32", "--n-heads", "2", "--context", "16", "--vocab", "64",
        "--batch-size", "4", "--rows", "16", "--steps", "4", "--rounds", "2"]


def test_a_tiny_run_of_both_variants_writes_the_table_with_mfu(tmp_path):
    out = tmp_path / "bench-gpt"
    assert main(["--out", str(out), *TINY, "--peak-tflops", "0.5"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {PLAIN, DISTNN}
    assert rows[DISTNN]["first_loss"] == pytest.approx(rows[PLAIN]["first_loss"], rel=1e-5)
    for row in rows.values():
        assert row["tokens_per_s"] > 0
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * report["flops_per_token"]
                                           / 0.5e12)
    assert len(report["samples"]) == 4  # 2 rounds of 2 variants
    assert "| distnn.fit |" in out.with_suffix(".md").read_text()


def test_flops_per_token_is_six_n_plus_the_attention_term():
    model = build(d_in=16, d_out=64, d_model=32, n_layers=2, n_heads=2)
    n = sum(p.numel() for p in model.parameters()) - 16 * 32  # less the position table
    assert flops_per_token(model, n_layers=2, d_model=32, context=16) == 6 * n + 12 * 2 * 32 * 16


def test_rows_that_are_not_whole_batches_are_refused(capsys, tmp_path):
    assert main(["--out", str(tmp_path / "x"), *TINY, "--rows", "18"]) == 2
    assert capsys.readouterr().err.startswith("distnn: error: got --steps 4")


def test_under_torchrun_distnn_runs_in_a_world_of_one_and_the_budget_ends_the_rounds(tmp_path):
    """torchrun --nproc_per_node=1 (gloo on the CPU; NCCL on a GPU, as make gpu-check runs
    it): distnn.fit joins that world of one; --budget-s 0 leaves one round of three."""
    from tests.conftest import bin_path, clean_env, run_cli

    out = tmp_path / "bench-gpt"
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=1", "-m",
                      "distnn.tools.bench_gpt", "--out", str(out), *TINY, "--rounds", "3",
                      "--budget-s", "0"], env=clean_env(), timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--budget-s 0 reached: 1 of 3 rounds" in result.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["backend"] == "gloo" and report["rounds_done"] == 1
    assert len(report["samples"]) == 2
    assert "1 round of 4 steps" in out.with_suffix(".md").read_text()
