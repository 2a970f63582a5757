"""Two torchrun agents on this machine form one 4-rank job (c10d rendezvous), as two nodes."""

from __future__ import annotations

import subprocess

from safetensors.torch import load_file

from tests.conftest import REPO, bin_path, clean_env, free_port, read_losses, read_metrics
from tests.reference import assert_matches_reference

STEPS = 150


def test_two_nodes_of_two_ranks_match_the_reference(tmp_path):
    port = free_port()
    outputs = ["--steps", str(STEPS), "--metrics", str(tmp_path / "m.jsonl"),
               "--save", str(tmp_path / "w.safetensors"), "--log-every", "1"]
    agents = [subprocess.Popen(
        ["bash", "launch/torchrun-multinode.sh", *outputs], cwd=REPO,
        env=clean_env(NNODES="2", NPROC="2", RDZV_ENDPOINT=f"127.0.0.1:{port}",
                      RDZV_ID="two-nodes", PATH=f"{bin_path('torchrun').rsplit('/', 1)[0]}:"
                      + clean_env()["PATH"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [agent.communicate(timeout=180) for agent in agents]
    for agent, (_, err) in zip(agents, results, strict=True):
        assert agent.returncode == 0, err[-3000:]
    summary = read_metrics(tmp_path / "m.jsonl")[-1]
    assert summary["world_size"] == 4
    assert_matches_reference(read_losses(tmp_path / "m.jsonl"),
                             load_file(tmp_path / "w.safetensors"), steps=STEPS)
