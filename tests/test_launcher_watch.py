"""A rank whose launcher is killed outright stops as if preempted, with real processes.

The ranks outlive the killed launcher as orphans, so these tests find them through /proc,
read their stderr from a file (the launcher's pipes die with it), and kill whatever is left
when a test fails. An orphan that has exited may linger as a zombie until init reaps it:
that counts as gone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distnn.distributed.environment import LaunchEnv, detect_launch
from distnn.distributed.launcher_watch import THREAD_NAME
from distnn.distributed.runtime import setup
from tests.conftest import REPO, bin_path, clean_env

STEPS = 1_000_000  # far more than the test waits for: the run ends only by the watch


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def running(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def children(parent: int) -> list[int]:
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return sorted(pid for pid in pids if (stat := proc_stat(pid)) and stat[1] == parent)


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Polls ``condition`` every 20 ms; returns the seconds it took, fails after timeout_s."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} after {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - started


def kill_left_over(pids: list[int]) -> None:
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_killing_torchrun_stops_its_ranks_through_the_preemption_path(tmp_path):
    ck = tmp_path / "ck"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    command = [bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train", "--d-in", "10",
               "--hidden", "10", "--steps", str(STEPS), "--log-every", "100",
               "--checkpoint-dir", str(ck), "--checkpoint-every", "100000"]
    with out.open("w") as stdout, err.open("w") as stderr:
        agent = subprocess.Popen(command, env=clean_env(), cwd=REPO, stdout=stdout,
                                 stderr=stderr)
    ranks: list[int] = []
    try:
        # Rank 0 prints step 0's loss once both ranks are in the training loop.
        wait_until(lambda: out.stat().st_size > 0 or agent.poll() is not None, 60,
                   "no step was logged")
        assert agent.poll() is None, err.read_text()[-3000:]
        ranks = children(agent.pid)
        assert len(ranks) == 2, ranks
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        elapsed = wait_until(lambda: not any(map(running, ranks)), 10,
                             "the ranks still run after their launcher died")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        kill_left_over(ranks)
    print(f"ranks gone {elapsed:.2f} s after the launcher was killed")

    lines = [line for line in err.read_text().splitlines() if line.startswith("distnn:")]
    for rank in (0, 1):
        assert lines.count(f"distnn: rank {rank}: warning: the launcher (pid {agent.pid}) is "
                           "gone; stopping as if preempted (SIGTERM)") == 1, lines
    stops = [re.fullmatch(rf"distnn: rank \d: warning: stopped: preempted \(SIGTERM\) after "
                          rf"step (\d+) of {STEPS}: wrote (\S+); run the same command to "
                          "continue", line) for line in lines if "stopped:" in line]
    assert len(stops) == 2 and all(stops), lines
    steps = {int(match.group(1)) for match in stops}
    assert len(steps) == 1, lines  # the ranks agreed on one step
    step = steps.pop()
    assert {match.group(2) for match in stops} == {str(ck / f"step-{step}")}
    assert (ck / f"step-{step}" / "weights.safetensors").is_file()
    # nothing else: no C++ frames from a store that died with the launcher
    assert "frame #" not in err.read_text() and "TCPStore" not in err.read_text(), (
        err.read_text()[-3000:])


# The launcher's part, for one process: the intermediate parent starts the watched child
# and sleeps until the test kills it.
PARENT = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(60)"
CHILD = """
import os, signal, sys, time
from pathlib import Path
from distnn.distributed.launcher_watch import launcher_watch
out, catch = Path(sys.argv[1]), sys.argv[2] == "catch"
caught = []
if catch:
    signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
with launcher_watch(True, interval_s=0.2, grace_s=2.0):
    (out / "ready").write_text("")
    deadline = time.monotonic() + 30
    while not caught and time.monotonic() < deadline:
        time.sleep(0.01)
(out / "result").write_text("caught SIGTERM" if caught else "no signal")
"""


# A child whose parent dies after it imported distnn and before its watch starts (while
# a rank imports torch, say): the watch still knows the parent it started under.
LATE_CHILD = """
import os, signal, sys, time
from pathlib import Path
import distnn._launched  # what `import distnn` does first
out, first = Path(sys.argv[1]), os.getppid()
(out / "ready").write_text("")
while os.getppid() == first:  # the parent is killed now
    time.sleep(0.01)
