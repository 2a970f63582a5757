"""A newcomer's checkout: a fresh clone in a folder named distnn, inside a folder that other
users cannot read (a mode-700 home, /root, mktemp -d), with its venv at distnn/.venv as
`make install` puts it.

Two tests once failed only there: one read "distnn/" in torchrun's own traceback
(``.../distnn/.venv/bin/torchrun``) as a rank's traceback, and one ran the netns script as
uid 65534, which cannot open a file under a mode-700 folder. The whole suite is too slow to
run twice in CI, so this clones the checkout's HEAD (committed code only) into such a place and
runs those two there, with this venv seen from inside the clone and the clone's code on
PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env

CASES = [
    "tests/test_io_faults.py::"
    "test_a_checkpoint_that_cannot_be_written_stops_every_rank_with_the_reason",
    "tests/test_netns_cluster.py::test_refuses_without_root_in_one_line",
]


def checkout_root() -> Path | None:
    """REPO when it is the top of a git work tree, else None."""
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"],
                          capture_output=True, text=True)
    if done.returncode != 0 or Path(done.stdout.strip()).resolve() != REPO:
        return None
    return REPO


def test_a_fresh_clone_named_distnn_in_a_private_folder_passes_its_path_tests(tmp_path):
    if checkout_root() is None:
        pytest.skip(f"{REPO} is not a git checkout (or git is not installed)")
    private = tmp_path / "home"
    private.mkdir()
    private.chmod(0o700)
    clone = private / "distnn"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=60)

    # This venv, at the clone's .venv as `make install` would put it: torchrun's traceback then
    # names .../distnn/.venv/bin/torchrun. (Outside a venv, this Python as it is.)
    if sys.prefix != sys.base_prefix:
        (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        python = str(clone / ".venv" / "bin" / Path(sys.executable).name)
    else:
        python = sys.executable
    env = {k: v for k, v in clean_env().items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(clone)

    where = subprocess.run([python, "-c", "import distnn; print(distnn.__file__)"], env=env,
                           cwd=clone, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == (clone / "distnn" / "__init__.py").resolve()

    done = subprocess.run([python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CASES],
                          env=env, cwd=clone, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert " passed" in output and "failed" not in output, output[-4000:]
    assert os.stat(private).st_mode & 0o777 == 0o700
