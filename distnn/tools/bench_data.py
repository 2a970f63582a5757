"""``python -m distnn.tools.bench_data``: distnn training from a data file, against the standard
PyTorch recipe (DDP + DistributedSampler + DataLoader), in three tables from one run.

1. The result against the world size: one data file (rows that neither the batch nor the
   world sizes divide) trained on each of ``--worlds`` gloo ranks by distnn and by the DDP
   recipe; each final model's loss on the whole file, evaluated in one process.
2. Speed at ``--speed-world`` ranks (1 thread each): distnn reading its rows from the file,
   distnn with the same rows in memory (TensorRows), and DDP + DistributedSampler +
   DataLoader(num_workers=0) over the same tensors; the same batches, in alternating order
   over ``--rounds`` rounds, medians.
3. Memory: distnn on 2 ranks over a ``--memory-mib`` .safetensors file (written under
   ``--tmp-dir`` and deleted after): each rank's private memory (RssAnon, sampled during
   the run, and Private_Clean + Private_Dirty at its end) against ``--memory-target-mb``.

Writes ``bench-data.md`` and ``bench-data.json`` to ``--out``. Every rank is a spawned
process in a real gloo group with one thread, as torchrun would start it. The exit code is 1
when a check of distnn's numbers fails (its final losses differ across world sizes by more
than 1e-5 relative, or its losses from the file differ from those from memory).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from distnn.config import TrainConfig
from distnn.data.batches import BatchPlan, TensorRows
from distnn.data.datafile import SCAN_BYTES, DataFile
from distnn.distributed.runtime import Runtime, setup
from distnn.job.model import build_model
from distnn.job.spec import Job, job_from_flags
from distnn.run.lossrecord import TAIL
from distnn.tools.bench_loops import end_worker
from distnn.tools.spawn import join, spawn
from distnn.tools.workload import Workload
from distnn.trainer import Trainer, TrainResult, flag_job

SEED = 0
AGREEMENT_RTOL = 1e-5  # distnn's final losses across world sizes: rounding only
MB = 10**6  # the memory target is in MB (10^6 bytes): the stricter reading of "600 MB"
DISTNN_FILE = "distnn, rows read from the file"
DISTNN_MEMORY = "distnn, rows in memory (TensorRows)"
DDP_LOADER = "DDP + DistributedSampler + DataLoader"
SPEED_VARIANTS = (DISTNN_FILE, DISTNN_MEMORY, DDP_LOADER)


# -- the data --------------------------------------------------------------------------------

def write_data(path: str, *, rows: int, d_in: int, d_out: int, seed: int = SEED,
               chunk_rows: int = 16384) -> int:
    """Writes a .safetensors file of x float32 [rows, d_in] ~ N(0, 1) and y float32
    [rows, d_out] = tanh(x @ w / sqrt(d_in)) + 0.1 * noise, ``chunk_rows`` rows at a time, so
    the writer never holds the whole file. Returns the file's size in bytes."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=generator)
    x_bytes, y_bytes = rows * d_in * 4, rows * d_out * 4
    header = json.dumps({
        "x": {"dtype": "F32", "shape": [rows, d_in], "data_offsets": [0, x_bytes]},
        "y": {"dtype": "F32", "shape": [rows, d_out],
              "data_offsets": [x_bytes, x_bytes + y_bytes]},
    }).encode()
    header += b" " * (-len(header) % 8)  # the format allows padding; 8-byte aligned data
    data_start = 8 + len(header)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header)) + header)
        for first in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - first)
            x = torch.randn(count, d_in, generator=generator)
            y = torch.tanh(x @ w / math.sqrt(d_in)) + 0.1 * torch.randn(
                count, d_out, generator=generator)
            for values, offset in ((x, data_start + first * d_in * 4),
                                   (y, data_start + x_bytes + first * d_out * 4)):
                chunk = values.numpy().tobytes()
                if os.pwrite(file.fileno(), chunk, offset) != len(chunk):
                    raise OSError(f"short write to {path}")
    return data_start + x_bytes + y_bytes


def whole_file_loss(path: str, shape: Workload, state: dict[str, torch.Tensor]) -> float:
    """The mean squared error (over all rows and outputs) of the MLP with weights ``state`` on
    every row of the file, in this process: the one metric both recipes are judged by."""
    tensors = load_file(path)
    model = build_model(shape.d_in, shape.hidden, shape.d_out)
    model.load_state_dict(state)
    with torch.no_grad():
        return nn.functional.mse_loss(model(tensors["x"]), tensors["y"]).item()


# -- the standard DDP recipe -----------------------------------------------------------------

