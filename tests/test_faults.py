"""Faults made to happen: resume, elastic restart, preemption, and the guards.

Every "same result" claim here is bitwise: the same world size and device must give the
same bits, interrupted or not.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from distnn.train import main
from tests.conftest import (
    REPO,
    bin_path,
    clean_env,
    free_port,
    read_losses,
    run_cli,
    running,
)

# Small and quick: at this size a step is one gloo round trip.
TINY = ["--d-in", "10", "--hidden", "10", "--log-every", "1"]
STEPS = 600  # the preempted run has about 500 steps (2-3 s) left when its signal is sent


def assert_same_bits(path_a, path_b) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def distnn_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distnn:")]


def torchrun(nproc: int, args: list[str]) -> list[str]:
    return [bin_path("torchrun"), f"--nproc_per_node={nproc}", *args, "-m", "distnn.train"]


# -- resume, in one process ---------------------------------------------------------------

def test_resume_is_bitwise_an_uninterrupted_run(tmp_path, capsys, no_launcher):
    parts = tmp_path / "parts"
    assert main(["--steps", "60", "--save", str(tmp_path / "a.safetensors"),
                 "--metrics", str(tmp_path / "a.jsonl")]) == 0
    common = ["--checkpoint-dir", str(parts), "--checkpoint-every", "10",
              "--metrics", str(tmp_path / "b.jsonl")]  # the second part goes on with it
    assert main(["--steps", "35", *common]) == 0  # the first part ends with step-35
    capsys.readouterr()
    assert main(["--steps", "60", *common, "--save", str(tmp_path / "b.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "resuming from " + str(parts / "step-35") in captured.err
    assert captured.out.splitlines()[0].startswith("35 ")  # continues where it stopped
    assert_same_bits(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert read_losses(tmp_path / "a.jsonl") == read_losses(tmp_path / "b.jsonl")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, no_launcher):
    assert main(["--steps", "40", "--save", str(tmp_path / "a.safetensors")]) == 0
    common = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "10"]
    assert main(["--steps", "30", *common]) == 0
    (tmp_path / "ck" / "step-30" / "weights.safetensors").write_bytes(b"torn")
    capsys.readouterr()
    assert main(["--steps", "40", *common, "--save", str(tmp_path / "b.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "step-30 is corrupt or partial" in err and "resuming from" in err and "step-20" in err
    assert_same_bits(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_a_checkpoint_of_another_model_is_refused(tmp_path, capsys, no_launcher):
    common = ["--steps", "5", "--checkpoint-dir", str(tmp_path)]
    assert main(common) == 0
    capsys.readouterr()
    assert main([*common, "--hidden", "50"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--hidden 100 (now 50)" in lines[0]


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys, no_launcher):
    assert main(["--lr", "1e3", "--steps", "100", "--log-every", "0", "--checkpoint-dir",
                 str(tmp_path), "--checkpoint-every", "1"]) == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    match = re.search(r"non-finite loss or gradient at step (\d+) .*last finite loss", lines[0])
    assert match, lines[0]
    bad_step = int(match.group(1))
    kept = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("step-*"))
    assert kept and max(kept) <= bad_step
    for tensor in load_file(tmp_path / f"step-{max(kept)}" / "weights.safetensors").values():
        assert torch.isfinite(tensor).all()


# -- multi-rank faults under torchrun -----------------------------------------------------

@pytest.fixture(scope="module")
def minibatches(tmp_path_factory) -> list[str]:
    """A run in shuffled mini-batches of a data file with momentum: restarting it must put
    back the place in the epoch and the optimizer's state, not only the weights."""
    path = tmp_path_factory.mktemp("data") / "d.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({"x": torch.randn(50, 10, generator=generator),
               "y": torch.randn(50, 3, generator=generator)}, path)
    return ["--data", str(path), "--batch-size", "7", "--hidden", "10", "--optimizer",
            "momentum", "--lr", "1e-3", "--log-every", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, minibatches):
    """The 2-rank run that the interrupted runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli([*torchrun(2, []), *minibatches, "--steps", str(STEPS),
                      "--save", str(out / "w.safetensors"), "--metrics", str(out / "m.jsonl")])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_elastic_restart_resumes_to_the_same_bits(tmp_path, uninterrupted, minibatches):
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", DISTNN_FAULT_STEP="150",
                    DISTNN_FAULT_RANK="1")
    result = run_cli([*torchrun(2, ["--max-restarts=2"]), *minibatches, "--steps", str(STEPS),
                      "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "100",
                      "--save", str(tmp_path / "w.safetensors"),
                      "--metrics", str(tmp_path / "m.jsonl")], env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from " + str(tmp_path / "ck" / "step-100") in result.stderr
    assert_same_bits(uninterrupted / "w.safetensors", tmp_path / "w.safetensors")
    assert read_losses(tmp_path / "m.jsonl") == read_losses(uninterrupted / "m.jsonl")


def signal_once(command: list[str], appears, signum: int) -> tuple[int, str]:
    """Runs ``command``, sends it ``signum`` as soon as the path ``appears``; returns its exit
    code and standard error."""
    with running(command, env=clean_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, text=True) as job:
        deadline = time.monotonic() + 60
        while not appears.exists() and job.poll() is None:
            assert time.monotonic() < deadline, f"{appears} did not appear"
            time.sleep(0.01)
        job.send_signal(signum)
        _, stderr = job.communicate(timeout=60)
    return job.returncode, stderr


def test_preemption_checkpoints_and_a_rerun_finishes_the_same(tmp_path, uninterrupted,
                                                              minibatches):
    command = [*torchrun(2, []), *minibatches, "--steps", str(STEPS), "--checkpoint-dir",
               str(tmp_path / "ck"), "--checkpoint-every", "100",
               "--save", str(tmp_path / "w.safetensors")]
    returncode, stderr = signal_once(command, tmp_path / "ck" / "step-100", signal.SIGTERM)
    lines = distnn_lines(stderr)
    assert returncode != 0 and len(lines) == 2, stderr[-3000:]
    # (the ranks exit 143; torchrun, signalled too, exits 1 with its own report)
    steps = {int(match.group(1)) for line in lines
             if (match := re.search(r"stopped: preempted \(SIGTERM\) after step (\d+) of", line))}
    assert len(steps) == 1, lines  # both ranks said it, at the same step
    stopped_at = steps.pop()
    assert stopped_at < STEPS, "the run finished before the signal: make it longer"
    assert (tmp_path / "ck" / f"step-{stopped_at}").is_dir()
    assert f"wrote {tmp_path / 'ck' / f'step-{stopped_at}'};" in lines[0]

    rerun = run_cli(command, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {tmp_path / 'ck' / f'step-{stopped_at}'}" in rerun.stderr
    assert_same_bits(uninterrupted / "w.safetensors", tmp_path / "w.safetensors")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, minibatches):
    """The flags of a run that shards its parameters (FSDP2: sharded checkpoints), and its
    uninterrupted 2-rank result."""
    flags = [*minibatches, "--shard", "parameters", "--steps", "200"]
    out = tmp_path_factory.mktemp("sharded")
    result = run_cli([*torchrun(2, []), *flags, "--save", str(out / "w.safetensors"),
                      "--metrics", str(out / "m.jsonl")])
    assert result.returncode == 0, result.stderr[-2000:]
    return flags, out


def test_a_sharded_run_restarted_or_preempted_resumes_to_the_same_bits(tmp_path, sharded):
    # --shard parameters: each rank writes and reads its own shards, through a rank killed
    # (torchrun restarts the job) and through SIGTERM (a rerun continues)
    flags, uninterrupted = sharded
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", DISTNN_FAULT_STEP="75",
                    DISTNN_FAULT_RANK="1")
    restarted = run_cli([*torchrun(2, ["--max-restarts=2"]), *flags, "--checkpoint-dir",
                         str(tmp_path / "ck"), "--checkpoint-every", "50", "--save",
                         str(tmp_path / "w.safetensors"), "--metrics",
                         str(tmp_path / "m.jsonl")], env=env, timeout=180)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resuming from " + str(tmp_path / "ck" / "step-50") in restarted.stderr
    assert (tmp_path / "ck" / "step-200" / "shards" / ".metadata").exists()  # (50 is gone)
    assert_same_bits(uninterrupted / "w.safetensors", tmp_path / "w.safetensors")
    assert read_losses(tmp_path / "m.jsonl") == read_losses(uninterrupted / "m.jsonl")

    command = [*torchrun(2, []), *flags, "--checkpoint-dir", str(tmp_path / "ck2"),
               "--checkpoint-every", "50", "--save", str(tmp_path / "w2.safetensors")]
    returncode, stderr = signal_once(command, tmp_path / "ck2" / "step-50", signal.SIGTERM)
    stopped = {int(match.group(1)) for line in distnn_lines(stderr)
               if (match := re.search(r"preempted \(SIGTERM\) after step (\d+) of", line))}
    assert returncode != 0 and len(stopped) == 1, stderr[-3000:]
    stopped_at = stopped.pop()
    assert stopped_at < 200, "the run finished before the signal: make it longer"
    rerun = run_cli(command, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {tmp_path / 'ck2' / f'step-{stopped_at}'}" in rerun.stderr
    assert_same_bits(uninterrupted / "w.safetensors", tmp_path / "w2.safetensors")


def test_one_process_stops_after_the_step_its_signal_arrived_in_and_resumes_the_same(tmp_path):
    # Alone there are no votes to agree on: the rank's own signal decides.
    steps = 5000
    whole = run_cli([sys.executable, "-m", "distnn.train", *TINY, "--steps", str(steps),
                     "--save", str(tmp_path / "whole.safetensors")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    command = [sys.executable, "-m", "distnn.train", *TINY, "--steps", str(steps),
               "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "100",
               "--save", str(tmp_path / "w.safetensors")]
    returncode, stderr = signal_once(command, tmp_path / "ck" / "step-100", signal.SIGINT)
    assert returncode == 128 + signal.SIGINT, stderr[-3000:]
    lines = distnn_lines(stderr)
    match = re.fullmatch(r"distnn: warning: stopped: preempted \(SIGINT\) after step (\d+) "
                         r"of 5000: wrote (\S+); run the same command to continue", lines[-1])
    assert len(lines) == 1 and match, lines
    stopped_at = int(match.group(1))
    assert 100 <= stopped_at < steps, "the run finished before the signal: make it longer"
    assert match.group(2) == str(tmp_path / "ck" / f"step-{stopped_at}")

    rerun = run_cli(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {tmp_path / 'ck' / f'step-{stopped_at}'}" in rerun.stderr
    assert_same_bits(tmp_path / "whole.safetensors", tmp_path / "w.safetensors")


def test_a_run_without_a_checkpoint_folder_says_a_rerun_starts_again(tmp_path):
    metrics = tmp_path / "m.jsonl"
    with running([sys.executable, "-m", "distnn.train", *TINY, "--steps", "10000000",
                  "--log-every", "1", "--metrics", str(metrics)], env=clean_env(), cwd=REPO,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as job:
        deadline = time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text()) and job.poll() is None:
            assert time.monotonic() < deadline, "no step was recorded"
            time.sleep(0.01)  # a step recorded: the steps run, and the signal is caught
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert re.fullmatch(r"distnn: warning: stopped: preempted \(SIGTERM\) after step \d+ of "
                        r"10000000: no --checkpoint-dir, so nothing was saved and a rerun "
                        r"starts from the beginning \(a run with --checkpoint-dir can be "
                        r"continued\)", stderr.strip()), stderr


def test_a_repeated_sigterm_is_the_same_request_and_a_second_sigint_interrupts():
    from distnn.resilience.preemption import StopRequests

    outside = []  # the handlers before training (harmless here, unlike the defaults)
    before = {sig: signal.signal(sig, lambda signum, frame: outside.append(signum))
              for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        stop = StopRequests(torch.device("cpu"), watch=None)
        with stop.installed():
            os.kill(os.getpid(), signal.SIGHUP)  # the first names the stop
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's and torchrun's copies:
            os.kill(os.getpid(), signal.SIGTERM)  # the same request, not a kill
            assert stop.signum == signal.SIGHUP and stop.exit_code == 129
        assert outside == []
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        stop = StopRequests(torch.device("cpu"), watch=None)
        with stop.installed():
            os.kill(os.getpid(), signal.SIGHUP)  # the run outlives the terminal
            assert stop.signum is None and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    # Python's own SIGINT handler before, whatever an earlier test in this process left (one
    # of the full suite's did, once: the second Ctrl-C then did not raise)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopRequests(torch.device("cpu"), watch=None)
        with pytest.raises(KeyboardInterrupt), stop.installed():
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: out now
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_two_sigterms_at_once_still_stop_at_a_step_with_a_checkpoint(tmp_path):
    command = [sys.executable, "-m", "distnn.train", *TINY, "--steps", "5000",
               "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "100"]
    with running(command, env=clean_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, text=True) as job:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ck" / "step-100").exists() and job.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        job.send_signal(signal.SIGTERM)  # as a scheduler signals every process of a job, and
        time.sleep(0.2)  # (once the first was handled: two at once arrive as one)
        job.send_signal(signal.SIGTERM)  # torchrun forwards its own copy
        _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143, stderr[-3000:]
    match = re.search(r"preempted \(SIGTERM\) after step (\d+) of 5000: wrote (\S+);", stderr)
    assert match and os.path.isdir(match.group(2)), stderr[-3000:]


def test_resuming_on_another_world_size_is_allowed_with_a_notice(tmp_path):
    ck = tmp_path / "ck"
    first = run_cli([*torchrun(2, []), *TINY, "--steps", "200", "--checkpoint-dir", str(ck)])
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli([*torchrun(3, []), *TINY, "--steps", "250", "--checkpoint-dir", str(ck)])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "written by 2 ranks and this run has 3" in second.stderr


def test_ranks_started_with_different_flags_all_stop(tmp_path):
    port = free_port()
    agents = []
    for lr in ("1e-4", "2e-4"):
        agents.append(subprocess.Popen(
            [bin_path("torchrun"), "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mismatch", "-m", "distnn.train",
             "--steps", "5", "--lr", lr],
            env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [agent.communicate(timeout=120) for agent in agents]
    lines = [line for _, err in outputs for line in distnn_lines(err)]
    assert all(agent.returncode != 0 for agent in agents)
    assert len(lines) == 2, outputs
    for line in lines:
        assert "the ranks were started differently: --lr (rank 0 0.0001, rank 1 0.0002)" in line


def test_a_diverged_replica_is_named_and_stops_the_run(tmp_path):
    env = clean_env(DISTNN_FAULT_KIND="diverge", DISTNN_FAULT_STEP="30", DISTNN_FAULT_RANK="1")
    result = run_cli([*torchrun(2, []), *TINY, "--steps", "100", "--verify-every", "10"],
                     env=env)
    assert result.returncode != 0
    lines = distnn_lines(result.stderr)
    assert lines and all("replicas diverged: after step 40 the weights of rank(s) 1 differ"
                         in line for line in lines), result.stderr[-2000:]
    assert re.search(r"exitcode\s*:\s*3", result.stderr)


def test_a_wedged_peer_ends_the_run_after_the_timeout(tmp_path):
    env = clean_env(DISTNN_FAULT_KIND="hang", DISTNN_FAULT_STEP="20", DISTNN_FAULT_RANK="1")
    started = time.monotonic()
    result = run_cli([*torchrun(2, []), *TINY, "--steps", "100", "--timeout-s", "3"], env=env,
                     timeout=60)
    assert time.monotonic() - started < 40
    lines = distnn_lines(result.stderr)
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    # "the gradient all-reduce failed" or, for a small model on gloo, "the gradient sum
    # (through rank 0) failed"
    assert lines[0].startswith("distnn: rank 0: error: the gradient ") and "failed" in lines[0]
    assert "--timeout-s 3" in lines[0]
    assert re.search(r"exitcode\s*:\s*2", result.stderr), result.stderr[-2000:]


def test_a_peer_that_never_arrives_ends_the_run_after_the_timeout():
    env = clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))
    started = time.monotonic()
    result = run_cli([sys.executable, "-m", "distnn.train", "--timeout-s", "2"], env=env,
                     timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    assert distnn_lines(result.stderr) == result.stderr.splitlines()
    assert "joining the process group failed" in result.stderr and "--timeout-s 2" in result.stderr


def test_a_rank_that_cannot_reach_rank_zero_ends_after_the_timeout_in_one_line(monkeypatch):
    # torch's own client tried twice (up to 3x --timeout-s) and printed ~40 lines first
    import socket
    import threading

    from distnn.distributed.environment import LaunchEnv, Placement
    from distnn.distributed.process_group import (
        CollectiveFailed,
        _wait_for_store,
        process_group,
    )

    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    launch = LaunchEnv(launcher="env", rank=1, local_rank=1, world_size=2, local_world_size=2,
                       rendezvous=True)
    started = time.monotonic()
    with pytest.raises(CollectiveFailed, match=rf"^joining the process group failed: nothing "
                       rf"listened at 127.0.0.1:{port} \(MASTER_ADDR:MASTER_PORT, where rank 0 "
                       r"serves the job's store\): Connection refused$"):
        with process_group(launch, Placement("cpu", "gloo"), timeout_s=1.0, sharding=False):
            pass
    assert 1.0 <= time.monotonic() - started < 3.0
    # rank 0 later than the others is fine: the wait ends once something listens there
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        late = threading.Timer(0.5, listener.listen)
        late.start()
        started = time.monotonic()
        _wait_for_store(os.environ, 5.0)
        late.join()
    assert 0.5 <= time.monotonic() - started < 2.0


def test_fault_variables_are_validated(no_launcher, capsys, monkeypatch):
    for value in ("soon", "²"):  # ('²' is a digit to Python's str.isdigit)
        monkeypatch.setenv("DISTNN_FAULT_STEP", value)
        assert main(["--steps", "3"]) == 2
        assert f"DISTNN_FAULT_STEP={value!r}" in capsys.readouterr().err
    monkeypatch.delenv("DISTNN_FAULT_STEP")
    monkeypatch.setenv("DISTNN_FAULT_KIND", "bogus")  # a drill that would do nothing
    assert main(["--steps", "3"]) == 2
    assert "DISTNN_FAULT_KIND is set but DISTNN_FAULT_STEP is not" in capsys.readouterr().err
    # drills that could never fire (one process: rank 0 of 1; 3 steps: 0 to 2)
    for env, said in ((dict(DISTNN_FAULT_STEP="1", DISTNN_FAULT_RANK="1"),
                       "DISTNN_FAULT_RANK=1, but the job has 1 rank(s); allowed: 0 to 0"),
                      (dict(DISTNN_FAULT_STEP="3"),
                       "DISTNN_FAULT_STEP=3, but the run has 3 step(s); allowed: 0 to 2")):
        for name in ("DISTNN_FAULT_STEP", "DISTNN_FAULT_RANK", "DISTNN_FAULT_KIND"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert main(["--steps", "3"]) == 2
        assert f"error: environment: {said}\n" in capsys.readouterr().err


def test_the_stall_fault_on_the_cpu_is_refused_at_start_on_every_rank():
    env = clean_env(DISTNN_FAULT_STEP="3", DISTNN_FAULT_RANK="1", DISTNN_FAULT_KIND="stall")
    started = time.monotonic()
    result = run_cli([*torchrun(2, []), *TINY, "--steps", "50"], env=env, timeout=60)
    assert time.monotonic() - started < 30  # not after a collective's timeout
    assert result.returncode != 0
    assert sorted(distnn_lines(result.stderr)) == [
        f"distnn: rank {rank}: error: environment: DISTNN_FAULT_KIND=stall needs a CUDA "
        "device; this rank computes on cpu" for rank in (0, 1)], result.stderr[-2000:]


class EventDoneAfter:
    """Stands in for a CUDA event (only ``query`` is used): done once ``seconds`` have passed."""

    def __init__(self, seconds: float) -> None:
        self.done_at = time.monotonic() + seconds

    def query(self) -> bool:
        return time.monotonic() >= self.done_at


def test_waits_for_the_gpu_end_after_the_timeout_and_a_stuck_gpu_is_not_waited_for_again():
    from distnn.distributed.process_group import DeviceStalled, DeviceWatch

    watch = DeviceWatch(torch.device("cuda", 0), timeout_s=0.5)  # no CUDA call until a wait
    watch.wait(EventDoneAfter(0.05))  # in time: past the spinning, into the sleeping polls
    started = time.monotonic()
    with pytest.raises(DeviceStalled, match="the steps queued on it did not finish within 0.5 s"):
        watch.wait(EventDoneAfter(60))
    assert 0.5 <= time.monotonic() - started < 1.5
    started = time.monotonic()
    with pytest.raises(DeviceStalled):
        watch.wait(EventDoneAfter(0))  # the GPU is known to be stuck: fails at once
    assert time.monotonic() - started < 0.1


def test_the_replica_checksum_is_the_whole_sum_taken_a_chunk_at_a_time():
    """The replica guard's two int64 sums (bit patterns, and their squares, wrapping modulo
    2**64) over weights longer than a chunk equal the sums over all of them at once, and a
    change of one bit anywhere changes them."""
    from distnn.resilience.guards import CHECKSUM_CHUNK, replica_checksum

    weights = torch.randn(2 * CHECKSUM_CHUNK + 12345, generator=torch.Generator().manual_seed(0))
    weights[7] = float("inf")  # large bit patterns: the squares wrap
    bits = weights.view(torch.int32).to(torch.int64)
    assert torch.equal(replica_checksum(weights), torch.stack([bits.sum(), (bits * bits).sum()]))
    changed = weights.clone()
    changed.view(torch.int32)[-1] ^= 1
    assert not torch.equal(replica_checksum(changed), replica_checksum(weights))


def test_the_finite_check_is_the_whole_check_taken_a_chunk_at_a_time():
    from distnn.distributed.gradsync import FINITE_CHUNK, all_finite

    weights = torch.randn(2 * FINITE_CHUNK + 12345, generator=torch.Generator().manual_seed(0))
    assert all_finite(weights) and all_finite(weights[:-12345].reshape(-1, 4))
    for where in (0, FINITE_CHUNK - 1, FINITE_CHUNK, len(weights) - 1):
        for bad in (float("inf"), float("-inf"), float("nan")):
            changed = weights.clone()
            changed[where] = bad
            assert not all_finite(changed), (where, bad)


@pytest.mark.parametrize("module, check, whole_mb", [
    ("distnn.resilience.guards", "replica_checksum", 400),
    ("distnn.distributed.gradsync", "all_finite", 175)])
def test_the_weights_checks_of_100_mb_hold_tens_of_mb_more_not_hundreds(module, check,
                                                                        whole_mb):
    program = f"""
import torch
from {module} import {check}
def hwm():  # peak resident kB so far
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
weights = torch.ones(25_000_000)  # 100 MB
before = hwm()
{check}(weights)
print((hwm() - before) // 1000)
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)},
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) < 50, (result.stdout, f"whole it was {whole_mb} MB")
