"""Faults of the machine around the run: writes that fail (checkpoints, --save, --metrics),
two jobs on one checkpoint folder, temporaries left by a write that was killed.

Writes fail for real: DISTNN_FAULT_KIND=write-fail sets the rank's RLIMIT_FSIZE to 0 at a
step, so the kernel refuses every write that grows a file (EFBIG), as a full disk would.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from distnn.resilience.checkpoint import list_checkpoints
from distnn.resilience.outputs import check_space
from distnn.train import main
from tests.conftest import REPO, bin_path, clean_env, package_frames, run_cli, running

TINY = ["--d-in", "10", "--hidden", "10", "--log-every", "0"]


def distnn_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distnn:")]


def write_fail(step: int, rank: int = 0) -> dict[str, str]:
    return clean_env(DISTNN_FAULT_STEP=str(step), DISTNN_FAULT_RANK=str(rank),
                     DISTNN_FAULT_KIND="write-fail")


def stopped_ranks(result: subprocess.CompletedProcess) -> list[str]:
    """The error line of each of a 2-rank run's ranks, in rank order, once it is shown that
    the run stopped with the exit code of a failed write (4) and no traceback of the ranks'
    (torchrun has its own)."""
    lines = sorted(line for line in distnn_lines(result.stderr) if ": error: " in line)
    assert result.returncode != 0 and len(lines) == 2, result.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*4", result.stderr), result.stderr[-3000:]
    assert not package_frames(result.stderr)
    return lines


def test_a_checkpoint_that_cannot_be_written_stops_every_rank_with_the_reason(tmp_path):
    ck = tmp_path / "ck"
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train", *TINY,
                      "--steps", "100", "--checkpoint-dir", str(ck), "--checkpoint-every",
                      "20"], env=write_fail(50), timeout=90)
    assert len(distnn_lines(result.stderr)) == 2, result.stderr[-3000:]  # nothing else said
    for rank, line in enumerate(stopped_ranks(result)):
        assert line.startswith(f"distnn: rank {rank}: error: could not write the checkpoint "
                               f"{ck / 'step-60'} (File too large); the last good checkpoint "
                               f"is {ck / 'step-40'}"), line
    assert sorted(os.listdir(ck)) == [".distnn-lock", "step-20", "step-40"]  # no temporary
    assert load_file(ck / "step-40" / "weights.safetensors")  # intact
    rerun = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train", *TINY,
                     "--steps", "100", "--checkpoint-dir", str(ck), "--checkpoint-every", "20"],
                    timeout=90)
    assert rerun.returncode == 0 and f"resuming from {ck / 'step-40'}" in rerun.stderr


def test_a_sharded_checkpoint_that_one_rank_cannot_write_stops_every_rank(tmp_path):
    # --shard parameters: every rank writes its own shards; rank 1's write fails
    ck = tmp_path / "ck"
    args = [bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train", *TINY,
            "--steps", "60", "--checkpoint-dir", str(ck), "--checkpoint-every", "20",
            "--shard", "parameters", "--optimizer", "adamw", "--lr", "1e-3"]
    result = run_cli(args, env=write_fail(30, rank=1), timeout=120)
    for rank, line in enumerate(stopped_ranks(result)):
        assert line.startswith(f"distnn: rank {rank}: error: could not write the checkpoint "
                               f"{ck / 'step-40'} (rank 1: File too large); the last good "
                               f"checkpoint is {ck / 'step-20'}"), line
    assert sorted(os.listdir(ck)) == [".distnn-lock", "step-20"]  # no temporary
    assert sorted(os.listdir(ck / "step-20" / "shards")) == [".metadata", "__0_0.distcp",
                                                              "__1_0.distcp"]
    rerun = run_cli(args, timeout=120)
    assert rerun.returncode == 0 and f"resuming from {ck / 'step-20'}" in rerun.stderr, (
        rerun.stderr[-3000:])
    assert list_checkpoints(str(ck)) == [20, 40, 60]


def test_the_rank_exit_code_of_a_failed_write_is_4(tmp_path, capsys, no_launcher, monkeypatch):
    for name, value in write_fail(5).items():
        if name.startswith("DISTNN_"):
            monkeypatch.setenv(name, value)
    # in this process: put the file size limit back afterwards
    import resource
    import signal
    limit, xfsz = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
    try:
        code = main([*TINY, "--steps", "10", "--save", str(tmp_path / "w.safetensors")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, xfsz)
    lines = capsys.readouterr().err.splitlines()
    assert code == 4 and len(lines) == 1, lines
    assert lines[0] == (f"distnn: error: could not write --save {tmp_path / 'w.safetensors'} "
                        "(File too large); the trained weights are lost (no --checkpoint-dir)")
    assert os.listdir(tmp_path) == []


def test_a_failed_save_names_the_checkpoint_that_holds_the_weights(tmp_path, capsys,
                                                                     no_launcher, monkeypatch):
    def no_space(module, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr("distnn.run.checkpointer.save_weights", no_space)
    code = main([*TINY, "--steps", "10", "--checkpoint-dir", str(tmp_path / "ck"),
                 "--save", str(tmp_path / "w.safetensors")])
    lines = capsys.readouterr().err.splitlines()
    assert code == 4 and len(lines) == 1
    assert lines[0].endswith(f"(No space left on device); the trained weights are in the final "
                             f"checkpoint {tmp_path / 'ck' / 'step-10'}")


def test_metrics_that_cannot_be_written_warn_once_and_the_run_goes_on(tmp_path):
    metrics = tmp_path / "m.jsonl"
    result = run_cli([sys.executable, "-m", "distnn.train", "--d-in", "10", "--hidden", "10",
                      "--steps", "3000", "--metrics", str(metrics)], env=write_fail(100))
    lines = distnn_lines(result.stderr)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(
        f"distnn: warning: could not write --metrics {metrics} (File too large); training goes "
        "on without metrics"), lines
    assert result.stdout.splitlines()[-1].startswith("summary: ")


@pytest.mark.parametrize("stdout", ["full disk", "closed pipe"])
def test_a_stdout_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path, stdout):
    command = [sys.executable, "-m", "distnn.train", *TINY, "--log-every", "1", "--steps",
               "300", "--checkpoint-dir", str(tmp_path / "ck"), "--save",
               str(tmp_path / "w.safetensors")]
    if stdout == "full disk":
        target = os.open("/dev/full", os.O_WRONLY)
    else:  # a pipe whose reader is gone, as after `| head -1`
        reader, target = os.pipe()
        os.close(reader)
    try:
        run = subprocess.run(command, stdout=target, stderr=subprocess.PIPE, text=True,
                             env=clean_env(), cwd=REPO, timeout=120)
    finally:
        os.close(target)
    returncode, stderr = run.returncode, run.stderr
    lines = distnn_lines(stderr)
    assert returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(
        "distnn: warning: could not write to stdout ("), lines
    assert list_checkpoints(str(tmp_path / "ck")) == [100, 200, 300]
    assert (tmp_path / "w.safetensors").exists()


def test_the_free_space_is_checked_before_a_write():
    with pytest.raises(OSError) as info:
        check_space("/", 1 << 60)
    assert info.value.errno == errno.ENOSPC and "bytes needed" in str(info.value)


def test_a_checkpoint_that_visibly_will_not_fit_is_refused_before_writing(tmp_path, capsys,
                                                                          no_launcher,
                                                                          monkeypatch):
    ck = tmp_path / "ck"
    assert main([*TINY, "--steps", "10", "--checkpoint-dir", str(ck), "--checkpoint-every",
                 "5"]) == 0
    capsys.readouterr()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))
    code = main([*TINY, "--steps", "20", "--checkpoint-dir", str(ck), "--checkpoint-every",
                 "5"])
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("distnn: error")]
    assert code == 4 and len(lines) == 1, lines
    assert "(No space left on device: " in lines[0] and "1 MiB kept free" in lines[0], lines
    assert sorted(os.listdir(ck)) == [".distnn-lock", "step-10", "step-5"]  # no temporary


def test_a_second_job_on_the_same_checkpoint_folder_stops_naming_the_first(tmp_path):
    ck = tmp_path / "ck"
    first = subprocess.Popen([sys.executable, "-m", "distnn.train", *TINY, "--steps",
                              "10000000", "--checkpoint-dir", str(ck)], env=clean_env(),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not (ck / ".distnn-lock").exists() or not (ck / ".distnn-lock").read_text():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train",
                          *TINY, "--steps", "5", "--checkpoint-dir", str(ck)], timeout=90)
        lines = sorted(distnn_lines(second.stderr))
        assert second.returncode != 0 and len(lines) == 2, second.stderr[-2000:]
        assert re.search(r"exitcode\s*:\s*2", second.stderr), second.stderr[-2000:]
        for rank, line in enumerate(lines):
            assert line.startswith(f"distnn: rank {rank}: error: --checkpoint-dir: '{ck}' is "
                                   f"in use by another job (host ")
            assert f"pid {first.pid})" in line
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert first.returncode == 143  # stopped as preempted, checkpoint written
    assert list_checkpoints(str(ck))


def test_leftovers_of_a_killed_write_are_removed_and_never_resumed_from(tmp_path, capsys,
                                                                         no_launcher):
    ck = tmp_path / "ck"
    assert main([*TINY, "--steps", "10", "--checkpoint-dir", str(ck)]) == 0
    torn = ck / ".step-20.tmp-abc123"  # a write of step 20, killed half way
    torn.mkdir()
    (torn / "weights.safetensors").write_bytes(b"half")
    dead_save = tmp_path / f".w.safetensors.{2**22 + 12345}.distnn-tmp"  # no such process
    dead_save.write_bytes(b"half")
    capsys.readouterr()
    assert main([*TINY, "--steps", "15", "--checkpoint-dir", str(ck), "--save",
                 str(tmp_path / "w.safetensors")]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {ck / 'step-10'}" in err and not torn.exists()
    assert not dead_save.exists() and torch.is_tensor(
        load_file(tmp_path / "w.safetensors")["0.weight"])


# -- memory -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "100000000"], "out of memory: --batch-size 100000000 with --d-in 1000 and "
                                    "--d-out 10 needs 404.0 GB for the data per rank"),
    (["--hidden", "100000000"], "out of memory: --hidden 100000000 with --d-in 1000 and --d-out "
                                "10 needs 1617.6 GB for the weights per rank"),
])
def test_sizes_that_cannot_fit_are_one_line_and_exit_5_before_allocating(flags, words, capsys,
                                                                        no_launcher):
    assert main([*flags, "--steps", "2", "--device", "cpu"]) == 5
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distnn: error: " + words), lines


def test_a_class_label_too_large_for_memory_is_refused_before_the_model_is_built(
        tmp_path, capsys, no_launcher):
    data = tmp_path / "d.safetensors"
    save_file({"x": torch.randn(4, 3), "y": torch.tensor([0, 1, 2**40, 1])}, data)
    assert main(["--data", str(data), "--loss", "cross-entropy", "--hidden", "8",
                 "--steps", "2", "--device", "cpu"]) == 5
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "distnn: error: out of memory: --hidden 8 with --d-in 3 and 1099511627777 classes "
        "(labels 0 to 1099511627776) needs 158329.7 GB for the weights per rank"), lines
    # sized by --d-out instead: the message names the flag
    assert main(["--data", str(data), "--loss", "cross-entropy", "--hidden", "8",
                 "--d-out", str(2**41), "--steps", "2", "--device", "cpu"]) == 5
    line = capsys.readouterr().err.strip()
    assert line.startswith("distnn: error: out of memory: --hidden 8 with --d-in 3 and "
                           f"--d-out {2**41} needs"), line


def test_a_class_label_counts_as_its_8_bytes_not_a_row_of_outputs():
    from distnn.resilience.memory import mlp_needs

    sizes = {"batch": 512, "d_in": 4, "hidden": (8,), "d_out": 100_000, "data_rows": 512}
    assert mlp_needs(**sizes, y_bytes=8)["data"] == 512 * (4 * 4 + 8)
    assert mlp_needs(**sizes)["data"] == 512 * (4 + 100_000) * 4  # float targets


def test_an_allocation_that_fails_is_one_line_and_exit_5_on_every_rank(tmp_path):
    import resource

    data = tmp_path / "d.safetensors"
    save_file({"x": torch.randn(8, 4), "y": torch.randn(8, 2)}, data)

    def small_address_space():  # the model (1.1 GB a copy) passes the check, then fails
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    result = subprocess.run([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train",
                             "--data", str(data), "--hidden", "40000000", "--steps", "2"],
                            env=clean_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=120, preexec_fn=small_address_space)
    lines = sorted(distnn_lines(result.stderr))
    assert result.returncode != 0 and len(lines) == 2, result.stderr[-2000:]
    assert re.search(r"exitcode\s*:\s*5", result.stderr), result.stderr[-2000:]
    for rank, line in enumerate(lines):
        assert line.startswith(f"distnn: rank {rank}: error: out of memory on cpu: torch could "
                               "not allocate "), line
        assert line.endswith("; allowed: a smaller batch or model, or --micro-batches M to "
                             "bound the activations"), line


@pytest.mark.parametrize("kind, words", [
    ("oom", "rank 1 stopped the run: out of memory on cpu: torch could not allocate"),
    ("exit", "a collective inside torch (FSDP2, ZeroRedundancyOptimizer) failed: ")])
def test_a_peer_lost_inside_fsdp2_s_collectives_is_one_line(kind, words):
    # --shard parameters: rank 0 meets rank 1's end in FSDP2's gathers, torch's own code
    env = clean_env(DISTNN_FAULT_STEP="5", DISTNN_FAULT_RANK="1", DISTNN_FAULT_KIND=kind)
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train", *TINY,
                      "--steps", "20", "--shard", "parameters", "--optimizer", "adamw",
                      "--lr", "1e-3"], env=env, timeout=120)
    lines = [line for line in distnn_lines(result.stderr) if ": error: " in line]
    assert result.returncode != 0 and not package_frames(result.stderr), result.stderr[-3000:]
    assert "[rank0]" not in result.stderr  # no traceback from rank 0
    said = [line for line in lines if line.startswith("distnn: rank 0: error: ")]
    if kind == "exit":
        # a rank that exits unannounced: torchrun stops rank 0 at once, sometimes before it
        # meets the loss in a gather; when it does, it says so in one line
        assert len(said) <= 1 and all(words in line for line in said), result.stderr[-3000:]
    else:  # a rank that failed tells its peers, then waits for them to say it
        assert len(said) == 1 and words in said[0], result.stderr[-3000:]


def test_a_run_of_any_length_keeps_a_bounded_record_on_the_device(tmp_path):
    with running([sys.executable, "-m", "distnn.train", *TINY, "--steps", str(10**11),
                  "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1500"],
                 env=clean_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 text=True) as job:
        deadline = time.monotonic() + 90
        while not list_checkpoints(str(tmp_path / "ck")) and job.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr[-2000:]
    step = max(list_checkpoints(str(tmp_path / "ck")))
    losses = load_file(tmp_path / "ck" / f"step-{step}" / "losses.safetensors")["loss"]
    assert step >= 1500 and len(losses) == 1000  # the newest 1000 of every step's losses


def _torchrun_lines(ranks: int, args: list[str], **fault: str) -> tuple[list[str], str]:
    env = clean_env(**{f"DISTNN_FAULT_{k.upper()}": v for k, v in fault.items()})
    result = run_cli([bin_path("torchrun"), f"--nproc_per_node={ranks}", "-m", "distnn.train",
                      "--device", "cpu", "--d-in", "10", "--log-every", "0", *args], env=env,
                     timeout=120)
    assert result.returncode != 0
    return sorted(distnn_lines(result.stderr)), result.stderr


def test_out_of_memory_in_a_step_on_one_rank_is_reported_by_every_rank():
    lines, stderr = _torchrun_lines(3, ["--hidden", "10", "--steps", "20"], step="5",
                                    rank="1", kind="oom")
    said = ("out of memory on cpu: torch could not allocate 1125899.9 GB; allowed: a smaller "
            "batch or model, or --micro-batches M to bound the activations")
    assert lines == [f"distnn: rank 0: error: rank 1 stopped the run: {said}",
                     f"distnn: rank 1: error: {said}",
                     f"distnn: rank 2: error: rank 1 stopped the run: {said}"], stderr[-3000:]
    # torchrun blames the failing rank (the others exit 2, a lost peer)
    assert "failed (exitcode: 5) local_rank: 1" in stderr, stderr[-3000:]


def test_ranks_that_build_different_models_are_refused_before_training():
    lines, stderr = _torchrun_lines(2, ["--model", "tests.user_models:wider_on_rank_1",
                                        "--steps", "10"])
    assert len(lines) == 2 and all(
        "error: the ranks built different models: rank 0 4 tensors of 94 values" in line
        and ", rank 1 4 tensors of 136 values" in line for line in lines), stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2", stderr) and "gloo::EnforceNotMet" not in stderr


def test_an_error_in_the_users_model_on_one_rank_is_named_by_the_others():
    lines, stderr = _torchrun_lines(2, ["--model", "tests.user_models:fails_on_rank_1",
                                        "--steps", "10"])
    assert lines == ["distnn: rank 0: error: rank 1 stopped the run: ValueError: this model "
                     "cannot take that row (its own output has the traceback)"], stderr[-3000:]
    assert "ValueError: this model cannot take that row" in stderr  # rank 1's traceback


def test_a_checkpoint_folder_removed_mid_run_is_said_as_it_is(tmp_path):
    ck = tmp_path / "ck"
    with running([sys.executable, "-m", "distnn.train", *TINY, "--steps", str(10**7),
                  "--checkpoint-dir", str(ck), "--checkpoint-every", "200"], env=clean_env(),
                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 text=True) as job:
        deadline = time.monotonic() + 60
        while not (ck / "step-200").exists() and job.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        shutil.rmtree(ck)
        _, stderr = job.communicate(timeout=60)
    lines = distnn_lines(stderr)
    assert job.returncode == 4 and len(lines) == 1, stderr[-2000:]
    assert re.fullmatch(rf"distnn: error: could not write the checkpoint {re.escape(str(ck))}/"
                        r"step-\d+ \(No such file or directory\); the last checkpoint, "
                        rf"{re.escape(str(ck))}/step-\d+, is gone too; make room \(or make "
                        r"the folder again\) and run the same command to continue", lines[0]), lines


def test_a_checkpoint_folder_that_can_be_written_but_not_listed_is_one_line(tmp_path):
    # chmod 300: the write probe passes, and listing its checkpoints would raise
    folder = tmp_path / "unlistable"
    folder.mkdir()
    folder.chmod(0o300)
    as_user = []
    if os.geteuid() == 0:  # root reads any folder: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to drop the right to read any folder")
        as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    result = run_cli([*as_user, sys.executable, "-m", "distnn.train", *TINY, "--steps", "2",
                      "--checkpoint-dir", str(folder)], timeout=60)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"distnn: error: --checkpoint-dir: cannot list {str(folder)!r} (Permission denied); "
        "allowed: a directory this user can read and write"], result.stderr