def ddp_lr(shape: Workload) -> float:
    """The lr of the DDP recipe: distnn's lr times the values MSELoss's mean divides by for a
    full batch (batch_size * d_out), so that one rank with full batches makes the same update
    as distnn's sum loss."""
    return shape.lr * shape.batch_size * shape.d_out


def ddp_recipe(x: torch.Tensor, y: torch.Tensor, shape: Workload, *, epochs: int | None = None,
               steps: int | None = None, seed: int = SEED) -> dict[str, Any]:
    """Trains the way a DDP user writes it, on this rank of the current process group:
    DistributedSampler(shuffle, seed, drop_last=False) with set_epoch, DataLoader(batch_size
    = batch_size // world, num_workers=0), MSELoss() (mean), DDP averaging the gradients,
    torch.optim.SGD(lr = :func:`ddp_lr`). Runs ``epochs`` epochs, or stops after ``steps``.

    Returns ``state`` (the final weights, CPU), ``steps``, ``losses`` (each step's loss over
    the global batch, the mean of the ranks' means) and ``wall_s``: from the first batch in
    hand (as distnn's trainer times its steps) to the last update.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=shape.batch_size // world, sampler=sampler,
                        num_workers=0)
    torch.manual_seed(seed)  # the same initial weights as distnn's (model.seeded_model)
    model = build_model(shape.d_in, shape.hidden, shape.d_out)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=ddp_lr(shape))
    loss_fn = nn.MSELoss()
    limit = steps if steps is not None else epochs * len(loader)
    losses = torch.zeros(limit)
    done, started = 0, None
    for epoch in range(math.ceil(limit / len(loader))):
        sampler.set_epoch(epoch)
        for x_batch, y_batch in loader:
            if started is None:
                started = time.perf_counter()
            loss = loss_fn(ddp(x_batch), y_batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[done] = loss.detach()
            done += 1
            if done == limit:
                break
    wall_s = time.perf_counter() - started
    dist.all_reduce(losses)  # outside the timed steps
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # DDP's teardown on gloo can abort the process at exit unless it is dropped first (see
    # bench_loops.end_worker): drop it, collect, and meet at a barrier.
    del ddp, optimizer
    gc.collect()
    dist.barrier()
    return {"state": state, "steps": done, "losses": (losses / world).tolist(),
            "wall_s": wall_s}


def ddp_last_batch(rows: int, batch_size: int, world: int) -> int:
    """Rows in the DDP recipe's last global batch of an epoch (the sampler's repeats
    included): each rank's ceil(rows / world) samples in batches of batch_size // world."""
    per_rank, per_batch = math.ceil(rows / world), batch_size // world
    return world * (per_rank % per_batch or per_batch)


def sampler_padding(rows: int, world: int) -> int:
    """Rows DistributedSampler(drop_last=False) repeats each epoch to even out ``world``
    ranks."""
    return math.ceil(rows / world) * world - rows


# -- distnn ----------------------------------------------------------------------------------

def in_memory_job(x: torch.Tensor, y: torch.Tensor) -> Callable[[TrainConfig, Runtime], Job]:
    """A job builder for Trainer(build_job=...): the command line's job with its rows taken
    from ``x`` and ``y`` in memory (the whole file's tensors) instead of read from the file."""
    def build(config: TrainConfig, runtime: Runtime) -> Job:
        job = job_from_flags(config, world_size=runtime.world_size, rank=runtime.rank)
        job.source = TensorRows(x, y)
        return job

    return build


def run_distnn(config: TrainConfig, rt: Runtime, build_job=flag_job) -> TrainResult:
    """One run of distnn's trainer (its summary line swallowed); returns its result."""
    with contextlib.redirect_stdout(io.StringIO()):
        return Trainer(config, rt, build_job=build_job).train()


def distnn_losses(result: TrainResult, steps: int) -> list[float]:
    """The global loss of each step of a finished ``steps``-step run (the result holds the
    newest lossrecord.TAIL of them)."""
    losses = result.losses
    if len(losses) != steps:
        raise ValueError(f"the trainer kept {len(losses)} losses of a {steps}-step run; "
                         f"allowed: --speed-steps and --speed-warmup up to {TAIL}")
    return losses


# -- the spawned ranks -----------------------------------------------------------------------

