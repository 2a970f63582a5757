"""launch/netns-cluster.sh: hosts with their own addresses (network namespaces on a bridge) on
this machine, one distnn job across them, and nothing left behind afterwards."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, bin_path, clean_env, read_losses, read_metrics
from tests.reference import assert_matches_reference

SCRIPT = REPO / "launch" / "netns-cluster.sh"
STEPS = 100
# a step count no other test uses: its processes are found by it (pgrep), and other test
# files run beside this one (make test: pytest-xdist)
LONG_RUN = "1000017"


@functools.cache
def cluster_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "'ip' (iproute2) is not installed"
    probe = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0:
        return f"cannot build a namespace cluster here: {probe.stderr.strip()}"
    return None


def run_cluster(*, hosts: int, procs: int, argv: list[str], rate: str | None = None,
                timeout: int = 120) -> subprocess.CompletedProcess:
    """Runs distnn.train with ``argv`` across ``hosts`` namespaces of ``procs`` ranks each."""
    bin_path("torchrun")
    options = ["--hosts", str(hosts), "--procs", str(procs), "--timeout", str(timeout)]
    if rate:
        options += ["--rate", rate]
    return subprocess.run(["bash", str(SCRIPT), *options, "--", *argv], cwd=REPO,
                          env=clean_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=timeout + 60)


def own_namespaces(pid: int) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines()
            if line.startswith(f"distnn-{pid}-")]


def orphaned_namespaces() -> list[str]:
    """The tool's namespaces whose run (the PID in the name) has ended."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.startswith("distnn-")]
    return [name for name in names if not Path(f"/proc/{name.split('-')[1]}").exists()]


@pytest.fixture
def cluster():
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)


def outputs(tmp_path: Path) -> list[str]:
    # The namespaces share the file system: rank 0 on host 0 writes where the test reads.
    return ["--steps", str(STEPS), "--log-every", "1", "--metrics", str(tmp_path / "m.jsonl"),
            "--save", str(tmp_path / "w.safetensors")]


@pytest.mark.parametrize("hosts", [2, 3])
def test_hosts_of_one_rank_match_the_reference(cluster, tmp_path, hosts):
    done = run_cluster(hosts=hosts, procs=1, argv=outputs(tmp_path),
                       rate="1gbit" if hosts == 3 else None)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"summary: world_size={hosts} " in done.stdout
    assert done.stdout.count("== host ") == hosts
    summary = read_metrics(tmp_path / "m.jsonl")[-1]
    assert summary["world_size"] == hosts
    assert_matches_reference(read_losses(tmp_path / "m.jsonl"),
                             load_file(tmp_path / "w.safetensors"), steps=STEPS)


def test_a_failing_host_fails_the_run_and_leaves_nothing(cluster):
    done = run_cluster(hosts=2, procs=1, argv=["--steps", "5", "--no-such-flag"], timeout=60)
    assert done.returncode == 1
    assert "no-such-flag" in done.stdout
    assert orphaned_namespaces() == []


def test_ctrl_c_tears_the_cluster_down(cluster):
    bin_path("torchrun")
    agent = subprocess.Popen(["bash", str(SCRIPT), "--hosts", "2", "--", "--steps", LONG_RUN,
                              "--log-every", "0"], cwd=REPO,
                             env=clean_env(PYTHON=sys.executable),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             # a shell cannot trap a SIGINT it was started ignoring, as a
                             # suite run in the background (`make test &`) would pass it on
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while len(own_namespaces(agent.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(own_namespaces(agent.pid)) == 3  # the switch and two hosts
        time.sleep(3)  # the agents are up
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 130, err[-2000:]
    assert own_namespaces(agent.pid) == []
    leftover = subprocess.run(["pgrep", "-f", f"steps {LONG_RUN}( |$)"], capture_output=True,
                              text=True)
    assert leftover.stdout == ""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to try it as another user")
def test_refuses_without_root_in_one_line():
    # As root, the script runs as uid 65534 (nobody). This test reads the script and hands it
    # to bash on stdin: a checkout in a folder other users cannot enter (a mode-700 home,
    # /root, mktemp -d) holds a script that uid 65534 cannot open by its path.
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is not installed: cannot run as another user")
        as_user, uid = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"], 65534
    else:
        as_user, uid = [], os.geteuid()
    done = subprocess.run([*as_user, "bash", "-s", "--", "--check"], input=SCRIPT.read_text(),
                          cwd="/", capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"netns-cluster: needs root to create network namespaces (running as uid {uid})"]


def test_bad_options_are_one_line_and_exit_2():
    for options in (["--hosts", "9"], ["--rate", "fast"], ["--bogus"]):
        done = subprocess.run(["bash", str(SCRIPT), *options], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2, options
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
