"""The benchmark runs every variant, checks their losses, and writes its three files."""

from __future__ import annotations

import json

import pytest
import torch

from distnn.tools.bench import REFERENCE, main

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the graph fails")
def test_a_failing_variant_costs_its_own_row_not_the_run(tmp_path, capsys):
    # --cuda-graph on the CPU is refused by the trainer; the run goes on and exits 1.
    assert main(["--worlds", "1", "--workloads", "reference", "--repeats", "2", "--steps", "5",
                 "--warmup", "1", "--variant", "distnn --cuda-graph", "--variant",
                 "distnn eager", "--out", str(tmp_path)]) == 1
    table = (tmp_path / "bench.md").read_text()
    assert ("| reference | 1 | distnn --cuda-graph | failed (2 of 2 runs): UsageError: "
            "--cuda-graph: this rank computes on the CPU") in table, table
    assert "| reference | 1 | distnn eager | " in table
    assert "| reference | 1 | reference loop" not in table  # only the chosen variants ran
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {s["variant"] for s in data["samples"]} == {"distnn --cuda-graph", "distnn eager"}
    err = capsys.readouterr().err
    assert "distnn: error: distnn --cuda-graph (world 1, reference) failed: UsageError" in err


def test_budget_ends_the_rounds_early_with_every_workload_measured(tmp_path, capfd):
    assert main(["--worlds", "1", "--workloads", "reference,compute", "--repeats", "3",
                 "--steps", "3", "--compute-steps", "1", "--warmup", "1", "--budget-s", "0",
                 "--threads", "1", "--variant", "distnn eager", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert sorted((s["workload"], s["repeat"]) for s in data["samples"]) == [
        ("compute", 0), ("reference", 0)]
    header = (tmp_path / "bench.md").read_text().splitlines()[0]
    assert "threads per rank: 1 at world 1" in header and "rounds: 1;" in header, header
    assert "timed steps: reference 3, compute 1." in header, header
    err = capfd.readouterr().err  # the worker's
    assert "--budget-s 0 reached, so 1 of 3 rounds" in err
    assert "world size 1, round 1, compute, distnn eager: " in err  # a line per sample
    assert "world size 1, round 2" not in err


def test_flop_count_of_a_deeper_net_counts_no_input_gradient_for_the_first_layer():
    from distnn.tools.workload import Workload

    net = Workload("t", 1, 2, (3, 4), 5, 1e-4)  # Linear(2,3), Linear(3,4), Linear(4,5)
    forward = weights = 2 * (2 * 3 + 3 * 4 + 4 * 5)
    inputs = 2 * (3 * 4 + 4 * 5)
    assert net.flop_per_step == forward + weights + inputs


def test_flop_count_is_what_autograd_runs_and_what_the_matmul_floor_times():
    # Independent of the formula: count the FLOPs of a real step (forward, sum loss,
    # backward) of a deeper net, and of the step's matmuls that step_matmul_tflops times.
    from torch.utils.flop_counter import FlopCounterMode

    from distnn.job.model import build_model
    from distnn.tools.bench_rates import step_matmuls
    from distnn.tools.workload import Workload

    work = Workload("t", 8, 6, (5, 4), 3, 1e-4)
    model = build_model(work.d_in, work.hidden, work.d_out)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    with FlopCounterMode(display=False) as real:
        torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    with FlopCounterMode(display=False) as timed:
        step_matmuls(work, torch.device("cpu"), torch.float32)()
    assert real.get_total_flops() == timed.get_total_flops() == work.flop_per_step


def test_step_matmul_rate_is_measured():
    from distnn.tools.bench_rates import step_matmul_tflops
    from distnn.tools.workload import Workload

    assert step_matmul_tflops(Workload("t", 64, 64, (64,), 64, 1e-4), torch.device("cpu"),
                              torch.float32, repeats=1, batch=1) > 0



def test_the_gpu_runs_the_compiled_tf32_step_in_its_default_layout_and_in_autograds():
    from distnn.step.wgrad import AUTOGRAD, LAYOUTS
    from distnn.tools.bench import (
        COMPUTE_GPU,
        WEIGHT_GRAD_VARIANT,
        WEIGHT_GRAD_VARIANTS,
        variants_for,
    )

    assert WEIGHT_GRAD_VARIANTS[WEIGHT_GRAD_VARIANT] == AUTOGRAD
    assert set(WEIGHT_GRAD_VARIANTS.values()) == set(LAYOUTS)
    names = variants_for(COMPUTE_GPU, 1, torch.device("cuda"))
    assert {"distnn --compile, tf32", WEIGHT_GRAD_VARIANT} <= set(names)


def test_the_gpu_runs_the_compiled_bf16_step_fused_and_as_written():
    """Beside the bf16 whole step with distnn/step/fusions.py's fusions, the GPU's compute
    workload runs the same step without them (DISTNN_BF16_FUSIONS=0), so the table shows
    what they buy (tests/test_fusions.py checks both against eager autocast)."""
    from distnn.tools import bench

    names = bench.variants_for(bench.COMPUTE_GPU, 1, torch.device("cuda"))
    assert {"distnn --compile, bf16", bench.BF16_AS_WRITTEN,
            "distnn --cuda-graph --compile, bf16"} <= set(names)
    assert bench.BF16_AS_WRITTEN in bench.VARIANTS


def test_weight_gradient_layouts_are_each_measured():
    from distnn.tools.bench_rates import weight_grad_layouts
    from distnn.tools.workload import Workload

    rates = weight_grad_layouts(Workload("t", 64, 48, (32,), 8, 1e-4), torch.device("cpu"),
                                torch.float32, repeats=1, batch=1)
    assert sorted(rates) == sorted(["g.T @ x", "(x.T @ g).T", "(xT @ g).T, xT kept",
                                    "g.T @ x, g.T copied", "g.T @ x, both copied"])
    assert all(rate > 0 for rate in rates.values())


def test_each_row_is_set_against_the_hand_made_floors_of_its_workload():
    from distnn.tools.bench import FLOORS, markdown, summarise

    def sample(variant, ms):
        return {"workload": "reference", "world_size": 1, "variant": variant, "repeat": 0,
                "ms_per_step": ms, "loss_ok": True}

    samples = [sample("reference loop", 1.0), sample(FLOORS[0], 0.08), sample(FLOORS[1], 0.05),
               sample("distnn --cuda-graph --compile", 0.03)]
    rows = {r["variant"]: r for r in summarise(samples, {"reference": REFERENCE}, {}, {})}
    assert rows["distnn --cuda-graph --compile"]["vs_floors"] == pytest.approx([0.375, 0.6])
    assert rows["reference loop"]["vs_floors"] == pytest.approx([12.5, 20.0])
    table = markdown(list(rows.values()), "header")
    assert "| 33.33x | 0.38x; 0.60x |" in table


def test_the_fusion_leads_time_each_way_after_checking_they_agree():
    from distnn.tools.bench_rates import fusion_leads
    from distnn.tools.workload import Workload

    times = fusion_leads(Workload("t", 64, 48, (32,), 8, 1e-4), torch.device("cpu"),
                         torch.float32, repeats=1, batch=1)
    assert list(times) == ["loss and gradient, as written",
                           "loss and gradient, rows summed first", "addmm, then ReLU",
                           "addmm with a ReLU epilogue"]
    assert all(ms > 0 for ms in times.values())