def _world_worker(rank: int, world: int, port: int, plan: dict, out_dir: str) -> None:
    """Table 1, one rank: distnn, then the DDP recipe, on the same file; rank 0 saves both
    final models."""
    join(rank, world, port)
    shape = Workload(**plan["shape"])
    with setup(device="cpu", timeout_s=300) as rt:
        config = shape.config(data=plan["path"], epochs=plan["epochs"], seed=SEED)
        result = run_distnn(config, rt)
        tensors = load_file(plan["path"])
        ddp = ddp_recipe(tensors["x"], tensors["y"], shape, epochs=plan["epochs"])
        if rank == 0:
            save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
                      os.path.join(out_dir, f"distnn-{world}.safetensors"))
            save_file(ddp["state"], os.path.join(out_dir, f"ddp-{world}.safetensors"))
            with open(os.path.join(out_dir, f"steps-{world}.json"), "w") as file:
                json.dump({"distnn": result.steps, "ddp": ddp["steps"]}, file)
        end_worker()  # after DDP: the teardown could abort the process (bench_loops)


def _speed_worker(rank: int, world: int, port: int, plan: dict, out_path: str) -> None:
    """Table 2, one rank: every variant once per round, each round starting one variant
    later; rank 0's times are the samples."""
    join(rank, world, port)
    shape = Workload(**plan["shape"])
    tensors = load_file(plan["path"])
    x, y = tensors["x"], tensors["y"]
    samples = []
    with setup(device="cpu", timeout_s=300) as rt:
        for round_index in range(plan["rounds"]):
            shift = round_index % len(SPEED_VARIANTS)
            for name in SPEED_VARIANTS[shift:] + SPEED_VARIANTS[:shift]:
                for steps in (plan["warmup"], plan["steps"]):  # warm-up, then timed
                    if name == DDP_LOADER:
                        ddp = ddp_recipe(x, y, shape, steps=steps)
                        wall_s, losses = ddp["wall_s"], ddp["losses"]
                    else:
                        build = flag_job if name == DISTNN_FILE else in_memory_job(x, y)
                        result = run_distnn(
                            shape.config(data=plan["path"], steps=steps, seed=SEED), rt, build)
                        wall_s = result.wall_s
                        # its losses are sums: per value, as the DDP recipe's mean
                        losses = [loss / (shape.batch_size * shape.d_out)
                                  for loss in distnn_losses(result, steps)]
                sample = {"variant": name, "round": round_index,
                          "ms_per_step": wall_s / plan["steps"] * 1e3, "losses": losses}
                samples.append(sample)
                if rank == 0:
                    print(f"speed, round {round_index + 1}, {name}: "
                          f"{sample['ms_per_step']:.2f} ms/step", file=sys.stderr, flush=True)
                dist.barrier()
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as file:
                json.dump(samples, file)
        end_worker()  # after DDP: the teardown could abort the process (bench_loops)


# -- memory ----------------------------------------------------------------------------------

def proc_kb(text: str) -> dict[str, int]:
    """The ``Name: N kB`` fields of /proc/self/status or /proc/self/smaps_rollup, in kB."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    return fields


def _read(path: str) -> str:
    with open(path, encoding="ascii") as file:
        return file.read()


class RssWatch:
    """Samples this process's RssAnon (private anonymous memory: heap, tensors) every
    ``interval_s`` in a thread, and keeps the peak of each phase the caller marks."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.phase = "before the run"
        self.peaks_kb: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-watch", daemon=True)

    def sample(self) -> None:
        value = proc_kb(_read("/proc/self/status"))["RssAnon"]
        with self._lock:
            self.peaks_kb[self.phase] = max(self.peaks_kb.get(self.phase, 0), value)

    def mark(self, phase: str) -> None:
        """Ends the current phase (with one last sample) and starts ``phase``."""
        self.sample()
        with self._lock:
            self.phase = phase
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


BUILD_PHASE = "start-up: the job (file header, row checks)"
STEPS_PHASE = "the steps and the rest of the run"


def fix_mmap_threshold(nbytes: int) -> None:
    """glibc: every allocation of ``nbytes`` or more gets its own mapping, returned to the
    system when freed. By default the threshold starts at 128 KiB and rises to the size of
    each large block freed (up to 32 MiB), after which blocks that size come from the heap,
    which keeps what it cannot trim. Setting it turns that adjustment off."""
    import ctypes

    m_mmap_threshold = -3  # malloc.h
    if not ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, nbytes):
        raise OSError("mallopt(M_MMAP_THRESHOLD) failed")


