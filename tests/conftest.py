"""Shared helpers: real gloo process groups in spawned processes, and CLI runners."""

from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import distnn
from distnn.distributed.process_group import SHARDING_MODULES

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(distnn.__file__).resolve().parent  # the distnn whose code the ranks run
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


# A Python traceback's frame line, as printed whole or behind a prefix such as "[rank0]: "
_FRAME = re.compile(r'File "(?P<path>[^"\n]+)", line \d+')


def package_frames(text: str) -> list[str]:
    """The traceback frames in ``text`` whose file lies inside the distnn package.

    A rank that dies with a traceback prints frames of distnn's own files; torchrun's traceback
    (printed when any rank fails) has none. Checking for "distnn/" or "Traceback" instead
    matches torchrun's frames too wherever the checkout lies in a folder named distnn
    (``.../distnn/.venv/bin/torchrun``). Use ``assert not package_frames(stderr)``.
    """
    frames = []
    for match in _FRAME.finditer(text):
        path = Path(match["path"])
        if path.is_absolute() and path.resolve().is_relative_to(PACKAGE):
            frames.append(match.group(0))
    return frames


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher or accelerate variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# run_world's ranks are forked from a server process that imported torch and distnn once for
# the session: a spawned rank would import them afresh (1-2 s of CPU a rank, most of a small
# run's time on this project's 2-core machine). Each rank is still a process of its own, in
# a gloo group of its own, with the environment of the test that started it.
mp.set_forkserver_preload(["torch", "safetensors.torch", "distnn.trainer", "distnn.config",
                           "distnn.distributed.runtime", "distnn.settings", "tests.conftest",
                           *SHARDING_MODULES])


def start_ranks(worker, args: tuple, *, nprocs: int) -> None:
    """``worker(rank, *args)`` in ``nprocs`` processes forked from the server (an exception
    in one is raised here), each with this process's environment as it is now."""
    mp.start_processes(_in_environ, args=(worker, dict(os.environ), *args), nprocs=nprocs,
                       start_method="forkserver")


def _in_environ(rank: int, worker, environ: dict[str, str], *args) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the test's, not the fork server's (made at its first use)
    worker(rank, *args)


def as_rank(rank: int, world_size: int, port: int) -> None:
    """The launcher's part: describes this process's place in a one-machine job, as torchrun
    would (its variables; the group's store on ``port``)."""
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    })


def _rank_worker(rank: int, world_size: int, port: int, argv: list[str], out_dir: str) -> None:
    as_rank(rank, world_size, port)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # a rank that dies of a signal (SIGABRT, SIGSEGV) prints where each thread was
    faulthandler.enable(all_threads=True)
    from safetensors.torch import save_file

    from distnn.config import parse_config
    from distnn.distributed.runtime import setup
    from distnn.settings import Settings
    from distnn.trainer import Trainer

    config = parse_config(argv)
    from distnn.distributed.sharding import is_dtensor

    with setup(device=config.device, backend=config.backend, timeout_s=config.timeout_s,
               sharding=config.shard != "none") as rt:
        result = Trainer(config, rt, settings=Settings.from_environ(os.environ)).train()
        # a sharded model's weights gathered whole (every rank takes part)
        state = {k: (v.full_tensor() if is_dtensor(v) else v).detach().cpu()
                 .contiguous().clone() for k, v in result.model.state_dict().items()}
        save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
        if torch.distributed.is_initialized():  # (a launcher's group, one rank or more)
            # The result's FSDP2 or ZeroRedundancyOptimizer holds the gloo group past its
            # destruction, as DDP does, and the process's teardown can then abort it
            # ("terminate called without an active exception": seen twice in full-suite runs
            # of test_sharding); end as the benchmarks' DDP workers end, results written.
            from distnn.tools.bench_loops import end_worker

            end_worker()


def run_world(world_size: int, argv: list[str], out_dir: Path) -> dict:
    """Trains with ``world_size`` real gloo ranks, each a process of its own (forked from a
    server that imported torch once).

    Returns {"losses": rank 0's per-step global losses, "weights": [each rank's state_dict],
    "val": rank 0's validation records}.
    """
    from safetensors.torch import load_file

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.jsonl"
    argv = [*argv, "--log-every", "1", "--metrics", str(metrics), "--device", "cpu"]
    start_ranks(_rank_worker, (world_size, free_port(), argv, str(out_dir)), nprocs=world_size)
    return {
        "losses": read_losses(metrics),
        "val": read_events(metrics),
        "weights": [load_file(out_dir / f"rank{r}.safetensors") for r in range(world_size)],
    }


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_losses(path: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(path) if "step" in row and "event" not in row]


def read_events(path: Path, event: str = "val") -> list[dict]:
    return [row for row in read_metrics(path) if row.get("event") == event]


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
            ) -> subprocess.CompletedProcess:
    """Runs a command (a list, the program first) with a clean launch environment."""
    return subprocess.run(args, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@contextmanager
def running(args: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(args, **kwargs)``, killed on the way out if it still runs: a test
    that fails while a long run goes on (10**7 steps, say) leaves no process behind to eat
    the CPU of the tests after it. (Popen's own ``with`` waits for it instead.)"""
    job = subprocess.Popen(args, **kwargs)
    try:
        yield job
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def bin_path(name: str) -> str:
    """A console script installed beside this Python (torchrun, accelerate)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed beside {sys.executable}")
    return str(path)


@pytest.fixture
def no_launcher(monkeypatch):
    """In-process runs of distnn.train.main see no launcher in the environment."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(name)
