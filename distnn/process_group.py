"""Creating and destroying the process group: the only side effects of the launch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distnn.environment import LaunchEnv, Placement


class CollectiveFailed(RuntimeError):
    """A collective did not complete: a peer died, is unreachable, or exceeded the timeout."""


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turns a failing collective's error (gloo raises plain RuntimeErrors) into CollectiveFailed.

    Wrap each collective call in it, so that a lost peer is reported in one line while a
    bug elsewhere still shows its traceback.
    """
    try:
        yield
    except RuntimeError as error:
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise CollectiveFailed(f"{what} failed: {first_line}") from error


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
    with collective("joining the process group"):
        dist.init_process_group(backend=placement.backend,
                                timeout=timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        dist.destroy_process_group()


def gather_objects(local: Any, *, distributed: bool) -> list[Any]:
    """Every rank's ``local`` (picklable), in rank order; all ranks must call it.

    Used once at start-up, so that one rank's failed check (rank 0's output paths, say)
    stops every rank with the same message instead of leaving the others in a collective.
    """
    if not distributed:
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    with collective("the start-up exchange"):
        dist.all_gather_object(gathered, local)
    return gathered
