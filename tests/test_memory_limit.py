"""python -m distnn.tools.memory_limit: real memory cgroups, a tiny GPT on 2 ranks. A limit
the process fits in trains every layer count tried; one below what torch alone takes kills
the ranks, and the tool reports that no model trains, with the cgroups removed after."""

from __future__ import annotations

import json
import os

import pytest

from distnn.tools.memory_limit import CGROUP_ROOT, check_cgroups, main

TINY = ["--world", "2", "--d-model", "32", "--heads", "2", "--context", "16",
        "--max-layers", "2", "--timeout-s", "30", "--modes", "parameters"]


def leftovers() -> list[str]:
    """This process's cgroups (the tool names them by its pid)."""
    return [name for name in os.listdir(CGROUP_ROOT)
            if name.startswith(f"distnn-limit-{os.getpid()}-")]


@pytest.mark.skipif(check_cgroups() is not None, reason="no memory cgroups here")
def test_the_bisection_finds_what_trains_under_the_limit_and_what_does_not(tmp_path):
    out = tmp_path / "fits"
    assert main(["--out", str(out), "--limit-mb", "800", *TINY]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    row = report["modes"]["parameters"]
    # 1..2 by bisection: 1 passes, then 2 passes
    assert [t["layers"] for t in row["trials"]] == [1, 2]
    assert row["largest"]["layers"] == 2 and row["first_failing_layers"] is None
    for rank in row["largest"]["ranks"]:
        assert 50 * 10**6 < rank["max_usage_bytes"] <= 800 * 10**6
    assert "| parameters | 2 |" in out.with_suffix(".md").read_text()

    out = tmp_path / "none-fits"
    assert main(["--out", str(out), "--limit-mb", "120", *TINY]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    row = report["modes"]["parameters"]
    assert [t["layers"] for t in row["trials"]] == [1]  # killed: nothing smaller to try
    assert row["largest"] is None and row["first_failing_layers"] == 1
    assert row["trials"][0]["exit_code"] != 0
    assert leftovers() == []


def test_bad_modes_are_one_line_and_exit_2(capsys):
    assert main(["--modes", "zero"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "distnn: error: --modes: got 'zero'; allowed: some of none, optimizer, gradients, "
        "parameters"]