def _memory_worker(rank: int, world: int, port: int, plan: dict, out_dir: str) -> None:
    """Table 3, one rank: distnn over the big file, with this rank's memory watched."""
    join(rank, world, port)
    if plan["mmap_threshold"]:
        fix_mmap_threshold(plan["mmap_threshold"])
    shape = Workload(**plan["shape"])
    with setup(device="cpu", timeout_s=600) as rt:
        # VmHWM from here on: writing 5 to clear_refs resets the peak resident size.
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        before = proc_kb(_read("/proc/self/status"))

        with RssWatch() as watch:
            def watched_job(config: TrainConfig, runtime: Runtime) -> Job:
                watch.mark(BUILD_PHASE)
                job = flag_job(config, runtime)
                watch.mark(STEPS_PHASE)
                return job

            config = shape.config(data=plan["path"], steps=plan["steps"], seed=SEED)
            result = run_distnn(config, rt, watched_job)
        end = proc_kb(_read("/proc/self/status"))
        rollup = proc_kb(_read("/proc/self/smaps_rollup"))
        report = {
            "allocator": plan["allocator"], "rank": rank, "steps": result.steps,
            "wall_s": result.wall_s,
            "rss_anon_before_kb": before["RssAnon"], "rss_file_before_kb": before["RssFile"],
            "rss_anon_peak_kb": watch.peaks_kb,
            "rss_anon_end_kb": end["RssAnon"], "vm_hwm_kb": end["VmHWM"],
            "private_clean_kb": rollup.get("Private_Clean", 0),
            "private_dirty_kb": rollup.get("Private_Dirty", 0),
            "rss_end_kb": rollup.get("Rss", 0), "pss_end_kb": rollup.get("Pss", 0),
        }
        name = f"memory-{plan['allocator']}-rank{rank}.json"
        with open(os.path.join(out_dir, name), "w") as file:
            json.dump(report, file)


# -- the three tables --------------------------------------------------------------------------

