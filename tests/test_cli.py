"""The command line in one process: bad input, output formats, and the single-process result."""

from __future__ import annotations

import math
import os
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from distnn.config import TrainConfig, parse_config
from distnn.errors import UsageError
from distnn.train import main
from tests.conftest import read_metrics, run_cli
from tests.reference import assert_matches_reference, reference_run

BAD_INPUT = [
    (["--batch-size", "0"], "--batch-size: got 0; allowed: an integer >= 1"),
    (["--d-in", "-3"], "--d-in: got -3"),
    (["--hidden", "2.5"], "--hidden: got '2.5'; allowed: integers >= 1, comma-separated"),
    (["--hidden", "100,0"], "--hidden: got (100, 0); allowed: integers >= 1"),
    (["--hidden", ""], "--hidden: got ''"),
    (["--d-out", "ten"], "--d-out: got 'ten'"),
    (["--steps", "0"], "--steps: got 0"),
    (["--lr", "0"], "--lr: got 0.0; allowed: a finite number > 0"),
    (["--lr=-1e-4"], "--lr: got -0.0001"),
    (["--lr", "nan"], "--lr: got nan"),
    (["--lr", "inf"], "--lr: got inf"),
    (["--lr", "1e39"], "--lr: got 1e+39; allowed: a finite number > 0 and <= 3.40282e+38"),
    (["--lr", "fast"], "--lr: got 'fast'"),
    (["--seed", "-1"], "--seed: got -1; allowed: an integer >= 0 and <= 4611686018427387904"),
    (["--seed", "99999999999999999999"], "--seed: got 99999999999999999999; allowed: an "),
    (["--timeout-s", "1e300"], "--timeout-s: got 1e+300; allowed: a finite number >= 1 and "
                               "<= 1e+06"),
    (["--timeout-s", "1e-9"], "--timeout-s: got 1e-09; allowed: a finite number >= 1"),
    (["--device", "tpu"], "--device: got 'tpu'; allowed: auto, cpu, cuda"),
    (["--backend", "mpi"], "--backend: got 'mpi'; allowed: auto, nccl, gloo"),
    (["--log-every", "-1"], "--log-every: got -1; allowed: an integer >= 0"),
    (["--timeout-s", "0"], "--timeout-s: got 0.0"),
    (["--save", "/no/such/dir/w.safetensors"], "--save: got '/no/such/dir/w.safetensors' but"),
    (["--metrics", "/no/such/dir/m.jsonl"], "directory '/no/such/dir' does not exist"),
    (["--steps"], "argument --steps: expected one argument"),
    (["--stepz", "3"], "unrecognized arguments: --stepz 3"),
]


@pytest.mark.parametrize("argv, words", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_code_2(argv, words, capsys, no_launcher):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("distnn: error: ") and words in lines[0], lines[0]


def test_output_paths_that_are_directories_or_under_a_file_are_refused(tmp_path, capsys,
                                                                        no_launcher):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["--save", str(tmp_path)]) == 2
    assert "which is a directory" in capsys.readouterr().err
    assert main(["--metrics", str(a_file / "m.jsonl")]) == 2
    assert f"the directory {str(a_file)!r} is a file, not a directory" in capsys.readouterr().err


