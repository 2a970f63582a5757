"""Measuring on this machine what a prediction takes from a cluster file
(``python -m distnn.scale calibrate``).

1. The collectives: :func:`measure` spawns ``world`` processes (:mod:`distnn.tools.spawn`),
   each with one CPU thread (as torchrun sets OMP_NUM_THREADS=1), and times
   ``all_reduce(SUM)`` of float32 buffers of each size, and, for sizes and world sizes where
   distnn uses it, the sum through rank 0 (the same messages as
   distnn.distributed.gradsync.FlatGradSync's). Each sample is the mean of a few back-to-back
   calls after a barrier, on rank 0's clock; :func:`medians` takes medians. The fits are least
   squares on relative error (each equation divided by its measured time, so 4 KB and 64 MB
   count alike):

   - per world size p: ``T(n) = a_p + b_p n``;
   - overall, the ring formula ``T(p, n) = 2 (p-1) alpha + 2 (p-1)/p n beta`` over all (p, n);
   - through rank 0, overall: ``T(p, n) = 2 (p-1) (alpha + n beta)``.

2. The per-step overhead (:func:`measure_overhead`): distnn's own step on held-out models,
   less what the prediction without it gives for them (see the section below).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from distnn.tools import costmodel, steptime
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


# -- one rank's compute, as the prediction measures it --------------------------------------

def measure_compute(*, d_in: int, hidden: Sequence[int], d_out: int, batch: int,
                    rounds: int = 5, block_s: float = 0.04) -> costmodel.Compute:
    """One rank's step here (forward, sum MSE loss, backward, SGD update), one CPU thread, at
    ``batch`` and at ``max(1, batch // 8)`` rows: the line through the two gives fixed and
    per-sample time. Each size is timed in blocks of back-to-back steps (about ``block_s``
    seconds, at least 3 steps: the steady state, as in a training loop), the two sizes
    alternating over ``rounds`` rounds after a warm-up; medians of the blocks' means. The
    gradients are made afresh by each backward and the update is one multi-tensor operation,
    as in distnn's step. (``python -m distnn.scale --measure`` and the calibration's overhead
    both use it, so the overhead is fitted to the compute the prediction will use.)"""
    import torch

    from distnn.job.model import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(d_in=d_in, hidden=tuple(hidden), d_out=d_out)
        params = list(model.parameters())
        loss_fn = torch.nn.MSELoss(reduction="sum")
        small = max(1, batch // 8)
        data = {rows: (torch.randn(rows, d_in), torch.randn(rows, d_out))
                for rows in dict.fromkeys((batch, small))}

        def steps_s(rows: int, count: int) -> float:
            x, y = data[rows]
            started = time.perf_counter()
            for _ in range(count):
                model.zero_grad()
                loss_fn(model(x), y).backward()
                with torch.no_grad():
                    torch._foreach_add_(params, [p.grad for p in params], alpha=-1e-9)
            return time.perf_counter() - started

        count = {rows: max(3, int(block_s / max(steps_s(rows, 3) / 3, 1e-6))) for rows in data}
        times: dict[int, list[float]] = {rows: [] for rows in data}
        for repeat in range(rounds):
            for rows in (list(data) if repeat % 2 == 0 else list(data)[::-1]):
                times[rows].append(steps_s(rows, count[rows]) / count[rows] * 1e3)
    finally:
        torch.set_num_threads(threads)
    big_ms, small_ms = statistics.median(times[batch]), statistics.median(times[small])
    if batch == small:
        return costmodel.Compute(fixed_ms=0.0, per_sample_ms=big_ms / batch)
    per_sample = max(0.0, (big_ms - small_ms) / (batch - small))
    return costmodel.Compute(fixed_ms=max(0.0, big_ms - per_sample * batch),
                             per_sample_ms=per_sample)


# -- the per-step overhead, on models the calibration does not then check -------------------
#
# distnn's step costs more than the model's compute plus its collective: packing the buffer,
# the update, the loss and vote slots, the replica checks, and above all the wait for the
# slowest rank and for gloo's threads to be scheduled on cores the other ranks keep busy.
# None of that has a formula here; it is measured. For each held-out model and world size,
# distnn's own step (``python -m distnn.train``, steptime) is timed, and the prediction
# WITHOUT the overhead (this calibration's collective fits, the compute as ``--measure``
# times it) is subtracted: the rest is the overhead the prediction lacks. Per world size it
# is fitted as ``a_p + b_p n`` (n: gradient bytes) over the held-out models, and the
# prediction adds it (costmodel.step_overhead_s).

@dataclasses.dataclass(frozen=True)
class HeldOut:
    """A model the overhead is measured on: distnn's MLP on one fixed batch."""

    name: str
    batch: int
    d_in: int
    hidden: tuple[int, ...]
    d_out: int

    @property
    def layer_params(self) -> list[int]:
        return costmodel.mlp_layer_params(self.d_in, list(self.hidden), self.d_out)

    @property
    def gradient_bytes(self) -> int:
        return sum(self.layer_params) * costmodel.BYTES_PER_PARAM

    def flags(self) -> list[str]:
        return steptime.mlp_flags(batch=self.batch, d_in=self.d_in, hidden=self.hidden,
                                  d_out=self.d_out)