from distnn.distributed.launcher_watch import launcher_watch
caught = []
signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
with launcher_watch(True, interval_s=0.2, grace_s=2.0):
    deadline = time.monotonic() + 10
    while not caught and time.monotonic() < deadline:
        time.sleep(0.01)
(out / "result").write_text("caught SIGTERM" if caught else "no signal")
"""


# The same, reaching distnn.train's start-up (a torchrun rank's variables) once orphaned.
LATE_RANK = LATE_CHILD.split("from distnn.distributed.launcher_watch")[0] + """
from distnn.train import main
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT="1", TORCHELASTIC_RUN_ID="late",
                  TORCHELASTIC_RESTART_COUNT="0")
(out / "result").write_text(str(main(["--steps", "3"])))
"""


def orphan_after_parent_dies(tmp_path: Path, mode: str, child: str = CHILD
                             ) -> tuple[float, int]:
    """Kills the parent of a watched child; returns (seconds until the child was gone,
    the dead parent's pid)."""
    with (tmp_path / "stderr").open("w") as stderr:
        parent = subprocess.Popen([sys.executable, "-c", PARENT, sys.executable, "-c", child,
                                   str(tmp_path), mode], env=clean_env(), cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    child: list[int] = []
    try:
        wait_until(lambda: (tmp_path / "ready").exists(), 60, "the child did not start")
        child = children(parent.pid)
        parent.kill()
        parent.wait()
        return wait_until(lambda: not any(map(running, child)), 15,
                          "the orphan still runs"), parent.pid
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        kill_left_over(child)


# LATE_CHILD: the launcher killed before the watch started (torchrun SIGKILLed while its
# ranks imported torch left them waiting ~43 s on its dead store, then failing with C++
# frames): it is still seen gone
@pytest.mark.parametrize("child", [CHILD, LATE_CHILD], ids=["watched", "killed-before-watch"])
def test_an_orphan_that_catches_sigterm_gets_it_within_the_poll(tmp_path, child):
    elapsed, parent = orphan_after_parent_dies(tmp_path, "catch", child)
    assert (tmp_path / "result").read_text() == "caught SIGTERM"
    assert elapsed < 3
    assert (tmp_path / "stderr").read_text().count(
        f"the launcher (pid {parent}) is gone; stopping as if preempted (SIGTERM)") == 1


def test_a_rank_whose_launcher_died_before_it_joined_stops_at_once(tmp_path):
    elapsed, parent = orphan_after_parent_dies(tmp_path, "catch", LATE_RANK)
    assert (tmp_path / "result").read_text() == "143"
    assert elapsed < 15  # importing torch, then at once (not the watch's 10 s grace)
    assert (tmp_path / "stderr").read_text().splitlines() == [
        f"distnn: rank 0: warning: stopped: the launcher (pid {parent}) was gone before this "
        "rank joined the job, so nothing was trained (as if preempted before the first step)"]


def test_an_orphan_that_does_not_catch_sigterm_ends_after_the_grace(tmp_path):
    elapsed, _ = orphan_after_parent_dies(tmp_path, "default")
    assert not (tmp_path / "result").exists()  # SIGTERM's default action ended it
    assert 1.8 < elapsed < 6


def watch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


def test_no_watch_without_an_agent(no_launcher):
    assert not detect_launch(os.environ).agent
    with setup(device="cpu") as rt:
        assert not rt.distributed
        assert watch_threads() == []


def test_the_watch_lives_only_inside_setup_and_never_holds_the_process():
    launch = LaunchEnv(launcher="torchrun", rank=0, local_rank=0, world_size=1,
                       local_world_size=1, agent=True)  # an agent, but no group to create
    with setup(device="cpu", launch=launch):
        (thread,) = watch_threads()
        assert thread.daemon and thread.is_alive()
    assert not thread.is_alive() and watch_threads() == []