def world_table(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    shape = Workload("world sizes", args.batch_size, args.d_in, args.hidden, args.d_out,
                     args.lr)
    path = os.path.join(scratch, "world.safetensors")
    write_data(path, rows=args.rows, d_in=shape.d_in, d_out=shape.d_out)
    plan = {"shape": shape.__dict__, "path": path, "epochs": args.epochs}
    rows = []
    for world in args.worlds:
        print(f"world sizes: {world} rank(s)...", file=sys.stderr, flush=True)
        spawn(_world_worker, world, plan, scratch)
        with open(os.path.join(scratch, f"steps-{world}.json")) as file:
            steps = json.load(file)
        rows.append({
            "world_size": world,
            "distnn_steps": steps["distnn"],
            "distnn_loss": whole_file_loss(
                path, shape, load_file(os.path.join(scratch, f"distnn-{world}.safetensors"))),
            "ddp_steps": steps["ddp"],
            "ddp_loss": whole_file_loss(
                path, shape, load_file(os.path.join(scratch, f"ddp-{world}.safetensors"))),
            "distnn_last_batch": args.rows % shape.batch_size or shape.batch_size,
            "ddp_last_batch": ddp_last_batch(args.rows, shape.batch_size, world),
            "ddp_repeated_rows_per_epoch": sampler_padding(args.rows, world),
        })
    spread = {name: relative_spread([r[f"{name}_loss"] for r in rows])
              for name in ("distnn", "ddp")}
    return {"shape": shape.__dict__, "rows_in_file": args.rows, "epochs": args.epochs,
            "ddp_lr": ddp_lr(shape), "rows": rows, "relative_spread": spread}


def relative_spread(values: list[float]) -> float:
    """(largest - smallest) / smallest: how far apart the world sizes' results are."""
    return (max(values) - min(values)) / min(values)


def speed_table(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    shape = Workload("speed", args.speed_batch, args.speed_d_in, args.speed_hidden,
                     args.speed_d_out, args.speed_lr)
    path = os.path.join(scratch, "speed.safetensors")
    size = write_data(path, rows=args.speed_rows, d_in=shape.d_in, d_out=shape.d_out)
    plan = {"shape": shape.__dict__, "path": path, "rounds": args.rounds,
            "steps": args.speed_steps, "warmup": args.speed_warmup}
    out_path = os.path.join(scratch, "speed.json")
    print(f"speed: {args.speed_world} ranks, {args.rounds} rounds...", file=sys.stderr,
          flush=True)
    spawn(_speed_worker, args.speed_world, plan, out_path)
    with open(out_path) as file:
        samples = json.load(file)
    reference = next(s["losses"] for s in samples if s["variant"] == DISTNN_FILE)
    rows = []
    for name in SPEED_VARIANTS:
        mine = [s for s in samples if s["variant"] == name]
        times = [s["ms_per_step"] for s in mine]
        worst = max(_max_relative(s["losses"], reference) for s in mine)
        rows.append({"variant": name, "ms_per_step": statistics.median(times),
                     "min_ms": min(times), "max_ms": max(times), "runs": len(times),
                     "last_loss": mine[0]["losses"][-1], "loss_rel_diff_vs_file": worst})
    by_name = {r["variant"]: r for r in rows}
    per_round = [f["ms_per_step"] / m["ms_per_step"] for f, m in zip(
        [s for s in samples if s["variant"] == DISTNN_FILE],
        [s for s in samples if s["variant"] == DISTNN_MEMORY], strict=True)]
    for sample in samples:
        sample.pop("losses")
    shard_rows = math.ceil(shape.batch_size / args.speed_world)
    return {"shape": shape.__dict__, "rows_in_file": args.speed_rows, "file_bytes": size,
            "world_size": args.speed_world, "steps": args.speed_steps,
            "warmup": args.speed_warmup, "rounds": args.rounds, "ddp_lr": ddp_lr(shape),
            "bytes_read_per_step_per_rank": shard_rows * (shape.d_in + shape.d_out) * 4,
            "read_ms_per_step": read_ms(path, shape, rows=args.speed_rows,
                                        world=args.speed_world, steps=args.speed_steps),
            "rows": rows,
            "file_over_memory": (by_name[DISTNN_FILE]["ms_per_step"]
                                 / by_name[DISTNN_MEMORY]["ms_per_step"]),
            "file_over_memory_per_round_median": statistics.median(per_round),
            "samples": samples}


def read_ms(path: str, shape: Workload, *, rows: int, world: int, steps: int,
            repeats: int = 5) -> dict[str, float]:
    """How long reading rank 0's rows of each of the first ``steps`` steps takes, alone in this
    process: from the file (DataFile.read, as ShardStream calls it) and from memory
    (TensorRows.read). The median over ``repeats`` passes, in ms per step."""
    plan = BatchPlan(rows=rows, batch_size=shape.batch_size, seed=SEED)
    shards = [plan.shard(step, world, 0) for step in range(steps)]
    tensors = load_file(path)
    sources = {"file": DataFile(path), "memory": TensorRows(tensors["x"], tensors["y"])}
    timings = {}
    for name, source in sources.items():
        passes = []
        for _ in range(repeats):
            started = time.perf_counter()
            for shard in shards:
                source.read(shard)
            passes.append((time.perf_counter() - started) / steps * 1e3)
        timings[name] = statistics.median(passes)
    return timings


def _max_relative(got: list[float], want: list[float]) -> float:
    return max(abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want, strict=True))


ALLOCATORS = {  # the memory table's runs: glibc as it comes, and with a fixed threshold
    "glibc default": 0,
    "glibc, mmap threshold fixed at 1 MiB": 2**20,
}


def memory_table(args: argparse.Namespace) -> dict[str, Any]:
    shape = Workload("memory", args.memory_batch, args.memory_d_in, args.memory_hidden,
                     args.memory_d_out, args.memory_lr)
    rows = args.memory_mib * 2**20 // (shape.d_in * 4)
    world = 2
    ranks = []
    with tempfile.TemporaryDirectory(prefix="distnn-bench-data-", dir=args.tmp_dir) as big:
        path = os.path.join(big, "big.safetensors")
        print(f"memory: writing {args.memory_mib} MiB of x to {path}...", file=sys.stderr,
              flush=True)
        size = write_data(path, rows=rows, d_in=shape.d_in, d_out=shape.d_out)
        for allocator, threshold in ALLOCATORS.items():
            plan = {"shape": shape.__dict__, "path": path, "steps": args.memory_steps,
                    "allocator": allocator, "mmap_threshold": threshold}
            print(f"memory: {world} ranks, {args.memory_steps} steps, {allocator}...",
                  file=sys.stderr, flush=True)
            spawn(_memory_worker, world, plan, big)
            for rank in range(world):
                with open(os.path.join(big, f"memory-{allocator}-rank{rank}.json")) as file:
                    ranks.append(json.load(file))
    for report in ranks:
        report["private_end_kb"] = report["private_clean_kb"] + report["private_dirty_kb"]
        report["rss_anon_peak_all_kb"] = max(report["rss_anon_peak_kb"].values())
        report["within_target"] = (max(report["rss_anon_peak_all_kb"], report["private_end_kb"])
                                   * 1024 <= args.memory_target_mb * MB)
    return {"shape": shape.__dict__, "rows_in_file": rows, "file_bytes": size,
            "world_size": world, "steps": args.memory_steps, "scan_bytes": SCAN_BYTES,
            "target_mb": args.memory_target_mb, "ranks": ranks}


# -- the report --------------------------------------------------------------------------------

def machine() -> str:
    """The CPU's model name and core count, as /proc/cpuinfo and os.cpu_count() give them."""
    model = ""
    with contextlib.suppress(OSError):
        for line in _read("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    import platform

    return f"CPU {model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores), if known."""
    with contextlib.suppress(OSError):
        return float(_read("/proc/loadavg").split()[0])
    return None


def write_report(out: str, report: dict[str, Any], table: str) -> None:
    """A benchmark's outputs: ``OUT.md`` (the tables, also printed) and ``OUT.json`` (every
    sample)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(f"{out}.md", "w", encoding="utf-8") as file:
        file.write(table)
    with open(f"{out}.json", "w", encoding="utf-8") as file:
        json.dump(report, file, indent=1)
    print(table)


def below_one(args: argparse.Namespace, names: tuple[str, ...]) -> str | None:
    """The one-line error for the first of ``names`` (counts) under 1, or None."""
    for name in names:
        if getattr(args, name) < 1:
            return (f"distnn: error: --{name.replace('_', '-')}: got {getattr(args, name)}; "
                    "allowed: 1 or more")
    return None


def _mb(kb: int) -> str:
    return f"{kb * 1024 / MB:.0f}"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Data files: distnn against DDP + DistributedSampler", "",
             f"Machine: {report['machine']}; torch {report['torch']}; gloo, every rank a "
             "spawned process with 1 thread. Command: "
             f"`python -m distnn.tools.bench_data {' '.join(report['argv'])}`. "
             "Load average (1 min) "
             f"at the start and the end: {report['load_before']}, {report['load_after']}.", ""]
    if "world" in report:
        lines += _world_lines(report["world"])
    if "speed" in report:
        lines += _speed_lines(report["speed"])
    if "memory" in report:
        lines += _memory_lines(report["memory"])
    return "\n".join(lines) + "\n"


def _shape_text(shape: dict, rows: int) -> str:
    hidden = "-".join(map(str, shape["hidden"]))
    return (f"x float32 [{rows}, {shape['d_in']}], y [{rows}, {shape['d_out']}] "
            f"(y = tanh(x w / sqrt(d_in)) + noise); MLP {shape['d_in']}-{hidden}-{shape['d_out']}"
            f" (ReLU), batch {shape['batch_size']}")


def _world_lines(world: dict) -> list[str]:
    shape, rows = world["shape"], world["rows_in_file"]
    lines = [
        "## 1. The result against the world size", "",
        f"One file: {_shape_text(shape, rows)}, {world['epochs']} epochs, shuffled (seed "
        f"{SEED}). The final model of each run is evaluated in one process on all {rows} rows: "
        "mean squared error over every value (`mse_loss(model(x), y)`), the same metric for "
        "both.", "",
        f"- distnn: `python -m distnn.train --data FILE --batch-size {shape['batch_size']} "
        f"--epochs {world['epochs']} --hidden {','.join(map(str, shape['hidden']))} --lr "
        f"{shape['lr']:g}` (the sum loss, p -= lr * grad, gradients all-reduced with SUM).",
        "- DDP, the standard recipe: `DistributedSampler(dataset, num_replicas=W, rank=r, "
        f"shuffle=True, seed={SEED}, drop_last=False)`, `sampler.set_epoch(e)` each epoch, "
        f"`DataLoader(dataset, batch_size={shape['batch_size']} // W, sampler=sampler, "
        "num_workers=0)`, `DistributedDataParallel(model)` (averages the gradients), "
        f"`nn.MSELoss()` (mean), `torch.optim.SGD(lr={world['ddp_lr']:g})`: distnn's lr times "
        f"batch x d_out = {shape['batch_size']} x {shape['d_out']}, the values the mean divides "
        "by in a full batch, so one rank with full batches makes distnn's update. The same "
        "initial weights (`torch.manual_seed(seed)` before the model).", "",
        *_same_batches_text(shape["batch_size"], [r["world_size"] for r in world["rows"]]),
        "| world | distnn steps | distnn last batch (rows) | distnn final loss | DDP steps "
        "| DDP last batch (rows) | of them repeated by the sampler | DDP final loss |",
        "|---|---|---|---|---|---|---|---|"]
    for r in world["rows"]:
        lines.append(f"| {r['world_size']} | {r['distnn_steps']} | {r['distnn_last_batch']} "
                     f"| {r['distnn_loss']:.9f} | {r['ddp_steps']} | {r['ddp_last_batch']} "
                     f"| {r['ddp_repeated_rows_per_epoch']} | {r['ddp_loss']:.9f} |")
    spread = world["relative_spread"]
    lines += [f"| relative spread (max - min) / min | | | {spread['distnn']:.2e} | | | "
              f"| {spread['ddp']:.2e} |", "",
              "distnn's final loss moves only by rounding. The recipe's moves because its "
              "epochs end differently on each world size: DistributedSampler pads each epoch to "
              "a multiple of the world size by repeating the first rows of the permutation, and "
              "MSELoss's mean weighs each row of the last batch by one over that batch's size "
              "(the padding included), so world sizes that repeat the same rows train the same "
              "and the others do not. At one rank the two recipes part on the same point: the "
              "mean gives each row of the smaller last batch a larger share of the update than "
              "the sum does.", ""]
    return lines


def _same_batches_text(batch_size: int, worlds: list[int]) -> list[str]:
    if any(batch_size % world for world in worlds):
        return ["The batch does not divide by every world size: there DDP's global batch is "
                "world x (batch // world) rows, fewer than distnn's.", ""]
    return ["Every batch but an epoch's last holds the same rows in both: the batch divides "
            "by every world size, so the sampler's strided shards of batch k make up "
            "`perm[kB:(k+1)B]`. The last batch of an epoch is where they part.", ""]


def _speed_batches_text(speed: dict) -> str:
    batch, world = speed["shape"]["batch_size"], speed["world_size"]
    if speed["rows_in_file"] % batch == 0 and batch % world == 0:
        return ("The batches are the same: the batch and the rows divide evenly, so "
                "DistributedSampler's global batch k is distnn's `perm[kB:(k+1)B]`.")
    return ("The batches are the same up to an epoch's last one (the rows or the batch do not "
            "divide evenly: see table 1).")


def _speed_lines(speed: dict) -> list[str]:
    shape = speed["shape"]
    lines = [
        "## 2. Speed", "",
        f"{speed['world_size']} ranks, one file: {_shape_text(shape, speed['rows_in_file'])}, "
        f"shuffled; the first {speed['steps']} steps of epoch 0 timed, after a "
        f"{speed['warmup']}-step warm-up run; {speed['rounds']} rounds, each starting one "
        "variant later; medians. The file is in the page cache (written just before). Each "
        f"rank reads {speed['bytes_read_per_step_per_rank'] / 1024:.1f} KiB per step. distnn "
        "is timed by its trainer's `wall_s` (the step loop, from the first step's rows in "
        "hand), the DDP recipe the same way (from the first batch in hand to the last update; "
        f"lr {speed['ddp_lr']:g}, as in table 1). {_speed_batches_text(speed)} Last loss: the "
        "mean squared error of the last step's batch; "
        "loss difference: the largest relative difference of any step's loss from distnn's "
        "from the file.", "",
        "| variant | ms/step (median) | min-max | runs | last loss | loss difference |",
        "|---|---|---|---|---|---|"]
    for r in speed["rows"]:
        lines.append(f"| {r['variant']} | {r['ms_per_step']:.2f} | {r['min_ms']:.2f}-"
                     f"{r['max_ms']:.2f} | {r['runs']} | {r['last_loss']:.6f} "
                     f"| {r['loss_rel_diff_vs_file']:.1e} |")
    ratio, read = speed["file_over_memory"], speed["read_ms_per_step"]
    lines += ["", f"Reading rank 0's rows of a step, timed alone in one thread of the parent "
              f"process (no training beside it): from the file {read['file']:.3f} ms, from "
              f"memory {read['memory']:.3f} ms. distnn reads one step ahead in a thread, so a "
              "read shorter than a step does not stall it; on a machine whose cores the ranks "
              "already fill, the read's CPU time is still taken from the ranks.", "",
              f"File / memory: {ratio:.3f}x (ratio of the medians; the median of the "
              f"rounds' own ratios {speed['file_over_memory_per_round_median']:.3f}x); target "
              f"at most 1.15x: {'met' if ratio <= 1.15 else 'missed'}.", ""]
    return lines


def _memory_lines(memory: dict) -> list[str]:
    shape = memory["shape"]
    target = memory["target_mb"]
    lines = [
        "## 3. Memory", "",
        f"distnn on {memory['world_size']} ranks over a {memory['file_bytes'] / 2**30:.2f} GiB "
        f".safetensors file ({_shape_text(shape, memory['rows_in_file'])}, shuffled, "
        f"{memory['steps']} steps). Per rank, in MB (10^6 bytes): RssAnon (private anonymous "
        "memory) of the process before the run (Python, torch, the gloo group) and its peak "
        "in each phase of the run, sampled every 2 ms from /proc/self/status; Private_Clean + "
        "Private_Dirty from /proc/self/smaps_rollup at the end of the run; VmHWM (the peak "
        "resident size from the run's start, shared library pages included: an upper bound). "
        "Run twice: with glibc's malloc as it comes, and with its mmap threshold fixed at "
        "1 MiB (`mallopt(M_MMAP_THRESHOLD, 1 MiB)`), which gives every large block back to "
        "the system when it is freed: the difference is what the heap kept. The start-up "
        "checks the rank's rows for non-finite values "
        f"{memory['scan_bytes'] // 2**20} MiB at a time (datafile.SCAN_BYTES). "
        f"Target: at most {target} MB private per rank.", "",
        "| malloc | rank | RssAnon before | peak RssAnon, "
        f"{BUILD_PHASE} | peak RssAnon, {STEPS_PHASE} | private at the end | VmHWM | "
        f"within {target} MB |",
        "|---|---|---|---|---|---|---|---|"]
    for r in memory["ranks"]:
        peaks = r["rss_anon_peak_kb"]
        lines.append(f"| {r['allocator']} | {r['rank']} | {_mb(r['rss_anon_before_kb'])} "
                     f"| {_mb(peaks.get(BUILD_PHASE, 0))} | {_mb(peaks.get(STEPS_PHASE, 0))} "
                     f"| {_mb(r['private_end_kb'])} | {_mb(r['vm_hwm_kb'])} "
                     f"| {'yes' if r['within_target'] else 'no'} |")
    return lines + [""]


# -- the command -------------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


PARTS = ("world", "speed", "memory")


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(text.split(","))
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part {unknown[0]!r}; allowed: "
                                         + ", ".join(PARTS))
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distnn.tools.bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", default="bench-data-results", help="folder for bench-data.md and .json")
    add("--parts", type=_parts, default=PARTS,
        help="the tables to make, comma-separated: world, speed and/or memory")
    world = parser.add_argument_group("1. the result against the world size")
    world.add_argument("--worlds", type=_ints, default=(1, 2, 3, 4), help="comma-separated")
    world.add_argument("--rows", type=int, default=1001)
    world.add_argument("--batch-size", type=int, default=96)
    world.add_argument("--epochs", type=int, default=10)
    world.add_argument("--d-in", type=int, default=16)
    world.add_argument("--hidden", type=_ints, default=(32,))
    world.add_argument("--d-out", type=int, default=4)
    world.add_argument("--lr", type=float, default=1e-3, help="distnn's (sum loss)")
    speed = parser.add_argument_group("2. speed")
    speed.add_argument("--speed-world", type=int, default=2)
    speed.add_argument("--rounds", type=int, default=15)
    speed.add_argument("--speed-rows", type=int, default=8192)
    speed.add_argument("--speed-batch", type=int, default=256)
    speed.add_argument("--speed-d-in", type=int, default=1024)
    speed.add_argument("--speed-hidden", type=_ints, default=(1024,))
    speed.add_argument("--speed-d-out", type=int, default=16)
    speed.add_argument("--speed-lr", type=float, default=1e-6)
    speed.add_argument("--speed-steps", type=int, default=40, help="timed steps per run")
    speed.add_argument("--speed-warmup", type=int, default=3)
    memory = parser.add_argument_group("3. memory")
    memory.add_argument("--memory-mib", type=int, default=1024, help="size of x in MiB")
    memory.add_argument("--memory-d-in", type=int, default=1024)
    memory.add_argument("--memory-hidden", type=_ints, default=(64,))
    memory.add_argument("--memory-d-out", type=int, default=8)
    memory.add_argument("--memory-batch", type=int, default=256)
    memory.add_argument("--memory-lr", type=float, default=1e-6)
    memory.add_argument("--memory-steps", type=int, default=200)
    memory.add_argument("--memory-target-mb", type=int, default=600)
    memory.add_argument("--tmp-dir", default="/tmp", help="where the big file is written")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "torch": torch.__version__, "argv": argv,
                              "load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="distnn-bench-data-") as scratch:
        if "world" in args.parts:
            report["world"] = world_table(args, scratch)
        if "speed" in args.parts:
            report["speed"] = speed_table(args, scratch)
    if "memory" in args.parts:
        report["memory"] = memory_table(args)
    report["load_after"] = load_average()
    table = markdown(report)
    with open(os.path.join(args.out, "bench-data.md"), "w", encoding="utf-8") as file:
        file.write(table)
    with open(os.path.join(args.out, "bench-data.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=1)
    print(table)
    failed = []
    if "world" in report and report["world"]["relative_spread"]["distnn"] > AGREEMENT_RTOL:
        failed.append(f"distnn's final losses differ across world sizes by "
                      f"{report['world']['relative_spread']['distnn']:.2e} relative")
    if "speed" in report:
        memory_row = next(r for r in report["speed"]["rows"] if r["variant"] == DISTNN_MEMORY)
        if memory_row["loss_rel_diff_vs_file"] > 0:
            failed.append("distnn's losses from memory differ from those from the file by "
                          f"{memory_row['loss_rel_diff_vs_file']:.2e} relative")
    for problem in failed:
        print(f"distnn: error: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