# The tutorial's batch and widths in and out; hidden widths whose gradients (202 KB and 1.0 MB,
# summed through rank 0 on up to 8 ranks) bracket the tutorial's 404 KB, and one past the
# via-rank-0 limit (4.0 MB, a ring all-reduce), so that a larger model is not a pure
# extrapolation. None of them is the tutorial: the calibration is checked on models it did
# not fit.
HELD_OUT = (HeldOut("mlp 1000-50-10", 64, 1000, (50,), 10),
            HeldOut("mlp 1000-250-10", 64, 1000, (250,), 10),
            HeldOut("mlp 1000-1000-10", 64, 1000, (1000,), 10))


def overhead_fit(points: dict[str, Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """``{world_size: [a_s, b_s_per_byte]}`` from ``{world_size: [[bytes, seconds], ...]}``:
    per world size, the least-squares line through its points (a constant for one point)."""
    fits = {}
    for p, pairs in points.items():
        n = np.asarray([pair[0] for pair in pairs], float)
        t = np.asarray([pair[1] for pair in pairs], float)
        if len(pairs) == 1 or np.ptp(n) == 0:
            fits[p] = [float(t.mean()), 0.0]
        elif len(pairs) >= 2:
            b, a = np.polyfit(n, t, 1)
            fits[p] = [float(a), float(b)]
    return fits


def measure_overhead(cluster: dict, worlds: Sequence[int], *,
                     models: Sequence[HeldOut] | None = None, rounds: int = 5,
                     seconds_per_run: float = 1.0, log: Callable[[str], object] = print) -> dict:
    """The per-step overhead for ``cluster`` (a description from :func:`cluster_description`,
    whose collective fits it uses) at ``worlds``, on ``models`` (default :data:`HELD_OUT`):
    ``{"step_overhead_fit", "models", "compute", "points", "samples", "seconds", ...}``;
    ``points[p]``: [gradient bytes, overhead seconds] per model. ``log`` gets a line per
    part of the work, with how long it took."""
    started = time.perf_counter()
    models = HELD_OUT if models is None else models
    base = costmodel.Cluster.from_json({**cluster, "step_overhead_fit": {}})

    def timed_compute() -> None:  # once more per model; their medians are used
        for m in models:
            computes[m.name].append(measure_compute(d_in=m.d_in, hidden=m.hidden,
                                                    d_out=m.d_out, batch=m.batch))

    def compute(name: str) -> costmodel.Compute:
        return costmodel.Compute(
            fixed_ms=statistics.median(c.fixed_ms for c in computes[name]),
            per_sample_ms=statistics.median(c.per_sample_ms for c in computes[name]))

    def without_overhead(m: HeldOut, p: int) -> float:
        return costmodel.predict(layer_params=m.layer_params, batch=m.batch,
                                 compute=compute(m.name), cluster=base, worlds=[p])[0]["step_ms"]

    computes: dict[str, list[costmodel.Compute]] = {m.name: [] for m in models}
    timed_compute()
    log(f"calibrate: one rank's compute (one thread) of {len(models)} held-out models: "
        + ", ".join(f"{m.name} {compute(m.name).ms(m.batch):.3f} ms" for m in models)
        + f" ({time.perf_counter() - started:.1f} s)")
    samples = []
    for p in worlds:
        began = time.perf_counter()
        # the step is often twice the prediction without its overhead: runs of ~the seconds asked
        steps = {m.name: steptime.steps_for(2 * without_overhead(m, p), seconds=seconds_per_run)
                 for m in models}
        samples += steptime.measure([(m.name, m.flags()) for m in models], world=p,
                                    steps=steps, rounds=rounds, progress=False)
        timed_compute()  # between the worlds' steps: the load it sees is theirs
        measured = steptime.medians(samples)
        log(f"calibrate: distnn's step at {p} rank{'s' if p > 1 else ''}, {rounds} rounds: "
            + ", ".join(f"{m.name} {measured[m.name, p]['ms_per_step']:.3f} ms "
                        f"(predicted without overhead {without_overhead(m, p):.3f})"
                        for m in models)
            + f" ({time.perf_counter() - began:.1f} s)")
    measured = steptime.medians(samples)
    predicted = {(m.name, p): without_overhead(m, p) for m in models for p in worlds}
    points = {str(p): [[m.gradient_bytes,
                        (measured[m.name, p]["ms_per_step"] - predicted[m.name, p]) / 1e3]
                       for m in models] for p in worlds}
    return {"step_overhead_fit": overhead_fit(points),
            "models": [dataclasses.asdict(m) for m in models],
            "compute": {m.name: dataclasses.asdict(compute(m.name)) for m in models},
            "compute_samples": {name: [dataclasses.asdict(c) for c in cs]
                                for name, cs in computes.items()},
            "predicted_without_overhead_ms": {f"{name} @ {p}": ms
                                              for (name, p), ms in predicted.items()},
            "points": points, "samples": samples,
            "seconds": time.perf_counter() - started}
