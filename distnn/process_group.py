"""Creating and destroying the process group: the only side effects of the launch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from distnn.environment import LaunchEnv, Placement


@contextmanager
def process_group(launch: LaunchEnv, placement: Placement, *, timeout_s: float) -> Iterator[bool]:
    """Sets this rank's device, then joins the job's process group; yields whether one exists.

    Under a launcher the group is created from the launcher's environment (``env://``) with
    ``timeout_s`` as the bound on every collective, so a missing or dead peer ends the run
    with an error instead of a hang. It is destroyed on every way out; on success after a
    barrier, so no rank tears down while a peer still talks to it.
    """
    if placement.device.startswith("cuda"):
        # Before init_process_group, so NCCL binds this rank to its own GPU.
        torch.cuda.set_device(torch.device(placement.device))
    if not launch.needs_process_group:
        yield False
        return
    dist.init_process_group(backend=placement.backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        dist.destroy_process_group()


def first_error(local_error: str | None, *, distributed: bool) -> str | None:
    """Every rank's verdict on a check, shared: returns the lowest rank's error, or None.

    All ranks must call it. It lets one rank's failed check (rank 0's output paths, say) stop
    every rank with the same message, instead of leaving the others waiting in a collective.
    """
    if not distributed:
        return local_error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local_error)
    return next((error for error in errors if error), None)