def test_outputs_that_are_pipes_or_another_files_path_are_refused(tmp_path, capsys,
                                                                 no_launcher):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    data = tmp_path / "d.safetensors"
    save_file({"x": torch.randn(8, 3), "y": torch.randn(8, 2)}, data)
    before = data.read_bytes()
    for argv, words in [
            (["--save", str(pipe)], "which is a named pipe; allowed: a regular file, which is "
                                    "replaced whole"),
            (["--metrics", str(pipe)], "which is a named pipe that cannot be written now (no "
                                       "process reads it)"),
            (["--data", str(data), "--save", str(data)], "the file that --data names"),
            (["--data", str(data), "--metrics", str(data)], "the file that --data names"),
            (["--metrics", str(tmp_path / "o"), "--save", str(tmp_path / "o")],
             "the file that --metrics names"),
            # pruned with its checkpoint, or overwriting the lock or a checkpoint's file
            (["--checkpoint-dir", str(tmp_path / "ck"), "--metrics",
              str(tmp_path / "ck" / "step-20" / "m.jsonl")],
             f"--metrics: got {str(tmp_path / 'ck' / 'step-20' / 'm.jsonl')!r}, inside "
             f"--checkpoint-dir {str(tmp_path / 'ck')!r}'s step-20, which the run replaces "
             "or deletes; allowed: a path outside its checkpoints and lock"),
            (["--checkpoint-dir", str(tmp_path / "ck"), "--save",
              str(tmp_path / "ck" / ".distnn-lock")], "--save: got"),
            (["--checkpoint-dir", str(tmp_path), "--tensorboard", str(tmp_path / ".step-9.tmp-x")],
             "--tensorboard: got")]:
        assert main([*argv, "--steps", "2"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.splitlines()) == 1, err
    assert data.read_bytes() == before and stat.S_ISFIFO(os.stat(pipe).st_mode)
    # beside the checkpoints, in the same folder (--checkpoint-dir .), outputs are fine
    assert main(["--steps", "2", "--checkpoint-dir", str(tmp_path), "--metrics",
                 str(tmp_path / "m.jsonl"), "--log-every", "0"]) == 0


def test_more_micro_batches_than_rows_is_one_a_row(tmp_path):
    many = run_cli([sys.executable, "-m", "distnn.train", "--steps", "3", "--micro-batches",
                    "99999999999999999999"], timeout=60)  # was a hang: a piece each, empty too
    per_row = run_cli([sys.executable, "-m", "distnn.train", "--steps", "3", "--micro-batches",
                       "64"], timeout=60)
    assert many.returncode == 0 and many.stdout.splitlines()[:3] == per_row.stdout.splitlines()[:3]


def test_metrics_can_go_to_a_pipe_being_read(tmp_path):
    done = run_cli([sys.executable, "-c", "import sys; from distnn.train import main; "
                    "sys.exit(main(['--steps', '3', '--quiet', '--metrics', '/dev/stdout']))"])
    assert done.returncode == 0, done.stderr  # stdout is the pipe run_cli reads
    assert '"event": "summary"' in done.stdout.splitlines()[-1]


def test_a_save_through_a_link_writes_the_file_it_names(tmp_path, no_launcher):
    link = tmp_path / "w.safetensors"
    link.symlink_to(tmp_path / "target.safetensors")  # dangling until the run writes it
    assert main(["--steps", "2", "--save", str(link), "--quiet"]) == 0
    assert link.is_symlink() and set(load_file(link)) == {"0.weight", "0.bias", "2.weight",
                                                          "2.bias"}


@pytest.mark.parametrize("field, value", [("steps", True), ("lr", math.inf), ("device", "gpu")])
def test_config_validates_values_given_in_code_too(field, value):
    with pytest.raises(UsageError, match=f"--{field}"):
        TrainConfig(**{field: value})


def test_defaults_are_the_reference_program():
    config = parse_config([]).resolved()
    assert (config.batch_size, config.d_in, config.hidden, config.d_out) == (64, 1000, (100,), 10)
    assert (config.steps, config.lr, config.seed, config.log_every) == (500, 1e-4, 0, 1)
    assert (config.device, config.backend, config.timeout_s) == ("auto", "auto", 300.0)


def test_single_process_matches_the_reference_with_its_output_formats(tmp_path, capsys,
                                                                      no_launcher):
    metrics, weights = tmp_path / "m.jsonl", tmp_path / "w.safetensors"
    assert main(["--steps", "150", "--device", "cpu", "--metrics", str(metrics),
                 "--save", str(weights)]) == 0
    out = capsys.readouterr().out.splitlines()
    ref_losses, _ = reference_run(steps=150)

    # stdout: the reference's `step loss` lines, then one summary line
    assert len(out) == 151
    assert out[0].split()[0] == "0" and float(out[0].split()[1]) == pytest.approx(ref_losses[0])
    assert out[-1].startswith("summary: world_size=1 device=cpu backend=none steps=150 ")

    rows = read_metrics(metrics)
    assert [row["step"] for row in rows[:-1]] == list(range(150))
    assert rows[-1]["event"] == "summary"
    assert set(rows[-1]) == {"event", "world_size", "device", "backend", "steps", "start_step",
                             "wall_s", "compile_s", "samples_per_s", "final_loss"}
    assert rows[-1]["final_loss"] == rows[-2]["loss"]
    state = load_file(weights)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert_matches_reference([row["loss"] for row in rows[:-1]], state, steps=150)
    assert not list(tmp_path.glob(".distnn-*")), "a temporary file was left behind"


def test_log_every_selects_steps_and_zero_prints_only_the_summary(tmp_path, capsys,
                                                                   no_launcher):
    metrics = tmp_path / "m.jsonl"
    assert main(["--steps", "10", "--log-every", "4", "--metrics", str(metrics)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:-1]] == ["0", "4", "8"]
    assert [row.get("step") for row in read_metrics(metrics)] == [0, 4, 8, None]
    assert main(["--steps", "10", "--log-every", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("summary: ")


def test_the_module_entry_point_fails_without_a_traceback():
    import sys

    result = run_cli([sys.executable, "-m", "distnn.train", "--lr", "nan"])
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["distnn: error: --lr: got nan; allowed: "
                                          "a finite number > 0 and <= 3.40282e+38"]


def test_quiet_prints_only_the_summary_and_verbose_adds_debug_notes(tmp_path, capsys,
                                                                    no_launcher):
    metrics = tmp_path / "m.jsonl"
    assert main(["--steps", "5", "--quiet", "--checkpoint-dir", str(tmp_path / "a"),
                 "--metrics", str(metrics)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("summary: ") and captured.err == ""
    assert [row.get("step") for row in read_metrics(metrics)] == [0, 1, 2, 3, 4, None]
    assert main(["--steps", "5", "--verbose", "--checkpoint-dir", str(tmp_path / "b")]) == 0
    assert "distnn: debug: wrote checkpoint step-5" in capsys.readouterr().err
    assert main(["--steps", "5", "--quiet", "--verbose"]) == 2
    assert "--quiet and --verbose: got both" in capsys.readouterr().err


def test_notes_and_warnings_go_through_the_distnn_logger(tmp_path, caplog, no_launcher):
    import logging

    assert main(["--steps", "4", "--checkpoint-dir", str(tmp_path)]) == 0
    assert main(["--steps", "6", "--checkpoint-dir", str(tmp_path)]) == 0
    (tmp_path / "step-6" / "state.json").write_text("{")
    logging.getLogger("distnn").addHandler(caplog.handler)
    try:
        assert main(["--steps", "8", "--checkpoint-dir", str(tmp_path)]) == 0
    finally:
        logging.getLogger("distnn").removeHandler(caplog.handler)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(level == "WARNING" and "step-6 is corrupt" in text for level, text in messages)
    assert any(level == "INFO" and "resuming from" in text for level, text in messages)

