"""The loops distnn is measured against, written out here without distnn: the tutorial loop,
PyTorch DDP (directly or through Accelerate), and the floor, the tutorial loop captured
whole in one CUDA graph by hand. ``python -m distnn.tools.bench`` runs them beside distnn.

Each returns (ms per timed step, the global loss of every step, warm-up included), so the
benchmark can check each against the reference loop's losses before its time counts.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from distnn.config import TrainConfig
from distnn.data.shards import reference_setup, shard_bounds
from distnn.tools.workload import Workload

GRAPH_WARMUP_STEPS = 3  # before a capture, as the torch.cuda.graphs documentation does


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_and_shard(work: Workload, rank: int, world: int, device: torch.device):
    x, y, model = reference_setup(work.config())
    start, stop = shard_bounds(work.batch_size, world, rank)
    return model.to(device), x[start:stop].to(device), y[start:stop].to(device)


def end_worker() -> NoReturn:
    """Ends a spawned benchmark worker that has run DDP, once its results are written: every
    rank meets at a barrier, then exits without the process's teardown.

    DDP on gloo can abort a process as it tears down, after all its work is done
    ("terminate called without an active exception"); dropping the DDP module first makes
    it rare, not impossible, and an aborted worker fails the run that spawned it. The peers
    are past the last collective, so nothing waits on this rank's group.
    """
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def time_steps(step: Callable[[int], None], steps: int, warmup: int,
                device: torch.device) -> float:
    """Runs ``step(i)`` for ``warmup`` untimed then ``steps`` timed steps; returns ms/step."""
    for index in range(warmup):
        step(index)
    sync(device)
    started = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    sync(device)
    return (time.perf_counter() - started) / steps * 1e3


def reference_loop(work: Workload, steps: int, warmup: int, device: torch.device,
                   per_step_sync: bool) -> tuple[float, list[float]]:
    """The tutorial loop in one process: ``loss.item()`` every step, or losses kept on device."""
    model, x, y = model_and_shard(work, 0, 1, device)
    loss_fn = nn.MSELoss(reduction="sum")
    params = list(model.parameters())
    losses = torch.zeros(warmup + steps, device=device)
    printed = []

    def step(index: int) -> None:
        loss = loss_fn(model(x), y)
        if per_step_sync:
            printed.append(loss.item())
        else:
            losses[index] = loss.detach()
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            if per_step_sync:
                for param in params:
                    param -= work.lr * param.grad
            else:
                torch._foreach_add_(params, [p.grad for p in params], alpha=-work.lr)

    ms = time_steps(step, steps, warmup, device)
    return ms, printed if per_step_sync else losses.tolist()


def ddp_loop(work: Workload, steps: int, warmup: int, device: torch.device,
             use_accelerate: bool) -> tuple[float, list[float]]:
    """PyTorch DDP (directly, or through Accelerate) on the same work.

    DDP averages gradients, so the loss is scaled by the world size to get the sum; the
    update is the same manual SGD. The global loss is summed once, after the timed steps.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    model, x, y = model_and_shard(work, rank, world, device)
    accelerator = None
    if use_accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device.type == "cpu")
        wrapped = accelerator.prepare(model)
    else:
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    loss_fn = nn.MSELoss(reduction="sum")
    params = list(model.parameters())
    losses = torch.zeros(warmup + steps, device=device)

    def step(index: int) -> None:
        loss = loss_fn(wrapped(x), y)
        losses[index] = loss.detach()
        wrapped.zero_grad()
        if accelerator:
            accelerator.backward(loss * world)
        else:
            (loss * world).backward()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-work.lr)

    ms = time_steps(step, steps, warmup, device)
    dist.all_reduce(losses)  # local losses -> global, outside the timed steps
    # DDP's teardown on gloo can abort the process at exit unless it is dropped first (see
    # end_worker): drop it, collect, and meet at a barrier.
    wrapped = accelerator = None
    gc.collect()
    dist.barrier()
    return ms, losses.tolist()


def graph_floor_loop(work: Workload, steps: int, warmup: int, device: torch.device,
                     compiled: bool) -> tuple[float, list[float]]:
    """The floor (:func:`captured_floor`) timed: each replay's loss kept on the device, as
    distnn keeps it. distnn's ``--cuda-graph`` and ``--compile`` are measured against it in
    the same run, on the same GPU."""
    replay_graph, captured_loss = captured_floor(work.config(), device, compiled=compiled)
    losses = torch.zeros(warmup + steps, device=device)

    def replay(index: int) -> None:
        replay_graph()
        losses[index] = captured_loss

    ms = time_steps(replay, steps, warmup, device)
    return ms, losses.tolist()


def captured_floor(config: TrainConfig, device: torch.device, *,
                   compiled: bool) -> tuple[Callable[[], None], torch.Tensor]:
    """The floor: the reference loop as written (forward, sum loss, ``zero_grad``,
    backward, ``p -= lr * p.grad`` as one multi-tensor update) for ``config``'s sizes,
    captured whole in one CUDA graph by hand; with ``compiled``, its forward and loss
    ``torch.compile``d first. Returns the graph's replay and the loss tensor each replay
    overwrites; the weights start from the reference's.

    It is what a user could write for this one model with no library (so no distnn code:
    ``cudagraph.capture_step`` does the same for distnn). Needs CUDA.
    """
    x, y, model = reference_setup(config)
    model, x, y = model.to(device), x.to(device), y.to(device)
    loss_fn = nn.MSELoss(reduction="sum")
    params = list(model.parameters())

    def forward() -> torch.Tensor:
        return loss_fn(model(x), y)

    loss_of = torch.compile(forward, dynamic=False) if compiled else forward

    def step() -> torch.Tensor:
        loss = loss_of()
        model.zero_grad()  # to None: backward allocates the gradients in the graph's pool
        loss.backward()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-config.lr)
        return loss.detach()

    start = [p.detach().clone() for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # lazy set-up (cuBLAS, compiled kernels) before capture
        for _ in range(GRAPH_WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread (the benchmark's process group) may query
    # events while this thread captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        captured_loss = step()
    with torch.no_grad():  # the warm-up trained: start from the reference's weights again
        for param, value in zip(params, start, strict=True):
            param.copy_(value)

    # A replay reads and writes the memory seen at capture: the default argument keeps the
    # model and batch alive as long as ``replay`` (freed, their memory would be handed out
    # again, and the graph would train on whatever was put there).
    def replay(_held: tuple = (model, x, y)) -> None:
        graph.replay()

    return replay, captured_loss
