"""The benchmark runs every variant, checks their losses, and writes its three files."""

from __future__ import annotations

import json

import pytest

from distnn.bench import REFERENCE, main

pytest.importorskip("matplotlib")


def test_bench_smoke_run_writes_table_samples_and_plot(tmp_path, capsys):
    assert main(["--worlds", "1", "--workloads", "reference", "--repeats", "1", "--steps", "5",
                 "--warmup", "1", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "bench.md").read_text()
    for variant in ("reference loop", "reference loop, no per-step sync", "DDP", "Accelerate",
                    "distnn eager", "distnn --compile"):
        assert f"| reference | 1 | {variant} |" in table, table
    data = json.loads((tmp_path / "bench.json").read_text())
    assert all(sample["loss_ok"] for sample in data["samples"]), data["samples"]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "left out" not in capsys.readouterr().err


def test_flop_count_of_the_reference_workload():
    # forward 2*64*1000*100 + 2*64*100*10; backward 2*64*1000*100 + 4*64*100*10
    assert REFERENCE.flop_per_step == 4 * 64 * 1000 * 100 + 6 * 64 * 100 * 10
