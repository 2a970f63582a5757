"""End to end: the real launchers start the real entry point; results checked by the reference."""

from __future__ import annotations

import re
import sys
import time

from safetensors.torch import load_file

from tests.conftest import bin_path, clean_env, package_frames, read_losses, read_metrics, run_cli
from tests.reference import assert_matches_reference

STEPS = 200


def check_run(result, tmp_path, world_size: int) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = tmp_path / "m.jsonl"
    summary = read_metrics(metrics)[-1]
    assert summary["world_size"] == world_size and summary["backend"] == "gloo"
    assert_matches_reference(read_losses(metrics), load_file(tmp_path / "w.safetensors"),
                             steps=STEPS)
    # Only rank 0 prints: one line per step and the summary, nothing from other ranks.
    assert len(result.stdout.splitlines()) == STEPS + 1


def outputs(tmp_path) -> list[str]:
    return ["--steps", str(STEPS), "--metrics", str(tmp_path / "m.jsonl"),
            "--save", str(tmp_path / "w.safetensors")]


def test_torchrun_two_ranks(tmp_path):
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train",
                      *outputs(tmp_path)])
    check_run(result, tmp_path, world_size=2)


def test_accelerate_launch_two_ranks(tmp_path):
    result = run_cli([bin_path("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                      "--main_process_port", "0", "-m", "distnn.train", *outputs(tmp_path)],
                     env=clean_env(HF_HOME=str(tmp_path / "hf")), timeout=180)
    check_run(result, tmp_path, world_size=2)


CPU_NOTICE = ("distnn: warning: world size 1: accelerate launch --cpu (ACCELERATE_USE_CPU) "
              "starts a single process")


def test_accelerate_launch_cpu_is_one_process_and_says_so(tmp_path):
    result = run_cli([bin_path("accelerate"), "launch", "--cpu", "--num_processes", "2",
                      "-m", "distnn.train", *outputs(tmp_path)],
                     env=clean_env(HF_HOME=str(tmp_path / "hf")), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_metrics(tmp_path / "m.jsonl")[-1]
    assert (summary["world_size"], summary["device"], summary["backend"]) == (1, "cpu", "none")
    notices = [line for line in result.stderr.splitlines() if line.startswith(CPU_NOTICE)]
    assert len(notices) == 1, result.stderr[-3000:]


def test_the_accelerate_cpu_variable_at_world_size_1_gets_one_notice():
    noticed = run_cli([sys.executable, "-m", "distnn.train", "--steps", "2"],
                      env=clean_env(ACCELERATE_USE_CPU="True"))
    assert noticed.returncode == 0, noticed.stderr
    assert [line for line in noticed.stderr.splitlines() if line.startswith("distnn:")] == [
        CPU_NOTICE + ", whatever --num_processes says; accelerate launch --multi_gpu "
        "--num_processes N starts N ranks, on the CPU over gloo where there is no GPU "
        "(elsewhere add --device cpu)"]
    plain = run_cli([sys.executable, "-m", "distnn.train", "--steps", "2"])
    assert plain.returncode == 0 and CPU_NOTICE not in plain.stderr, plain.stderr


def test_bad_input_under_torchrun_stops_every_rank_quickly(tmp_path):
    # Only rank 0 checks the --save path; the verdict reaches every rank through the group.
    missing = tmp_path / "missing" / "w.safetensors"
    started = time.monotonic()
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=3", "-m", "distnn.train",
                      "--save", str(missing)], timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f} s"
    lines = [line for line in result.stderr.splitlines() if line.startswith("distnn:")]
    assert sorted(lines) == [f"distnn: rank {r}: error: --save: got '{missing}' but the "
                             f"directory '{missing.parent}' does not exist; allowed: a path in "
                             "an existing, writable directory" for r in range(3)]
    assert re.search(r"exitcode\s*:\s*2", result.stderr), result.stderr[-2000:]
    assert not package_frames(result.stderr), result.stderr[-2000:]  # no rank's traceback


def test_invalid_flag_under_torchrun_is_reported_by_every_rank(tmp_path):
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train",
                      "--lr", "0"], timeout=60)
    assert result.returncode != 0
    lines = sorted(line for line in result.stderr.splitlines() if line.startswith("distnn:"))
    assert lines == [f"distnn: rank {r}: error: --lr: got 0.0; allowed: a finite number > 0 "
                     "and <= 3.40282e+38"
                     for r in range(2)]


def test_console_script_is_installed():
    script = bin_path("distnn-train")
    result = run_cli([script, "--help"])
    assert result.returncode == 0 and "--batch-size" in result.stdout
