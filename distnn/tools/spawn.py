"""The ranks of a real gloo group on this machine, started as torchrun starts them, for the
tools that time distnn or set it beside other code (bench, bench_data, calibrate)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports on 127.0.0.1 that nothing listens on now (all held open until
    every one is chosen, so none is given twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def join(rank: int, world: int, port: int, threads: int | None = 1) -> None:
    """This process's place in the group, in the environment variables torchrun sets, and
    ``threads`` CPU threads (torchrun's OMP_NUM_THREADS=1 by default; None: leave as is)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def spawn(worker: Callable, world: int, *args: Any) -> None:
    """Runs ``worker(rank, world, port, *args)`` in ``world`` spawned processes, one per rank,
    and waits for all of them (an exception in one is raised here)."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world,
                       start_method="spawn")
