"""The README tells the truth: its example program runs, and its printed losses are real."""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import REPO, bin_path, run_cli

README = (REPO / "README.md").read_text()


def api_example() -> str:
    block = README.split("<!-- api-example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def printed_losses(stdout: str) -> dict[int, float]:
    pairs = (line.split() for line in stdout.splitlines())
    return {int(step): float(loss) for step, loss in pairs}


def test_the_library_example_runs_alone_and_on_two_ranks_with_the_same_losses(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(api_example())
    alone = run_cli([sys.executable, str(script)])
    assert alone.returncode == 0, alone.stderr[-2000:]
    pair = run_cli([bin_path("torchrun"), "--nproc_per_node=2", str(script)])
    assert pair.returncode == 0, pair.stderr[-2000:]
    one, two = printed_losses(alone.stdout), printed_losses(pair.stdout)
    assert list(one) == [0, 25, 50, 75] and list(two) == list(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


def test_the_tutorial_loss_lines_are_what_the_program_prints():
    shown = re.search(r"\$ python -m distnn.train --steps 3\n(.*?)summary:", README, re.S)
    result = run_cli([sys.executable, "-m", "distnn.train", "--steps", "3"])
    assert result.returncode == 0
    assert result.stdout.startswith(shown.group(1))


def test_the_four_rank_tutorial_output_is_what_torchrun_prints():
    shown = re.search(r"\$ torchrun --nproc_per_node=4 -m distnn.train --log-every 100\n"
                      r"(.*?)summary: (world_size=4 device=cpu backend=gloo steps=500) .* "
                      r"(final_loss=\S+)\n", README, re.S)
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=4", "-m", "distnn.train",
                      "--log-every", "100", "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(shown.group(1))  # same world size: the same bits
    summary = result.stdout.splitlines()[-1]
    assert shown.group(2) in summary and shown.group(3) in summary


def test_every_flag_is_in_the_readme_flags_table():
    import dataclasses

    from distnn.config import TrainConfig, flag_name

    table = README.split("## Flags", 1)[1].split("\n## ", 1)[0]
    for field in dataclasses.fields(TrainConfig):
        assert f"`{flag_name(field.name)}" in table or f"{flag_name(field.name)}`" in table, (
            f"{flag_name(field.name)} is missing from the README's Flags table")
