"""python -m distnn.tools.bench_shard: a tiny run of both parts writes both files with every
rank's memory by phase and the timed variants; the pure parts (the step line, the model
state count, the table's rows) checked directly."""

from __future__ import annotations

import json

import pytest
import torch

from distnn.tools.bench_shard import (
    COMPILED,
    END,
    STARTUP,
    STEP_LINE,
    STEPS,
    TORCH_FSDP,
    GPTShape,
    main,
    memory_rows,
    model_state_bytes,
    speed_variants,
    summarize_speed,
)


def test_tiny_run_writes_the_tables_and_every_sample(tmp_path):
    out = tmp_path / "results" / "bench-shard"
    assert main(["--out", str(out), "--modes", "none,parameters", "--mmap-modes", "",
                 "--floor-modes", "", "--context", "8", "--memory-world", "2",
                 "--memory-d-model", "16", "--memory-layers", "2", "--memory-heads", "2",
                 "--memory-steps", "2", "--speed-d-model", "16", "--speed-layers", "2",
                 "--speed-heads", "2", "--speed-steps", "2", "--speed-warmup", "1",
                 "--rounds", "1"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    table = out.with_suffix(".md").read_text()

    assert report["machine"].startswith("CPU ") and report["torch"] == torch.__version__
    memory = report["memory"]
    assert [(r["label"], r["mode"]) for r in memory["runs"]] == [("model", "none"),
                                                                   ("model", "parameters")]
    for run in memory["runs"]:
        assert run["exit_code"] == 0 and len(run["losses"]) == 2
        assert sorted(run["peaks_kb"]) == ["0", "1"]  # every rank, by its RANK
        for rank in run["peaks_kb"].values():
            assert rank[STARTUP]["private_kb"] > 50_000  # torch alone is more
    rows = {r["mode"]: r for r in memory["rows"]}
    assert rows["none"]["steps_over_none"] in (None, 1.0)
    assert rows["parameters"]["loss_rel_diff_vs_none"] < 1e-5

    speed = report["speed"]
    assert [r["variant"] for r in speed["rows"]] == ["distnn --shard none",
                                                     "distnn --shard parameters", TORCH_FSDP]
    assert speed["losses_agree"]
    for row in speed["rows"]:
        assert row["runs"] == 1 and row["ms_per_step"] > 0
    assert "## Memory" in table and "## Speed" in table
    assert f"| {TORCH_FSDP} | " in table and "Losses: agree" in table


def test_the_step_line_is_distnn_trains():
    assert STEP_LINE.match("0 369.6885986328125")[2] == "369.6885986328125"
    assert STEP_LINE.match("12 1.5e-05")[1] == "12"
    assert not STEP_LINE.match("summary: world_size=2 steps=3")


def test_model_state_follows_the_sharding_doc():
    assert model_state_bytes(1000, "none", 4) == 16000
    assert model_state_bytes(1000, "optimizer", 4) == 1000 * (8 + 2)
    assert model_state_bytes(1000, "gradients", 4) == model_state_bytes(1000, "parameters",
                                                                         4) == 4000


def test_the_gpt_shape_counts_without_allocating():
    shape = GPTShape(32, 2, 4, context=16, vocab=256)
    assert shape.parameters == sum(p.numel() for p in shape.build().parameters())


def _run(label: str, mode: str, peaks_mb: dict[str, list[int]], losses=(3.0, 2.0),
         allocator: str = "default") -> dict:
    by_rank = {str(rank): {phase: {"private_kb": values[rank] * 1000, "rss_kb": 0}
                           for phase, values in peaks_mb.items()}
               for rank in range(len(next(iter(peaks_mb.values()))))}
    return {"label": label, "mode": mode, "allocator": allocator, "exit_code": 0,
            "parameters": 1000, "world_size": 2, "peaks_kb": by_rank, "losses": list(losses),
            "launch_to_first_step_s": 1.0, "steps_wall_s": 1.0}


def test_rows_take_the_worst_rank_and_the_ratios_to_none():
    runs = [_run("model", "none", {STARTUP: [500, 400], STEPS: [1000, 1200], END: [9, 9]}),
            _run("model", "parameters", {STARTUP: [700, 600], STEPS: [600, 500]},
                 losses=(3.0, 2.002)),
            _run("floor", "none", {STARTUP: [200, 200], STEPS: [200, 200]})]
    rows = {r["mode"]: r for r in memory_rows(runs)}
    kb = 1024 / 1e6  # the records are in kB (1024 bytes), the rows in MB
    assert rows["none"]["steps_private_mb"] == pytest.approx(1_200_000 * kb)
    assert rows["parameters"]["steps_over_none"] == pytest.approx(600 / 1200)
    assert rows["parameters"]["floor_mode"] == "none"  # no floor of its own: none's
    assert rows["parameters"]["above_floor_over_none"] == pytest.approx(400 / 1000)
    assert rows["parameters"]["startup_private_mb"] == pytest.approx(700_000 * kb)
    assert rows["parameters"]["end_private_mb"] == 0  # not sampled in that phase
    assert rows["parameters"]["loss_rel_diff_vs_none"] == pytest.approx(0.001)


def test_compiled_variants_are_set_against_the_compiled_loop():
    variants = speed_variants(["parameters"], compiled=True)
    assert variants == ("distnn --shard parameters", TORCH_FSDP,
                        f"distnn --shard parameters --compile{COMPILED}",
                        f"{TORCH_FSDP}{COMPILED}")
    times = dict(zip(variants, (30.0, 40.0, 10.0, 20.0), strict=True))
    samples = [{"variant": name, "round": 0, "ms_per_step": ms, "cpu_ms_per_step": ms,
                "losses": [1.0, 0.5]} for name, ms in times.items()]
    rows = {r["variant"]: r for r in summarize_speed(samples, variants)["rows"]}
    assert rows["distnn --shard parameters"]["over_torch"] == 0.75  # 30 / 40
    assert rows[variants[2]]["over_torch"] == 0.5  # 10 / 20, the compiled loop's
    assert rows[variants[3]]["over_torch"] == 1.0
