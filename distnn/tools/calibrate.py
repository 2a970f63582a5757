"""Measuring gloo's all-reduce (and distnn's sum through rank 0) here, and fitting alpha, beta.

:func:`measure` spawns ``world`` processes (as distnn.tools.bench does), each with one CPU thread
(as torchrun sets OMP_NUM_THREADS=1), and times ``all_reduce(SUM)`` of float32 buffers of
each size, and, for sizes and world sizes where distnn uses it, the sum through rank 0 (the
same messages as distnn.distributed.gradsync.FlatGradSync._sum_via_root). Each sample is
the mean of a few back-to-back calls after a barrier, on rank 0's clock; :func:`fit` takes medians.

The fits are least squares on relative error (each equation divided by its measured time,
so 4 KB and 64 MB count alike):

- per world size p: ``T(n) = a_p + b_p n``;
- overall, the ring formula ``T(p, n) = 2 (p-1) alpha + 2 (p-1)/p n beta`` over all (p, n);
- through rank 0, overall: ``T(p, n) = 2 (p-1) (alpha + n beta)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from distnn.tools.spawn import join, spawn

DEFAULT_SIZES = (4096, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


def via_root_here(nbytes: int, world: int) -> bool:
    """Whether distnn's Trainer sums a one-bucket gradient buffer of ``nbytes`` on ``world``
    CPU ranks over gloo through rank 0 (its rule and limit, from gradsync)."""
    import torch

    from distnn.distributed.gradsync import VIA_ROOT_MAX_MB, sums_via_root

    return sums_via_root(buckets=1, world_size=world, device=torch.device("cpu"), nbytes=nbytes,
                         max_mb=VIA_ROOT_MAX_MB)


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int,
            out_path: str) -> None:
    join(rank, world, port)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    samples = []

    def via_root(buffer: torch.Tensor, inbox: list[torch.Tensor]) -> None:
        if rank != 0:
            dist.send(buffer, dst=0)
            dist.recv(buffer, src=0)
            return
        receives = [dist.irecv(box, src=peer) for peer, box in enumerate(inbox, 1)]
        for receive in receives:
            receive.wait()
        for box in inbox:
            buffer.add_(box)
        for send in [dist.isend(buffer, dst=peer) for peer in range(1, world)]:
            send.wait()

    for size in sizes:
        buffer = torch.ones(size // 4)
        kinds = ["allreduce"]
        if via_root_here(size, world):
            kinds.append("via_root")
        inbox = [torch.empty_like(buffer) for _ in range(world - 1)] if rank == 0 else []
        calls = max(1, min(20, int(2**22 // size)))  # about 4 MB moved per sample
        for kind in kinds:
            def once(kind: str = kind, buffer: torch.Tensor = buffer,
                     inbox: list = inbox) -> None:
                if kind == "allreduce":
                    dist.all_reduce(buffer)
                else:
                    via_root(buffer, inbox)
            once()  # warm-up
            for _ in range(repeats):
                dist.barrier()
                started = time.perf_counter()
                for _ in range(calls):
                    once()
                seconds = (time.perf_counter() - started) / calls
                samples.append({"world_size": world, "bytes": size, "kind": kind,
                                "seconds": seconds})
    dist.barrier()
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as file:
            json.dump(samples, file)
    dist.destroy_process_group()


def measure(worlds: Sequence[int], sizes: Sequence[int], repeats: int = 5,
            out_dir: str = ".") -> list[dict]:
    """Samples ``{"world_size", "bytes", "kind", "seconds"}`` for every world and size."""
    samples = []
    for world in worlds:
        path = os.path.join(out_dir, f".calibrate-{world}.json")
        print(f"calibrate: world size {world}...", file=sys.stderr, flush=True)
        spawn(_worker, world, list(sizes), repeats, path)
        with open(path, encoding="utf-8") as file:
            samples += json.load(file)
        os.remove(path)
    return samples


def medians(samples: Sequence[dict]) -> list[dict]:
    """One row per (kind, world_size, bytes): the median seconds of its samples."""
    groups: dict[tuple, list[float]] = {}
    for s in samples:
        groups.setdefault((s["kind"], s["world_size"], s["bytes"]), []).append(s["seconds"])
    return [{"kind": k, "world_size": p, "bytes": n, "seconds": statistics.median(v)}
            for (k, p, n), v in sorted(groups.items())]


def _relative_lstsq(design: np.ndarray, times: np.ndarray) -> np.ndarray:
    weights = 1 / times
    solution, *_ = np.linalg.lstsq(design * weights[:, None], times * weights, rcond=None)
    return solution


def fit_line(sizes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """(a, b) of ``T(n) = a + b n``, least squares on relative error."""
    n, t = np.asarray(sizes, float), np.asarray(seconds, float)
    a, b = _relative_lstsq(np.stack([np.ones_like(n), n], axis=1), t)
    return float(a), float(b)


def fit_ring(worlds: Sequence[int], sizes: Sequence[float],
             seconds: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) of ``2 (p-1) alpha + 2 (p-1)/p n beta`` over all points."""
    p, n, t = (np.asarray(x, float) for x in (worlds, sizes, seconds))
    alpha, beta = _relative_lstsq(np.stack([2 * (p - 1), 2 * (p - 1) / p * n], axis=1), t)
    return float(alpha), float(beta)


