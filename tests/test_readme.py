"""The README and docs/ tell the truth: the example program runs, the printed losses are real,
every flag is documented, and every relative link leads somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, bin_path, clean_env, run_cli

README = (REPO / "README.md").read_text()
LIBRARY_API = (REPO / "docs" / "library-api.md").read_text()
FLAGS = (REPO / "docs" / "flags.md").read_text()


def api_example() -> str:
    block = LIBRARY_API.split("<!-- api-example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def readme_block(marker: str, language: str) -> str:
    block = README.split(f"<!-- {marker} -->", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", block, re.S).group(1)


def printed_losses(stdout: str) -> dict[int, float]:
    pairs = (line.split() for line in stdout.splitlines() if line[:1].isdigit())
    return {int(step): float(loss) for step, loss in pairs}


def run_in(directory, args):
    return subprocess.run(args, env=clean_env(), capture_output=True, text=True, timeout=180,
                          cwd=directory)


def test_the_fit_example_runs_alone_and_on_two_ranks_with_the_same_results(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(readme_block("fit-example", "python"))
    (tmp_path / "alone").mkdir()
    (tmp_path / "pair").mkdir()
    alone = run_in(tmp_path / "alone", [sys.executable, str(script)])
    assert alone.returncode == 0, alone.stderr[-2000:]
    pair = run_in(tmp_path / "pair", [bin_path("torchrun"), "--nproc_per_node=2", str(script)])
    assert pair.returncode == 0, pair.stderr[-2000:]
    one, two = printed_losses(alone.stdout), printed_losses(pair.stdout)
    assert list(one) == [0, 20, 40, 60] and list(two) == list(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    said = re.search(r"and\s+`(final accuracy \S+)`", README).group(1)
    assert alone.stdout.splitlines()[-1] == said == pair.stdout.splitlines()[-1]
    assert (tmp_path / "alone" / "ck-fit" / "step-80").is_dir()


def test_the_data_tutorial_runs_as_written_and_prints_what_the_readme_says(tmp_path):
    commands = readme_block("tutorial-data", "sh")
    env = clean_env(PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                          os.environ["PATH"]]))
    result = subprocess.run(["bash", "-euc", commands], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    said = re.search(r"ends with\s+`(val 80 [^`]+)`", README).group(1)
    assert said in result.stdout.splitlines()
    assert (tmp_path / "loss.png").exists() and (tmp_path / "ck" / "step-80").is_dir()


def test_the_language_model_tutorial_runs_as_written_and_prints_what_the_readme_says(tmp_path):
    commands = readme_block("tutorial-lm", "sh")
    env = clean_env(PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                          os.environ["PATH"]]))
    # bytes: the sampled text's may be any, a carriage return or half a character included
    result = subprocess.run(["bash", "-euc", commands], env=env, capture_output=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:].decode(errors="replace")
    lines = result.stdout.decode(errors="replace").splitlines()
    said = re.search(r"ends\s+with\s+`(val 120 [^`]+)`", README).group(1)
    assert said in lines
    first = re.search(r"loss falls from (\S+) ", README).group(1)
    assert f"0 {first}" in [line[:len(first) + 2] for line in lines]
    assert any(path.name.startswith("events.out.tfevents") for path in (tmp_path / "tb").iterdir())
    written = re.search(r'tools.sample \S+ --prompt "([^"]+)" --tokens (\d+)', commands)
    prompt, tokens = written.group(1).encode(), int(written.group(2))
    out = result.stdout  # the prompt, the bytes the model added, a newline
    assert out[-(len(prompt) + tokens + 1):].startswith(prompt), out[-500:]


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


def assert_printed_as_shown(stdout: str, shown: str, *, rel: float) -> None:
    """The steps the README shows, each loss within ``rel`` of it: the README's were printed
    on one CPU, and another rounds the sums in its own way (an AMD EPYC with AVX2 and an
    Intel Xeon with AVX-512 differ in the last digits)."""
    printed, want = printed_losses(stdout), printed_losses(shown)
    assert want and list(printed)[:len(want)] == list(want), stdout
    for step, loss in want.items():
        assert printed[step] == pytest.approx(loss, rel=rel), step


def test_the_tutorial_loss_lines_are_what_the_program_prints():
    shown = re.search(r"\$ python -m distnn.train --steps 3\n(.*?)summary:", README, re.S)
    result = run_cli([sys.executable, "-m", "distnn.train", "--steps", "3"])
    assert result.returncode == 0
    assert_printed_as_shown(result.stdout, shown.group(1), rel=1e-6)


def test_the_four_rank_tutorial_output_is_what_torchrun_prints():
    shown = re.search(r"\$ torchrun --nproc_per_node=4 -m distnn.train --log-every 100\n"
                      r"(.*?)summary: (world_size=4 device=cpu backend=gloo steps=500) .* "
                      r"final_loss=(\S+)\n", README, re.S)
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=4", "-m", "distnn.train",
                      "--log-every", "100", "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-2000:]
    # bit for bit on the CPU that printed them; on another, within the guarantee's 1e-5
    assert_printed_as_shown(result.stdout, shown.group(1), rel=1e-5)
    summary = result.stdout.splitlines()[-1]
    assert shown.group(2) in summary
    final = float(re.search(r"final_loss=(\S+)", summary).group(1))
    assert final == pytest.approx(float(shown.group(3)), rel=1e-4)  # 1.4574e-05: rounding grows


def test_every_flag_is_in_the_flags_table_of_docs_flags_md():
    import dataclasses

    from distnn.config import TrainConfig, flag_name

    table = FLAGS.split("## Flags", 1)[1].split("\n## ", 1)[0]
    for field in dataclasses.fields(TrainConfig):
        assert f"`{flag_name(field.name)}" in table or f"{flag_name(field.name)}`" in table, (
            f"{flag_name(field.name)} is missing from the Flags table in docs/flags.md")


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a page (outside code blocks)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file_and_heading_that_exist():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links, not code
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not file.is_file():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(
                    file.read_text()):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
