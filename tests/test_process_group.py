"""Leaving the process group: nothing of it outlives ``distnn.setup``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import bin_path, clean_env, free_port, run_cli

# One rank of a real gloo group: a collective, then torch._dynamo imported while the group
# exists (as torch.optim's step and --compile do), then the way out. Prints the names of the
# process's threads after setup() is left.
ONE_RANK = """
import os
import torch
import torch.distributed as dist
from distnn.distributed.runtime import setup

with setup(device="cpu", backend="gloo") as rt:
    assert rt.distributed
    dist.all_reduce(torch.ones(4))
    import torch._dynamo
    torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).step()
print(sorted(open(f"/proc/self/task/{task}/comm").read().strip()
             for task in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_the_group_and_its_gloo_threads_are_gone_after_setup_even_after_dynamo_is_imported():
    # A group kept alive past destroy_process_group keeps gloo's worker threads into the
    # interpreter's exit, where they can abort a run that went well (process_group.py).
    env = clean_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = run_cli([sys.executable, "-c", ONE_RANK], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    threads = result.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads, threads


JOIN_TWICE = """
import os, sys
import torch, torch.distributed as dist
import distnn
said = []
for attempt in range(2):
    try:
        with distnn.setup(device="cpu", backend="gloo") as rt:
            t = torch.ones(1)
            dist.all_reduce(t)
            said.append(f"joined {attempt} {int(t.item())}")
    except distnn.UsageError as error:
        said.append(str(error))
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.txt"), "w") as out:
    out.write("\\n".join(said))
"""


def test_a_second_join_is_refused_under_torchruns_store_and_works_elsewhere(tmp_path):
    script = tmp_path / "twice.py"
    script.write_text(JOIN_TWICE)
    # under torchrun (its agent's store): a second join failed to connect, or hung, on a rank
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", str(script), str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in range(2):
        first, second = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert first == "joined 0 2" and second.startswith(
            "this process already joined the job's process group and left it"), second
    # plain variables, rank 0 holding the store: joining again works
    env = clean_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    again = run_cli([sys.executable, str(script), str(tmp_path)], env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "rank0.txt").read_text().splitlines() == ["joined 0 1", "joined 1 1"]


def test_a_restarted_attempt_over_gloo_is_told_the_variable_that_lets_it_join(monkeypatch):
    from distnn.distributed.environment import LaunchEnv, Placement
    from distnn.distributed.process_group import _restart_hint

    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    launch = LaunchEnv(launcher="torchrun", rank=0, local_rank=0, world_size=2,
                       local_world_size=2, restart_count=1)
    gloo, nccl = Placement(device="cpu", backend="gloo"), Placement("cuda:0", "nccl")
    assert "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in _restart_hint(launch, gloo)
    assert _restart_hint(launch, nccl) == ""
    first = LaunchEnv(launcher="torchrun", rank=0, local_rank=0, world_size=2,
                      local_world_size=2)
    assert _restart_hint(first, gloo) == ""
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    assert _restart_hint(launch, gloo) == ""


def test_a_master_address_that_does_not_resolve_or_a_port_in_use_is_one_line(monkeypatch):
    # torch would try the address until the timeout, twice, then blame a peer; and it says
    # a port in use as a failed join
    import socket

    import distnn

    launch = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
              "MASTER_ADDR": "no.such.host.invalid", "MASTER_PORT": str(free_port())}
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distnn.UsageError, match="environment: MASTER_ADDR='no.such.host."
                                                "invalid' does not resolve"):
        with distnn.setup(device="cpu", sharding=False, timeout_s=10):
            pass
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(distnn.UsageError, match=f"environment: MASTER_PORT={port} is in "
                                                    "use by another process on this host"):
            with distnn.setup(device="cpu", sharding=False, timeout_s=10):
                pass
