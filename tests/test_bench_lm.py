"""python -m distnn.tools.bench_lm: a tiny run writes both files with the expected fields,
and the DDP loop's schedule and data are the recipe's."""

from __future__ import annotations

import json

import pytest
import torch

from distnn.step.schedule import Schedule
from distnn.tools.bench_lm import DDP, DISTNN, Recipe, cosine_with_warmup, main, token_data


def test_tiny_run_writes_the_table_and_every_sample(tmp_path):
    out = tmp_path / "results" / "bench-lm"
    assert main(["--out", str(out), "--rounds", "1", "--steps", "4", "--warmup", "1",
                 "--rows", "32", "--context", "8", "--d-model", "16", "--n-layers", "1",
                 "--batch-size", "8", "--warmup-steps", "2"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    table = out.with_suffix(".md").read_text()

    assert report["world_size"] == 2 and report["steps"] == 4 and report["rounds"] == 1
    assert report["tokens_per_step"] == 8 * 8
    assert report["machine"].startswith("CPU ") and report["torch"] == torch.__version__
    assert report["load_before"] is None or report["load_before"] >= 0
    assert [r["variant"] for r in report["rows"]] == [DISTNN, DDP]
    for row in report["rows"]:
        assert row["runs"] == 1 and row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
    assert [s["variant"] for s in report["samples"]] == [DISTNN, DDP]
    for sample in report["samples"]:
        assert sample["tokens_per_s"] == pytest.approx(64 * 4 / sample["wall_s"])
        assert isinstance(sample["cpu_ms_per_step"], float)  # 4 timed steps, 1 warm-up
    assert all(len(losses) == 4 for losses in report["losses"].values())
    # the same weights and rows: the first step's loss agrees up to rounding
    assert report["losses_agree"]
    assert report["rows"][0]["first_loss_rel_diff"] < 1e-4
    assert report["distnn_over_ddp"] > 0

    assert f"torch {torch.__version__}" in table
    assert f"| {DISTNN} | " in table and f"| {DDP} | " in table
    assert "distnn / DDP: " in table and "Losses: agree" in table


@pytest.mark.parametrize("warmup, total", [(10, 200), (3, 3), (0, 5)])
def test_the_ddp_schedule_is_distnns_cosine(warmup, total):
    schedule = Schedule("cosine", lr=3e-3, total=total, warmup=warmup)
    for step in range(total):
        assert cosine_with_warmup(step, warmup=warmup, total=total) == pytest.approx(
            schedule.factor(step), abs=1e-12)


def test_token_data_targets_are_the_next_tokens():
    recipe = Recipe(rows=16, context=12)
    x, y = token_data(recipe)
    assert x.shape == y.shape == (16, 12) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 0 <= int(x.min()) and int(y.max()) < recipe.vocab
    assert torch.equal(token_data(recipe)[0], x)  # seeded
