"""Creating and destroying the process group (the only side effects of the launch), and the
failures of its collectives: CollectiveFailed, and DeviceWatch's bounded waits on the GPU."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Imported before any group exists, on purpose. torch.distributed.nn.functional binds
# ``group.WORLD`` as a default argument when it is first imported; imported after the group
# is made (torch._dynamo imports it, and torch.optim's step imports torch._dynamo), it holds
# the group past destroy_process_group, and with it gloo's worker threads, into the
# interpreter's exit. A worker that then lets go of a collective's tensor needs the
# interpreter and aborts the process ("terminate called without an active exception",
# SIGABRT) after a run that went well. Imported first, it binds None.
import torch.distributed.nn  # noqa: F401

from distnn.distributed.environment import LaunchEnv, Placement
from distnn.errors import UsageError

# torch's sharding modules bind ``group.WORLD`` the same way when first imported (FSDP's
# ShardedGradScaler, ZeroRedundancyOptimizer's helpers): a run that shards imports them before
# its group is made (process_group's ``sharding``). The others need not pay their 0.7 s.
SHARDING_MODULES = ("torch.distributed.fsdp", "torch.distributed.tensor",
                    "torch.distributed.optim.zero_redundancy_optimizer")


class CollectiveFailed(RuntimeError):
    """A collective did not complete: a peer died, is unreachable, or exceeded the timeout."""


class DeviceStalled(CollectiveFailed):
    """This rank's GPU did not finish its queued steps in time: a collective in them waits for
    a peer that does not come. The GPU stays stuck, so the process must not wait on it again
    (tearing down the group or CUDA would): exit at once."""


FAILURE_KEY = "distnn/failure"  # a rank's reason for stopping, in the job's store
STORE_WAIT_S = 2.0  # how long reading or writing it may take: the store may be gone too
STORE_PROBE_S = 0.2  # how often a rank tries to reach rank 0's store before joining
SPIN_S = 0.01  # DeviceWatch polls without sleeping for this long, then once a millisecond


class DeviceWatch:
    """Bounded waits for this rank's device: every read of step results waits here first.

    On a GPU the host reads a result (a loss, the stop votes) only once the device is done
    with it, and CUDA waits for that without a bound. NCCL's watchdog fails a collective that
    waits too long for a peer, but not one inside a CUDA graph (PyTorch leaves captured work
    out of it), so under --cuda-graph a peer that hangs while alive would hang every other
    rank's next read for good. Waiting here instead turns that into DeviceStalled after
    ``timeout_s`` (--timeout-s): one line, exit 2. After a stall every later wait fails at
    once. On the CPU there is nothing to wait for: results are ready when a call returns, and
    gloo's collectives have their own timeout.
    """

    def __init__(self, device: torch.device, *, timeout_s: float) -> None:
        self.on_gpu = device.type == "cuda"
        self.timeout_s = timeout_s
        self.stalled = False

    def wait(self, event: torch.cuda.Event | None = None) -> None:
        """Returns once the device has done ``event`` (default: all the work queued so far)."""
        if not self.on_gpu:
            return
        if event is None:
            event = torch.cuda.Event()
            event.record()
        started = time.monotonic()
        while not self.stalled and not event.query():
            waited = time.monotonic() - started
            if waited >= self.timeout_s:
                self.stalled = True
            elif waited >= SPIN_S:
                time.sleep(1e-3)  # a long wait (a big step, say): no CPU spent on it
            # else spin, as CUDA's own synchronize does: a short wait wakes at once, and the
            # steps queued behind the event keep the GPU busy meanwhile
        if self.stalled:
            raise DeviceStalled(f"waiting for this rank's GPU failed: the steps queued on it did "
                                f"not finish within {self.timeout_s:g} s")


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


# What torch's backends say when a peer is gone or silent (gloo raises plain RuntimeErrors)
_COMMUNICATION = re.compile(r"gloo|nccl|connection (closed|reset|refused)|broken pipe|"
                            r"timed out|timeout", re.IGNORECASE)


@contextmanager
def communication(what: str) -> Iterator[None]:
    """For work in which torch's own code runs collectives among other things (FSDP2's
    gathers in a forward, ZeroRedundancyOptimizer's broadcasts in its step): an error of
    communication becomes CollectiveFailed, as in :func:`collective`, so that a lost peer
    is reported in one line; any other error (the user's model, out of memory) passes as it
    is, with its traceback."""
    try:
        yield
    except RuntimeError as error:
        text = str(error).strip()
        if isinstance(error, CollectiveFailed) or not (
                isinstance(error, dist.DistError) or _COMMUNICATION.search(text)):
            raise
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise CollectiveFailed(f"{what} failed: {first_line}") from error


@contextmanager
def process_group(launch: LaunchEnv, placement: Placement, *, timeout_s: float,
                  sharding: bool = True) -> Iterator[bool]:
    """Sets this rank's device, then joins the job's process group; yields whether one exists.

    Under a launcher the group is created from the launcher's environment (``env://``) with
    ``timeout_s`` as the bound on every collective, so a missing or dead peer ends the run
    with an error instead of a hang. It is destroyed on every way out. ``sharding``: the
    group may be used by torch's sharding (--shard), whose modules are imported first.
    """
    if placement.device.startswith("cuda"):
        # Before init_process_group, so NCCL binds this rank to its own GPU.
        torch.cuda.set_device(torch.device(placement.device))
    if not launch.needs_process_group:
        yield False
        return
    if _left and launch.agent_store and launch.world_size > 1:
        # (torchrun's store still holds the first group's addresses: a second join fails
        # to connect, or waits, on some of the ranks)
        raise UsageError("this process already joined the job's process group and left it, "
                         "and it cannot join again; allowed: one `with distnn.setup() as "
                         "rt:` around the whole program, with distnn.fit(..., runtime=rt) "
                         "inside it as often as needed")
    if sharding:
        for module in SHARDING_MODULES:
            importlib.import_module(module)
    _check_master_address(os.environ)
    if not launch.agent_store and launch.rank != 0:  # (rank 0 serves it; an agent's is up)
        _wait_for_store(os.environ, timeout_s)
    with collective(f"joining the process group{_restart_hint(launch, placement)}"):
        try:
            dist.init_process_group(backend=placement.backend,
                                    timeout=timedelta(seconds=timeout_s))
        except RuntimeError as error:
            if "EADDRINUSE" not in str(error):
                raise
            raise UsageError(f"environment: MASTER_PORT={os.environ.get('MASTER_PORT')} is in "
                             "use by another process on this host; allowed: a free port "
                             "(torchrun --master-port, or --rdzv-endpoint HOST:PORT)") from None
    try:
        yield True
    finally:
        _clear_sharding_caches()
        dist.destroy_process_group()
        _left.append(True)


def _clear_sharding_caches() -> None:
    """Empties DTensor's caches of how each op shards its inputs (one in Python, one in C++).
    Every entry holds a device mesh, and a mesh holds the process group: left full, they would
    keep the group alive past destroy_process_group, as the imports above would. (FSDP2's
    parameters are DTensors; a group made with ``sharding=False`` never imports the module.)"""
    if "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import debug

    clear = getattr(debug, "_clear_sharding_prop_cache", None)  # private: absent, nothing to do
    if clear is not None:
        clear()


_left: list[bool] = []  # whether this process has left a process group (see process_group)


def _check_master_address(environ: Mapping[str, str]) -> None:
    """A MASTER_ADDR that does not resolve is refused at once: torch would try to reach it
    until the timeout, twice, and then blame a peer."""
    address = environ.get("MASTER_ADDR")
    if not address:
        return
    try:
        socket.getaddrinfo(address, None)
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise UsageError(f"environment: MASTER_ADDR={address!r} does not resolve ({reason}); "
                         "allowed: the host name or IP address of the job's rank 0") from None


def _wait_for_store(environ: Mapping[str, str], timeout_s: float) -> None:
    """Returns once something listens at MASTER_ADDR:MASTER_PORT, where rank 0's process
    serves the job's store, trying for ``timeout_s`` (rank 0 may start later). Nothing there
    is CollectiveFailed in one line after ``timeout_s``: torch's own client would try for
    ``timeout_s``, then again after a random delay (up to 3x in all), printing some 40 lines
    of warnings and C++ frames before it gave up."""
    address, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(1.0, left))):
                return
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
        if left <= 0:
            where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"  # IPv6
            raise CollectiveFailed(f"joining the process group failed: nothing listened at "
                                   f"{where} (MASTER_ADDR:MASTER_PORT, where rank 0 serves "
                                   f"the job's store): {reason}")
        time.sleep(min(STORE_PROBE_S, max(0.0, left)))


def _restart_hint(launch: LaunchEnv, placement: Placement) -> str:
    """For an elastic restart over gloo that shares torchrun's rendezvous store: a restarted
    attempt may read the previous attempt's addresses there and fail to connect (pytorch
    issue 135712). Named where the join fails; empty otherwise."""
    if (launch.restart_count and placement.backend == "gloo"
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"):
        return (f" (attempt {launch.restart_count + 1} of an elastic job over gloo: set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, see docs/launching.md)")
    return ""


def gather_objects(local: Any, *, distributed: bool,
                   what: str = "the start-up exchange") -> list[Any]:
    """Every rank's ``local`` (picklable), in rank order; all ranks must call it. ``what``
    names the exchange in the error of a failed collective.

    Used at start-up, so that one rank's failed check (rank 0's output paths, say) stops
    every rank with the same message instead of leaving the others in a collective, and
    where every rank's outcome of a shared write decides what all of them do.
    """
    if not distributed:
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    with collective(what):
        dist.all_gather_object(gathered, local)
    return gathered


def tell_peers(message: str, exit_code: int, *, launch: LaunchEnv) -> None:
    """Leaves this rank's reason for stopping in the job's key-value store, for its peers.

    A rank that stops alone (out of memory in a step, an error in the user's model) leaves
    its peers waiting in a collective that then fails for want of it; they read this
    (:func:`peer_failure`) and report the cause rather than a lost peer. Only where the
    store is torchrun's agent's (``launch.agent_store``), which outlives every rank: a store
    held by rank 0's process can be gone, or frozen with it. The first reason left stays.
    """
    store = _store(launch)
    if store is None:
        return
    record = json.dumps({"rank": dist.get_rank(), "message": message, "exit_code": exit_code})
    _bounded(lambda: store.compare_set(_failure_key(launch), "", record))


def peer_failure(launch: LaunchEnv) -> dict[str, Any] | None:
    """The reason a rank left with :func:`tell_peers` ({"rank", "message", "exit_code"}), or
    None: none left, no agent's store, or the store did not answer within STORE_WAIT_S."""
    store = _store(launch)
    if store is None:
        return None
    key = _failure_key(launch)
    text = _bounded(lambda: store.get(key) if store.check([key]) else None)
    return json.loads(text) if text else None


def _failure_key(launch: LaunchEnv) -> str:
    return f"{FAILURE_KEY}/{launch.restart_count}"  # one per attempt of an elastic job


def _store(launch: LaunchEnv) -> dist.Store | None:
    """The default process group's store when it is the agent's; None otherwise."""
    if not (launch.agent_store and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private helper of torch's: absent, nothing to share
        return None


def _bounded(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or None when it raised or took longer than STORE_WAIT_S: a store
    whose host is frozen can block a call beyond the store's own timeout, so it runs in a
    daemon thread (the store's calls release the GIL), left behind if it does not return."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception:  # noqa: BLE001 - best effort: the caller reports what it has
            pass

    thread = threading.Thread(target=run, name="distnn-store", daemon=True)
    thread.start()
    thread.join(STORE_WAIT_S)
    return result[0] if result else None
