"""python -m distnn.tools.bench_data: a tiny run writes both files with every table's rows, and
distnn's final loss does not change with the world size."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DistributedSampler

from distnn.tools.bench_data import (
    DDP_LOADER,
    DISTNN_FILE,
    DISTNN_MEMORY,
    ddp_last_batch,
    main,
    proc_kb,
    sampler_padding,
)


def test_tiny_run_writes_both_tables_and_distnn_agrees_across_world_sizes(tmp_path):
    assert main(["--out", str(tmp_path), "--parts", "world,speed",
                 "--worlds", "1,2", "--rows", "53", "--batch-size", "12", "--epochs", "2",
                 "--speed-rows", "64", "--speed-batch", "16", "--speed-d-in", "8",
                 "--speed-hidden", "8", "--speed-d-out", "2", "--speed-steps", "3",
                 "--speed-warmup", "1", "--rounds", "2"]) == 0
    report = json.loads((tmp_path / "bench-data.json").read_text())
    table = (tmp_path / "bench-data.md").read_text()
    assert "Machine: CPU " in table and f"torch {torch.__version__}" in table

    world = report["world"]
    assert [r["world_size"] for r in world["rows"]] == [1, 2]
    losses = [r["distnn_loss"] for r in world["rows"]]
    assert max(losses) - min(losses) <= 1e-5 * min(losses), losses
    assert world["relative_spread"]["distnn"] <= 1e-5
    assert all(r["ddp_loss"] > 0 and r["distnn_steps"] == r["ddp_steps"] == 10
               for r in world["rows"])
    for r in world["rows"]:
        assert f"| {r['world_size']} | 10 | 5 | {r['distnn_loss']:.9f} |" in table, table
    assert "| relative spread (max - min) / min |" in table

    speed = report["speed"]
    assert [r["variant"] for r in speed["rows"]] == [DISTNN_FILE, DISTNN_MEMORY, DDP_LOADER]
    assert all(r["runs"] == 2 and r["ms_per_step"] > 0 for r in speed["rows"])
    # the same rows in the same order: distnn from memory is distnn from the file, bitwise
    assert speed["rows"][1]["loss_rel_diff_vs_file"] == 0
    assert speed["rows"][2]["loss_rel_diff_vs_file"] < 1e-4  # DDP: the same batches
    for variant in (DISTNN_FILE, DISTNN_MEMORY, DDP_LOADER):
        assert f"| {variant} | " in table
    assert "File / memory: " in table
    assert "## 3. Memory" not in table and "memory" not in report


@pytest.mark.parametrize("rows, batch_size, world", [(53, 12, 1), (53, 12, 2), (1001, 96, 3),
                                                     (1001, 96, 4), (1000, 96, 4)])
def test_the_ddp_columns_are_what_distributed_sampler_does(rows, batch_size, world):
    per_rank = [list(DistributedSampler(range(rows), num_replicas=world, rank=rank, seed=0))
                for rank in range(world)]
    every = [index for shard in per_rank for index in shard]
    assert len(every) - rows == sampler_padding(rows, world)
    per_batch = batch_size // world
    last = [len(shard[(len(shard) - 1) // per_batch * per_batch:]) for shard in per_rank]
    assert sum(last) == ddp_last_batch(rows, batch_size, world)


def test_proc_kb_reads_status_and_smaps_rollup_fields():
    text = ("Name:\tpython\nVmHWM:\t  2048 kB\nRssAnon:\t   1024 kB\nThreads:\t4\n"
            "55d0-7ffc ---p 00000000 00:00 0   [rollup]\nPrivate_Dirty:     12 kB\n")
    assert proc_kb(text) == {"VmHWM": 2048, "RssAnon": 1024, "Private_Dirty": 12}