def fit_via_root(worlds: Sequence[int], sizes: Sequence[float],
                 seconds: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) of ``2 (p-1) (alpha + n beta)`` over all points."""
    p, n, t = (np.asarray(x, float) for x in (worlds, sizes, seconds))
    alpha, beta = _relative_lstsq(np.stack([2 * (p - 1), 2 * (p - 1) * n], axis=1), t)
    return float(alpha), float(beta)


def cluster_description(rows: Sequence[dict], *, name: str, cores: int | None) -> dict:
    """A :class:`distnn.tools.costmodel.Cluster` as JSON, from median rows (see :func:`medians`)."""
    ring = [r for r in rows if r["kind"] == "allreduce"]
    root = [r for r in rows if r["kind"] == "via_root"]
    alpha, beta = fit_ring([r["world_size"] for r in ring], [r["bytes"] for r in ring],
                           [r["seconds"] for r in ring])
    allreduce_fit, via_root_fit = {}, {}
    for mine, fits in ((ring, allreduce_fit), (root, via_root_fit)):
        for p in sorted({r["world_size"] for r in mine}):
            points = [r for r in mine if r["world_size"] == p]
            if len(points) >= 2:
                fits[str(p)] = list(fit_line([r["bytes"] for r in points],
                                             [r["seconds"] for r in points]))
    description = {"name": name, "gpus_per_node": 1, "intra_alpha_s": alpha,
                   "intra_beta_s": beta, "inter_alpha_s": alpha, "inter_beta_s": beta,
                   "backend": "gloo", "cores": cores, "allreduce_fit": allreduce_fit,
                   "via_root_fit": via_root_fit,
                   "source": "python -m distnn.scale calibrate (gloo on this machine's CPU)"}
    if root:
        r_alpha, r_beta = fit_via_root([r["world_size"] for r in root],
                                       [r["bytes"] for r in root], [r["seconds"] for r in root])
        description["source"] += (f"; via-root overall alpha {r_alpha:.3g} s, "
                                  f"beta {r_beta:.3g} s/B")
    return description


# -- distnn's own step, measured in place -------------------------------------------------
#
# ``measure_steps`` spawns ``world`` ranks (one thread each, as torchrun sets) and, in the
# same processes, in alternating order over ``rounds`` rounds, times four things for one
# model and global batch:
#
# - ``trainer``: distnn's real Trainer, a warm-up run then a timed run, its own ``wall_s``
#   per step (as distnn.tools.bench does);
# - ``compute``: the bare forward, sum-MSE backward and SGD update of this rank's shard,
#   with ALL ranks doing it at once and no collective (compute under the same
#   oversubscription as the trainer's);
# - ``collective``: the one per-step sum alone, of the trainer's buffer (the gradients and
#   its two extra slots), through rank 0 where distnn does that, else ``all_reduce``;
# - ``bare``: compute then the collective, one after the other, in one loop.
#
# Each sample is a median over the timed steps (rank 0's clock, after a barrier).

STEP_KINDS = ("trainer", "compute", "collective", "bare")


def _via_root(buffer, inbox: list, rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank != 0:
        dist.send(buffer, dst=0)
        dist.recv(buffer, src=0)
        return
    for receive in [dist.irecv(box, src=peer) for peer, box in enumerate(inbox, 1)]:
        receive.wait()
    for box in inbox:
        buffer.add_(box)
    for send in [dist.isend(buffer, dst=peer) for peer in range(1, world)]:
        send.wait()


def _step_worker(rank: int, world: int, port: int, plan: dict, out_path: str) -> None:
    join(rank, world, port)
    import contextlib
    import io

    import torch
    import torch.distributed as dist

    from distnn.config import TrainConfig
    from distnn.data.shards import shard_bounds
    from distnn.distributed.runtime import setup
    from distnn.job.model import build_model
    from distnn.trainer import Trainer

    d_in, hidden, d_out, batch = plan["d_in"], tuple(plan["hidden"]), plan["d_out"], plan["batch"]
    steps, warmup = plan["steps"], plan["warmup"]
    samples = []
    with setup(device="cpu", timeout_s=600) as rt:
        torch.manual_seed(0)
        model = build_model(d_in=d_in, hidden=hidden, d_out=d_out)
        first, stop = shard_bounds(batch, world, rank)
        x, y = torch.randn(stop - first, d_in), torch.randn(stop - first, d_out)
        loss_fn = torch.nn.MSELoss(reduction="sum")
        params = sum(p.numel() for p in model.parameters())
        buffer, slots = torch.ones(params + 2), torch.ones(2)
        via_root = via_root_here(buffer.numel() * 4, world)
        inbox = [torch.empty_like(buffer) for _ in range(world - 1)] if rank == 0 else []

        def compute() -> None:
            model.zero_grad()
            loss_fn(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-12 * p.grad

        def collective() -> None:
            if via_root:
                _via_root(buffer, inbox, rank, world)
            else:
                dist.all_reduce(buffer)

        def bare() -> None:
            compute()
            torch.cat([p.grad.reshape(-1) for p in model.parameters()] + [slots], out=buffer)
            collective()

        def timed(once) -> float:
            for _ in range(warmup):
                once()
            times = []
            for _ in range(steps):
                dist.barrier()
                started = time.perf_counter()
                once()
                times.append(time.perf_counter() - started)
            return statistics.median(times) * 1e3

        def trainer() -> float:
            config = TrainConfig(batch_size=batch, d_in=d_in, hidden=hidden, d_out=d_out,
                                 lr=plan["lr"], log_every=0, quiet=True, verify_every=0)
            for count in (warmup, steps):
                run = Trainer(dataclasses.replace(config, steps=count), rt)
                with contextlib.redirect_stdout(io.StringIO()):
                    result = run.train()
            return result.wall_s / steps * 1e3

        kinds = {"trainer": trainer, "compute": lambda: timed(compute),
                 "collective": lambda: timed(collective), "bare": lambda: timed(bare)}
        names = list(STEP_KINDS)
        for repeat in range(plan["rounds"]):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                dist.barrier()
                ms = kinds[name]()
                samples.append({"model": plan["model"], "world_size": world, "kind": name,
                                "round": repeat, "ms": ms, "via_root": via_root})
                if rank == 0:
                    print(f"  {plan['model']} p={world} {name} round {repeat}: {ms:.3f} ms",
                          file=sys.stderr, flush=True)
        dist.barrier()
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as file:
            json.dump(samples, file)


def measure_steps(*, model: str, world: int, batch: int, d_in: int, hidden: Sequence[int],
                  d_out: int, lr: float, steps: int, warmup: int = 3, rounds: int = 5,
                  out_dir: str = ".") -> list[dict]:
    """Samples ``{"model", "world_size", "kind", "round", "ms"}`` (see STEP_KINDS above)."""
    path = os.path.join(out_dir, f".steps-{model}-{world}.json")
    plan = {"model": model, "batch": batch, "d_in": d_in, "hidden": list(hidden),
            "d_out": d_out, "lr": lr, "steps": steps, "warmup": warmup, "rounds": rounds}
    spawn(_step_worker, world, plan, path)
    with open(path, encoding="utf-8") as file:
        samples = json.load(file)
    os.remove(path)
    return samples


def overhead_fit(samples: Sequence[dict], bytes_of: dict[str, int]) -> dict[str, list[float]]:
    """``{world_size: [a_s, b_s_per_byte]}``: per world size, the line through (gradient bytes,
    trainer step minus compute minus collective, each the median of its rounds in
    :func:`measure_steps` samples) over the models in ``bytes_of`` (at least two)."""
    groups: dict[tuple, list[float]] = {}
    for s in samples:
        if s["model"] in bytes_of:
            groups.setdefault((s["world_size"], s["model"], s["kind"]), []).append(s["ms"])
    fits = {}
    for p in sorted({p for p, _, _ in groups}):
        points = []
        for model, n in sorted(bytes_of.items(), key=lambda item: item[1]):
            parts = [groups.get((p, model, kind)) for kind in ("trainer", "compute", "collective")]
            if all(parts):
                trainer, compute, collective = (statistics.median(v) / 1e3 for v in parts)
                points.append((n, trainer - compute - collective))
        if len(points) >= 2:
            (n0, t0), (n1, t1) = points[0], points[-1]
            b = (t1 - t0) / (n1 - n0)
            fits[str(p)] = [t0 - b * n0, b]
    return fits
