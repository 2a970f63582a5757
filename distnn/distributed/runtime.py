"""The library's entry: ``with distnn.setup() as rt:`` joins the job, and leaves it after."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from distnn.distributed.environment import (
    LaunchEnv,
    Placement,
    detect_launch,
    resolve_placement,
    single_process_notice,
)
from distnn.distributed.launcher_watch import launcher_gone, launcher_watch
from distnn.distributed.process_group import process_group
from distnn.errors import EXIT_SIGNAL_BASE, RunFailed, UsageError

log = logging.getLogger("distnn")


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job and where it computes."""

    launch: LaunchEnv
    placement: Placement
    distributed: bool  # True when a process group exists (any launcher, even world size 1)
    sharding: bool = True  # whether torch's sharding modules came before the group (setup)

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def communicates(self) -> bool:
        """True when there are other ranks to sum with: a group of one has nothing to sum."""
        return self.distributed and self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that prints and writes files."""
        return self.launch.is_main

    @property
    def device(self) -> torch.device:
        return torch.device(self.placement.device)


@contextmanager
def setup(*, device: str = "auto", backend: str = "auto", timeout_s: float = 300.0,
          launch: LaunchEnv | None = None, sharding: bool = True) -> Iterator[Runtime]:
    """Joins the job described by the launcher's environment; leaves it on every way out.

    Reads torchrun's/accelerate's variables (``launch``, when given, instead of reading
    ``os.environ``), picks the device and backend (``auto``: ``cuda:LOCAL_RANK`` with NCCL
    when every local rank has a GPU, else the CPU with gloo), sets the CUDA device, then
    creates the process group with ``timeout_s`` as the bound on every collective. Without
    a launcher it yields a single-process runtime with no process group.
    Under torchrun's agent (``launch.agent``) a rank whose agent dies sends itself SIGTERM
    within about a second, so it stops as if preempted instead of training on as an orphan
    (distnn.distributed.launcher_watch); the watch ends when this context does. An agent
    gone already is RunFailed (exit 143) at once.
    ``sharding=False`` promises that no run inside shards (``shard="none"``), which saves
    each rank importing torch's sharding modules (0.7 s on a CPU): they must be imported
    before the group is made, or they hold it past its end and the process may abort as it
    exits.
    Raises UsageError for an impossible device/backend or launch environment.
    """
    _check_arguments(device=device, backend=backend, timeout_s=timeout_s)
    launch = launch or detect_launch(os.environ)
    gone = launcher_gone() if launch.agent else None
    if gone is not None:  # killed while this rank started: its store went with it
        raise RunFailed(f"the launcher (pid {gone}) was gone before this rank joined the job, "
                        "so nothing was trained (as if preempted before the first step)",
                        EXIT_SIGNAL_BASE + signal.SIGTERM, label="stopped")
    placement = resolve_placement(device=device, backend=backend, launch=launch,
                                  cuda_devices=torch.cuda.device_count())
    if launch.is_main:
        for notice in (single_process_notice(launch), placement.notice):
            if notice:
                log.warning(notice)
    with (launcher_watch(launch.agent),
          process_group(launch, placement, timeout_s=timeout_s,
                        sharding=sharding) as distributed):
        yield Runtime(launch=launch, placement=placement, distributed=distributed,
                      sharding=sharding)


def _check_arguments(*, device: str, backend: str, timeout_s: float) -> None:
    """setup's arguments as the command line's flags allow them (UsageError otherwise)."""
    for name, value, allowed in (("device", device, ("auto", "cpu", "cuda")),
                                 ("backend", backend, ("auto", "gloo", "nccl"))):
        if value not in allowed:
            raise UsageError(f"distnn.setup: {name}={value!r}; allowed: "
                             + ", ".join(repr(choice) for choice in allowed))
    if (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
            or not 1 <= timeout_s <= 1e6):
        raise UsageError(f"distnn.setup: timeout_s={timeout_s!r}; allowed: seconds from 1 "
                         "to 1e6")
