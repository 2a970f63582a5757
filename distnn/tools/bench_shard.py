"""``python -m distnn.tools.bench_shard``: what ``--shard`` saves and what it costs, on gloo
ranks of this machine, every mode side by side in one invocation.

1. Memory. The project's GPT (distnn.models.gpt; about 100M parameters by default) with AdamW
   and the sum cross-entropy, trained for a few steps by ``python -m distnn.train`` under
   ``torchrun`` on ``--memory-world`` ranks, once per ``--modes`` mode. Every
   ``--interval-s`` the driver reads each rank's /proc/PID/smaps_rollup (Private_Clean +
   Private_Dirty: the rank's own memory; Rss) and /proc/PID/status (VmHWM), from outside,
   and keeps each rank's peak in three phases, told apart by rank 0's loss lines (a step
   of the big model takes over the second after which distnn prints them): the start-up and
   the first step (every rank builds the whole model before it shards it; the first step
   allocates the gradients and AdamW's state), the steps after it (the steady state), and
   the end (the final checks). The modes of ``--mmap-modes`` run again with glibc's mmap
   threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), which returns every large block freed:
   what the ranks hold, without what glibc's heaps keep. A tiny GPT of the same context and
   vocabulary run the same way (``--floor-modes``) gives the process's own memory (torch,
   gloo, distnn), so that the model's part can be told apart.
2. Speed. A smaller GPT on ``--speed-world`` ranks (1 thread each, spawned): distnn.fit in
   every mode, and FSDP2 used directly in a plain torch loop written here (the same model
   and weights, the same rows on each rank, AdamW, the sum cross-entropy;
   ``fully_shard(reshard_after_forward=True)`` on each block, then on the model, with
   ``set_gradient_divide_factor(1.0)`` and ``set_force_sum_reduction_for_comms(True)`` as
   distnn sets them, so both sum). Each variant runs once untimed first; then in each of
   ``--rounds`` rounds every variant runs a ``--speed-warmup``-step run and a timed
   ``--speed-steps``-step run, each round starting one variant later; medians. distnn is
   timed by its ``TrainResult.wall_s`` (its step loop), the torch loop from its first batch
   to its last update; both include their first step (FSDP's lazy start, AdamW's state).
   The losses of every variant are checked against the torch loop's (exit 1 when they part).

Writes ``OUT.json`` (every sample and memory reading) and ``OUT.md`` (the tables). The
defaults take about 10 minutes on this project's 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distnn
from distnn.config import SHARD_MODES as MODES
from distnn.data.shards import shard_bounds
from distnn.distributed.runtime import Runtime, setup
from distnn.models.gpt import build
from distnn.tools.bench_data import below_one, load_average, machine, proc_kb, write_report
from distnn.tools.bench_lm import Recipe, cpu_seconds, timed_rounds, token_data
from distnn.tools.bench_loops import end_worker
from distnn.tools.spawn import join, spawn

SEED = 0
MB = 10**6
TORCH_FSDP = "torch fully_shard loop"
COMPILED = ", compiled blocks"  # --speed-compile: the variants with each block compiled
STARTUP = "start-up and the first step"
STEPS = "the steps after the first"
END = "after the last step"  # the final checks (the replica check of whole weights), the exit
ALLOCATORS = {  # the environment of a memory run's ranks
    "default": {},  # glibc's malloc as it comes
    # glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB),
    # after which blocks that size come from heaps that keep what they cannot trim; a
    # fixed threshold gives every block of 1 MiB or more a mapping of its own, returned on
    # free (as bench_data.fix_mmap_threshold does in-process)
    "mmap-1MiB": {"MALLOC_MMAP_THRESHOLD_": str(2**20)},
}
FIXED_MMAP = "mmap-1MiB"
ADAMW_BYTES = 16  # a parameter's weight, gradient and two moments in fp32
FIRST_LOSS_RTOL = 1e-4  # the same weights and rows, summed in another order
LOSS_RTOL = 1e-3  # every step's: AdamW's first steps turn rounding into small differences
STEP_LINE = re.compile(r"^(\d+) ([-+0-9.eE]+|nan|inf)$")  # distnn.train's loss line


@dataclasses.dataclass(frozen=True)
class GPTShape:
    """A GPT of distnn.models.gpt: its sizes, and the rows it reads (``context`` token ids
    of a ``vocab``-byte alphabet)."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int = 64
    vocab: int = 256

    def model_args(self) -> str:
        """``--model-args`` for distnn.train."""
        return json.dumps({"d_model": self.d_model, "n_layers": self.n_layers,
                           "n_heads": self.n_heads})

    def build(self, seed: int = SEED) -> nn.Module:
        """The model with the same weights on every rank and in every variant."""
        torch.manual_seed(seed)
        return build(d_in=self.context, d_out=self.vocab, d_model=self.d_model,
                     n_layers=self.n_layers, n_heads=self.n_heads)

    @property
    def parameters(self) -> int:
        """Its parameter count (counted on the meta device: nothing is allocated)."""
        with torch.device("meta"):
            model = build(d_in=self.context, d_out=self.vocab, d_model=self.d_model,
                          n_layers=self.n_layers, n_heads=self.n_heads)
        return sum(p.numel() for p in model.parameters())


def model_state_bytes(parameters: int, mode: str, world: int) -> float:
    """A rank's weights, gradients and AdamW moments in fp32 at rest under ``mode``
    (docs/sharding.md): 16 bytes a parameter whole; ``optimizer`` 8 + 8/N; ``gradients``
    and ``parameters`` 16/N. ZeroRedundancyOptimizer's 1/N is of whole tensors, so it is
    this only roughly."""
    per_parameter = {"none": ADAMW_BYTES, "optimizer": 8 + 8 / world}.get(
        mode, ADAMW_BYTES / world)
    return parameters * per_parameter


def write_tokens(path: str, shape: GPTShape, rows: int) -> None:
    """A data file of ``rows`` generated byte sequences (bench_lm's Markov chain): x and y
    int64 [rows, context], y the next tokens."""
    from safetensors.torch import save_file

    x, y = token_data(Recipe(rows=rows, context=shape.context, vocab=shape.vocab))
    save_file({"x": x, "y": y}, path)


# -- 1. memory: each rank sampled from outside ---------------------------------------------------

def train_command(mode: str, shape: GPTShape, data: str, *, world: int, steps: int,
                  batch_size: int, timeout_s: float) -> list[str]:
    """``torchrun -m distnn.train`` for ``steps`` steps of the GPT on ``data`` under
    ``--shard mode``, a loss line every step, the replica check only at the end."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", "-m", "distnn.train", "--data", data,
            "--model", "distnn.models.gpt:build", "--model-args", shape.model_args(),
            "--d-out", str(shape.vocab), "--loss", "cross-entropy", "--optimizer", "adamw",
            "--lr", "3e-4", "--batch-size", str(batch_size), "--steps", str(steps),
            "--no-shuffle", "--shard", mode, "--log-every", "1", "--verify-every", "0",
            "--device", "cpu", "--timeout-s", f"{timeout_s:g}"]


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as file:
        return file.read()


def rank_processes(parent: int) -> dict[int, int]:
    """The processes ``parent`` (the torchrun agent) started, by their RANK (as torchrun set
    it in each one's environment)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(_read(f"/proc/{entry}/stat").rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as file:
                environ = dict(item.split(b"=", 1) for item in file.read().split(b"\0")
                               if b"=" in item)
            if b"RANK" in environ:
                ranks[int(environ[b"RANK"])] = int(entry)
    return ranks


def rank_memory(pid: int) -> dict[str, int] | None:
    """A process's private memory (Private_Clean + Private_Dirty) and RSS now, and its peak
    RSS so far (VmHWM), in kB; None once it has exited."""
    try:
        rollup = proc_kb(_read(f"/proc/{pid}/smaps_rollup"))
        status = proc_kb(_read(f"/proc/{pid}/status"))
    except OSError:
        return None
    if "Rss" not in rollup:
        return None  # exiting
    return {"private_kb": rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
            "rss_kb": rollup["Rss"], "vm_hwm_kb": status.get("VmHWM", 0)}


class MemoryWatch:
    """Samples every rank of a torchrun job every ``interval_s`` in a thread; keeps each
    rank's peak private memory and RSS in each phase (``phase``, set by the caller), its last
    VmHWM, and each rank's largest private memory in every whole second."""

    def __init__(self, agent: int, world: int, interval_s: float) -> None:
        self.agent, self.world, self.interval_s = agent, world, interval_s
        self.phase = STARTUP
        self.peaks_kb: dict[int, dict[str, dict[str, int]]] = {}
        self.vm_hwm_kb: dict[int, int] = {}
        self.by_second: dict[int, dict[int, int]] = {}
        self.samples = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-watch", daemon=True)

    def _loop(self) -> None:
        ranks: dict[int, int] = {}
        while not self._stop.is_set():
            if len(ranks) < self.world:
                ranks = rank_processes(self.agent) or ranks
            second = int(time.monotonic() - self._started)
            phase = self.phase
            for rank, pid in ranks.items():
                values = rank_memory(pid)
                if values is None:
                    continue
                mine = self.peaks_kb.setdefault(rank, {}).setdefault(phase, {})
                for key in ("private_kb", "rss_kb"):
                    mine[key] = max(mine.get(key, 0), values[key])
                self.vm_hwm_kb[rank] = values["vm_hwm_kb"]
                into = self.by_second.setdefault(rank, {})
                into[second] = max(into.get(second, 0), values["private_kb"])
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_memory(mode: str, shape: GPTShape, data: str, *, world: int, steps: int,
                   batch_size: int, interval_s: float, timeout_s: float, label: str,
                   allocator: str = "default") -> dict[str, Any]:
    """One distnn.train run under ``--shard mode`` with every rank watched (``allocator``: a
    key of ALLOCATORS); returns its record: the peaks by rank and phase, the times, every
    step's global loss, the exit code."""
    command = train_command(mode, shape, data, world=world, steps=steps,
                            batch_size=batch_size, timeout_s=timeout_s)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               **ALLOCATORS[allocator]}
    started = time.monotonic()
    # a session of its own: on a hang the whole job (the agent and its ranks) is ended
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=environ, start_new_session=True)
    output: list[str] = []
    losses: dict[int, float] = {}
    first_step_s = None
    with MemoryWatch(process.pid, world, interval_s) as watch:
        def read_output() -> None:
            nonlocal first_step_s
            for line in process.stdout:
                output.append(line)
                match = STEP_LINE.match(line.strip())
                if match:
                    losses[int(match[1])] = float(match[2])
                    if first_step_s is None:
                        first_step_s = time.monotonic() - started
                        watch.phase = STEPS
                    if int(match[1]) == steps - 1:
                        watch.phase = END

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=timeout_s * 5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            code = process.wait()
        reader.join(timeout=10)
    summary = next((line.strip() for line in output if line.startswith("summary:")), "")
    wall = re.search(r"wall_s=([0-9.]+)", summary)
    if code != 0:
        sys.stderr.write("".join(output[-30:]))
    return {"label": label, "mode": mode, "allocator": allocator,
            "shape": dataclasses.asdict(shape),
            "parameters": shape.parameters, "world_size": world, "steps": steps,
            "batch_size": batch_size, "command": command, "exit_code": code,
            "interval_s": interval_s, "samples": watch.samples,
            "launch_to_first_step_s": first_step_s,
            "steps_wall_s": float(wall.group(1)) if wall else None,
            "total_s": round(time.monotonic() - started, 2),
            "losses": [losses[step] for step in sorted(losses)],
            "peaks_kb": {str(rank): watch.peaks_kb[rank] for rank in sorted(watch.peaks_kb)},
            "vm_hwm_kb": {str(rank): watch.vm_hwm_kb[rank] for rank in sorted(watch.vm_hwm_kb)},
            "private_kb_by_second": {str(rank): [watch.by_second[rank][s]
                                                 for s in sorted(watch.by_second[rank])]
                                     for rank in sorted(watch.by_second)}}


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode's run of the big GPT, then those of ``--mmap-modes`` again with glibc's mmap
    threshold fixed, then the tiny GPT's runs (``--floor-modes``), in turn."""
    shape = GPTShape(args.memory_d_model, args.memory_layers, args.memory_heads,
                     args.context)
    floor = GPTShape(16, 1, 1, args.context)
    plan = [("model", mode, shape, "default") for mode in args.modes]
    plan += [("model", mode, shape, FIXED_MMAP) for mode in args.mmap_modes]
    plan += [("floor", mode, floor, "default") for mode in args.floor_modes]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as scratch:
        data = os.path.join(scratch, "tokens.safetensors")
        write_tokens(data, shape, args.memory_batch * args.memory_steps)
        for label, mode, which, allocator in plan:
            print(f"memory: {label}, --shard {mode}, {which.parameters:,} parameters, "
                  f"{args.memory_world} ranks, malloc {allocator}...", file=sys.stderr,
                  flush=True)
            record = measure_memory(mode, which, data, world=args.memory_world,
                                    steps=args.memory_steps, batch_size=args.memory_batch,
                                    interval_s=args.interval_s, timeout_s=args.timeout_s,
                                    label=label, allocator=allocator)
            print(f"  {memory_line(record)}", file=sys.stderr, flush=True)
            runs.append(record)
    return {"shape": dataclasses.asdict(shape), "parameters": shape.parameters,
            "floor_shape": dataclasses.asdict(floor), "world_size": args.memory_world,
            "steps": args.memory_steps, "batch_size": args.memory_batch,
            "interval_s": args.interval_s, "runs": runs,
            "rows": memory_rows(runs)}


def _peak(record: dict, phase: str, key: str = "private_kb") -> list[int]:
    """Each rank's peak of ``key`` in ``phase`` (0 where none was sampled), by rank."""
    return [record["peaks_kb"][rank].get(phase, {}).get(key, 0)
            for rank in sorted(record["peaks_kb"], key=int)]


def memory_line(record: dict) -> str:
    def mb(phase: str) -> str:
        return f"{max(_peak(record, phase), default=0) * 1024 / MB:.0f}"

    return (f"exit {record['exit_code']}; the worst rank's private peak: start-up "
            f"{mb(STARTUP)} MB, steps {mb(STEPS)} MB, end {mb(END)} MB; first step line at "
            f"{_number(record['launch_to_first_step_s'], '.1f')} s, steps "
            f"{record['steps_wall_s']} s, all {record['total_s']} s")


def _worst_mb(record: dict | None, phase: str, key: str = "private_kb") -> float | None:
    """The worst rank's peak of ``key`` in ``phase``, MB (None for a failed or missing run)."""
    if record is None or record["exit_code"] != 0:
        return None
    return max(_peak(record, phase, key), default=0) * 1024 / MB


def memory_rows(runs: list[dict]) -> list[dict]:
    """Per allocator and mode: the worst rank's peaks in each phase (MB), the steps' ratio
    to ``none``'s under the same allocator, and the same above the tiny model's peak over its
    whole run (the process's own memory: the mode's own, else none's; a tiny model's steps
    are too short to have a phase of their own, its lines come all at once)."""
    model = {(r["allocator"], r["mode"]): r for r in runs if r["label"] == "model"}
    floors = {r["mode"]: r for r in runs if r["label"] == "floor"}

    def floor_of(mode: str) -> tuple[str | None, float | None]:
        which = mode if mode in floors else "none" if "none" in floors else None
        if which is None:
            return None, None
        peaks = [_worst_mb(floors[which], phase) for phase in (STARTUP, STEPS, END)]
        return which, None if None in peaks else max(peaks)

    rows = []
    for (allocator, mode), record in model.items():
        steps = _worst_mb(record, STEPS)
        none = model.get((allocator, "none"))
        none_steps = _worst_mb(none, STEPS)
        floor_mode, base = floor_of(mode)
        none_base = floor_of("none")[1]
        above = None if steps is None or base is None else steps - base
        none_above = None if none_steps is None or none_base is None else (
            none_steps - none_base)
        rows.append({
            "allocator": allocator, "mode": mode, "exit_code": record["exit_code"],
            "startup_private_mb": _worst_mb(record, STARTUP), "steps_private_mb": steps,
            "end_private_mb": _worst_mb(record, END),
            "startup_rss_mb": _worst_mb(record, STARTUP, "rss_kb"),
            "steps_rss_mb": _worst_mb(record, STEPS, "rss_kb"),
            "per_rank_startup_private_mb": [v * 1024 / MB for v in _peak(record, STARTUP)],
            "per_rank_steps_private_mb": [v * 1024 / MB for v in _peak(record, STEPS)],
            "steps_over_none": _ratio(steps, none_steps),
            "floor_mode": floor_mode, "floor_steps_private_mb": base,
            "steps_above_floor_mb": above, "above_floor_over_none": _ratio(above, none_above),
            "model_state_mb": model_state_bytes(record["parameters"], mode,
                                                record["world_size"]) / MB,
            "launch_to_first_step_s": record["launch_to_first_step_s"],
            "steps_wall_s": record["steps_wall_s"],
            "loss_rel_diff_vs_none": _losses_apart(record["losses"],
                                                   none["losses"] if none else None),
        })
    return rows


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def _relative(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-12)


def _losses_apart(losses: list[float], reference: list[float] | None) -> float | None:
    """The largest relative difference of two runs' step losses (None without both)."""
    if not reference or not losses or len(losses) != len(reference):
        return None
    return max(_relative(got, want) for got, want in zip(losses, reference, strict=True))


# -- 2. speed: distnn's modes and FSDP2 used directly, in one process group --------------------

def run_distnn(mode: str, shape: GPTShape, x: torch.Tensor, y: torch.Tensor, *, steps: int,
               batch_size: int, lr: float, timeout_s: float, rt: Runtime,
               compile: bool = False) -> tuple[float, list[float]]:
    """``steps`` steps with distnn.fit under ``shard=mode`` (rows in file order, quiet, the
    replica check only at the end; ``compile``: --compile, whose compiling is outside
    ``wall_s``); returns its ``wall_s`` and each step's global loss."""
    with contextlib.redirect_stdout(io.StringIO()):  # the summary line
        result = distnn.fit(shape.build(), train=(x, y), loss="cross-entropy",
                            optimizer="adamw", batch_size=batch_size, steps=steps, lr=lr,
                            no_shuffle=True, shard=mode, seed=SEED, log_every=0, quiet=True,
                            verify_every=0, timeout_s=timeout_s, runtime=rt,
                            compile=compile)
    return result.wall_s, list(result.losses)


def run_torch_fsdp(shape: GPTShape, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                   batch_size: int, lr: float, compile: bool = False
                   ) -> tuple[float, list[float]]:
    """``steps`` steps of FSDP2 as a torch user writes it, on this rank of the current
    process group: batch k is rows [kB, (k+1)B) (wrapping around), this rank's
    ``shard_bounds`` of it; the sum cross-entropy; AdamW (distnn's settings: torch's defaults
    and weight decay 0.01); ``compile``: each block's forward compiled (``block.compile()``)
    before it is sharded, as torchtitan does (torch compiles at the first step: the untimed
    first run of every variant compiles it for the later ones). Returns the seconds from the
    first batch in hand to the last update, and each step's global loss (summed over the
    ranks after the timed steps)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    world, rank = dist.get_world_size(), dist.get_rank()
    model = shape.build()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start, stop = shard_bounds(batch_size, world, rank)
    batches = x.shape[0] // batch_size
    losses = torch.zeros(steps)
    started = time.perf_counter()
    for step in range(steps):
        first = (step % batches) * batch_size
        x_shard, y_shard = x[first + start:first + stop], y[first + start:first + stop]
        scores = model(x_shard)
        loss = F.cross_entropy(scores.flatten(0, -2), y_shard.flatten(), reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
    wall_s = time.perf_counter() - started
    dist.all_reduce(losses)  # outside the timed steps
    return wall_s, losses.tolist()


def speed_variants(modes: list[str], compiled: bool = False) -> tuple[str, ...]:
    """The names of the timed variants: distnn in each mode, then the torch loop; with
    ``compiled``, also distnn's --shard parameters --compile and the torch loop with its
    blocks compiled."""
    names = [*(f"distnn --shard {mode}" for mode in modes), TORCH_FSDP]
    if compiled:
        names += [f"distnn --shard parameters --compile{COMPILED}", f"{TORCH_FSDP}{COMPILED}"]
    return tuple(names)


def _speed_line(sample: dict) -> str:
    cpu = sample["cpu_ms_per_step"]
    return (f"{sample['ms_per_step']:.1f} ms/step (CPU {'' if cpu is None else f'{cpu:.1f}'} "
            "ms/step a rank)")


def _speed_worker(rank: int, world: int, port: int, plan: dict, out_path: str) -> None:
    """One rank: each variant once untimed, then every variant once per round (a warm-up
    run, then the timed run), each round starting one variant later; rank 0 writes the
    samples."""
    join(rank, world, port)
    shape = GPTShape(**plan["shape"])
    x, y = token_data(Recipe(rows=plan["rows"], context=shape.context, vocab=shape.vocab))
    variants = speed_variants(plan["modes"], plan["compiled"])
    with setup(device="cpu", timeout_s=plan["timeout_s"]) as rt:
        def run(name: str, steps: int) -> tuple[float, list[float], float]:
            before = cpu_seconds()
            compiled = name.endswith(COMPILED)
            if name.startswith(TORCH_FSDP):
                wall_s, losses = run_torch_fsdp(shape, x, y, steps=steps,
                                                batch_size=plan["batch_size"], lr=plan["lr"],
                                                compile=compiled)
            else:
                mode = name.removesuffix(COMPILED).split()[2]  # "distnn --shard MODE ..."
                wall_s, losses = run_distnn(mode, shape, x, y, steps=steps,
                                            batch_size=plan["batch_size"], lr=plan["lr"],
                                            timeout_s=plan["timeout_s"], rt=rt,
                                            compile=compiled)
            return wall_s, losses, cpu_seconds() - before

        samples = timed_rounds(run, variants, plan=plan, world=world, rank=rank,
                               line=_speed_line)
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as file:
                json.dump(samples, file)
        # FSDP2 holds the gloo group past its destruction, as DDP does, and the teardown
        # can abort the process ("terminate called without an active exception", seen here)
        end_worker()


def speed_part(args: argparse.Namespace, out: str) -> dict[str, Any]:
    """The timed rounds in one gloo group; the medians, the ratio to the torch loop, and the
    losses' agreement."""
    shape = GPTShape(args.speed_d_model, args.speed_layers, args.speed_heads, args.context)
    rows = args.speed_batch * max(args.speed_steps, args.speed_warmup)
    plan = {"shape": dataclasses.asdict(shape), "modes": args.modes, "rows": rows,
            "batch_size": args.speed_batch, "steps": args.speed_steps,
            "warmup": args.speed_warmup, "rounds": args.rounds, "lr": 3e-4,
            "timeout_s": args.timeout_s, "compiled": args.speed_compile}
    print(f"speed: {shape.parameters:,} parameters, {args.speed_world} ranks, {args.rounds} "
          f"rounds of {args.speed_steps} steps...", file=sys.stderr, flush=True)
    samples_path = f"{out}.samples.json"
    try:
        spawn(_speed_worker, args.speed_world, plan, samples_path)
        with open(samples_path, encoding="utf-8") as file:
            samples = json.load(file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(samples_path)
    return {"shape": dataclasses.asdict(shape), "parameters": shape.parameters,
            "world_size": args.speed_world, "batch_size": args.speed_batch,
            "steps": args.speed_steps, "warmup": args.speed_warmup, "rounds": args.rounds,
            **summarize_speed(samples, speed_variants(args.modes, args.speed_compile))}


def summarize_speed(samples: list[dict], variants: tuple[str, ...]) -> dict[str, Any]:
    """Each variant's median ms/step and range, its CPU a step, its ratio to the torch loop
    (the compiled loop for a compiled variant; by the medians, and the median of each
    round's own ratio), and its losses against the torch loop's first timed run."""
    by_variant = {name: [s for s in samples if s["variant"] == name] for name in variants}
    reference = by_variant[TORCH_FSDP][0]["losses"]
    rows = []
    for name, mine in by_variant.items():
        loop = by_variant[f"{TORCH_FSDP}{COMPILED}" if name.endswith(COMPILED) else TORCH_FSDP]
        torch_ms = statistics.median(s["ms_per_step"] for s in loop)
        times = [s["ms_per_step"] for s in mine]
        cpu = [s["cpu_ms_per_step"] for s in mine]
        per_round = [m["ms_per_step"] / t["ms_per_step"]
                     for m, t in zip(mine, loop, strict=True)]
        rows.append({
            "variant": name, "ms_per_step": statistics.median(times),
            "min_ms_per_step": min(times), "max_ms_per_step": max(times),
            "cpu_ms_per_step": None if None in cpu else statistics.median(cpu),
            "runs": len(mine), "over_torch": statistics.median(times) / torch_ms,
            "over_torch_per_round": statistics.median(per_round),
            "first_loss": mine[0]["losses"][0],
            "first_loss_rel_diff": max(_relative(s["losses"][0], reference[0]) for s in mine),
            "loss_rel_diff": max(_losses_apart(s["losses"], reference) for s in mine),
        })
    agree = all(r["first_loss_rel_diff"] <= FIRST_LOSS_RTOL and r["loss_rel_diff"] <= LOSS_RTOL
                for r in rows)
    return {"rows": rows, "losses_agree": agree,
            "samples": [{k: v for k, v in s.items() if k != "losses"} for s in samples],
            "losses": {name: mine[0]["losses"] for name, mine in by_variant.items()}}


# -- the report ------------------------------------------------------------------------------

def _number(value: float | None, form: str = ".0f") -> str:
    return "" if value is None else format(value, form)


def _times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    """The tables as docs/benchmarks.md quotes them."""
    lines = ["# --shard: memory and speed on this machine", "",
             f"Machine: {report['machine']}; torch {report['torch']}; gloo. Command: "
             f"`python -m distnn.tools.bench_shard {' '.join(report['argv'])}`. Load average "
             f"(1 min) at the start and the end: {report['load_before']}, "
             f"{report['load_after']}.", ""]
    if "memory" in report:
        lines += _memory_lines(report["memory"])
    if "speed" in report:
        lines += _speed_lines(report["speed"])
    return "\n".join(lines)


def _memory_lines(memory: dict) -> list[str]:
    shape, world = memory["shape"], memory["world_size"]
    floor = memory["floor_shape"]
    lines = [
        "## Memory", "",
        f"`python -m distnn.train` under torchrun, {world} ranks (OMP_NUM_THREADS=1): the GPT "
        f"with {shape['n_layers']} layers, d_model {shape['d_model']}, {shape['n_heads']} "
        f"heads, context {shape['context']}, vocabulary {shape['vocab']} "
        f"({memory['parameters']:,} parameters), AdamW, the sum cross-entropy, a global batch "
        f"of {memory['batch_size']} rows, {memory['steps']} steps, the replica check only at "
        "the end. Each rank's Private_Clean + Private_Dirty (/proc/PID/smaps_rollup) and RSS "
        f"read from outside every {memory['interval_s']} s; the worst rank's peak, MB = 10^6 "
        "bytes. Start-up: from the launch until rank 0 prints the first step's loss (every "
        "rank builds the whole model before sharding it; the first step allocates the "
        "gradients and AdamW's state). Steps: from that line to the last step's (the steady "
        "state). End: after it (the final checks, the exit). Floor: the peak of the same run "
        f"of a tiny GPT ({floor['n_layers']} layer, d_model {floor['d_model']}), the "
        "process's own memory (torch, gloo, distnn). Model state: the weights, gradients and "
        "AdamW moments a rank holds at rest by docs/sharding.md's count. malloc: `default` is "
        "glibc as it comes; `mmap-1MiB` runs the ranks with MALLOC_MMAP_THRESHOLD_=1048576 "
        "(every block of 1 MiB or more mapped on its own and returned when freed).", "",
        "| malloc | --shard | start-up peak | steps peak | steps / none | end peak | floor "
        "| steps above floor | above floor / none | model state | RSS steps peak "
        "| per rank, steps | first step line | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in memory["rows"]:
        per_rank = ", ".join(f"{v:.0f}" for v in r["per_rank_steps_private_mb"])
        floor_text = _number(r["floor_steps_private_mb"])
        if floor_text and r["floor_mode"] != r["mode"]:
            floor_text += f" ({r['floor_mode']}'s)"
        lines.append(
            f"| {r['allocator']} | {r['mode']} | {_number(r['startup_private_mb'])} "
            f"| {_number(r['steps_private_mb'])} | {_times(r['steps_over_none'])} "
            f"| {_number(r['end_private_mb'])} | {floor_text} "
            f"| {_number(r['steps_above_floor_mb'])} | {_times(r['above_floor_over_none'])} "
            f"| {r['model_state_mb']:.0f} | {_number(r['steps_rss_mb'])} | {per_rank} "
            f"| {_number(r['launch_to_first_step_s'], '.1f')} s "
            f"| {_number(r['steps_wall_s'], '.1f')} s |")
    failed = [f"{r['mode']} ({r['allocator']})" for r in memory["rows"] if r["exit_code"]]
    failed += [f"floor {r['mode']}" for r in memory["runs"]
               if r["label"] == "floor" and r["exit_code"]]
    apart = [r["loss_rel_diff_vs_none"] for r in memory["rows"]
             if r["loss_rel_diff_vs_none"] is not None]
    lines += [""]
    if failed:
        lines += [f"Failed runs (no numbers): {', '.join(failed)}.", ""]
    if apart:
        lines += [f"Every mode's step losses against none's: at most {max(apart):.1e} "
                  "relative apart.", ""]
    return lines


def _speed_lines(speed: dict) -> list[str]:
    shape = speed["shape"]
    lines = [
        "## Speed", "",
        f"{speed['world_size']} spawned ranks, 1 thread each: the GPT with {shape['n_layers']} "
        f"layers, d_model {shape['d_model']}, context {shape['context']}, vocabulary "
        f"{shape['vocab']} ({speed['parameters']:,} parameters), AdamW, the sum "
        f"cross-entropy, a global batch of {speed['batch_size']} rows in file order. "
        f"{TORCH_FSDP}: fully_shard(reshard_after_forward=True) on each block, then the "
        "model, gradient divide factor 1 and sum reductions (as distnn), written in the tool. "
        f"{speed['rounds']} rounds, each running every variant for a {speed['warmup']}-step "
        f"run and then a timed {speed['steps']}-step run, each round starting one variant "
        "later; the medians and the range. CPU ms/step a rank: the process's CPU time in the "
        "timed run less the warm-up run's, over the steps between, the mean of the ranks. "
        f"Variants named '{COMPILED.removeprefix(', ')}' compile each block's forward "
        "(distnn's --compile under --shard; the loop's blocks' .compile() before fully_shard) "
        "and are set against the compiled loop.",
        "",
        "| variant | ms/step (median) | min-max | CPU ms/step a rank | / torch loop (medians) "
        "| / torch loop (per round) | first loss | losses apart |",
        "|---|---|---|---|---|---|---|---|"]
    for r in speed["rows"]:
        lines.append(
            f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['min_ms_per_step']:.1f}-"
            f"{r['max_ms_per_step']:.1f} | {_number(r['cpu_ms_per_step'], '.1f')} "
            f"| {r['over_torch']:.3f}x | {r['over_torch_per_round']:.3f}x "
            f"| {r['first_loss']:.4f} | {r['loss_rel_diff']:.1e} |")
    samples = "; ".join(
        f"{name}: " + ", ".join(f"{s['ms_per_step']:.1f}" for s in speed["samples"]
                                if s["variant"] == name)
        for name in [r["variant"] for r in speed["rows"]])
    lines += ["", f"Samples (ms/step, by round): {samples}.", "",
              f"Losses: {'agree' if speed['losses_agree'] else 'DIFFER'} (every run against "
              f"the torch loop's first: the first step within {FIRST_LOSS_RTOL:g} relative, "
              f"every step within {LOSS_RTOL:g}).", ""]
    return lines


# -- the command -------------------------------------------------------------------------------

def _modes(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    wrong = [mode for mode in modes if mode not in MODES]
    if wrong or not modes:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: a comma-separated list of "
                                         f"{', '.join(MODES)}")
    return modes


def _modes_or_none(text: str) -> list[str]:
    return _modes(text) if text.strip() else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distnn.tools.bench_shard",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", default="bench-shard", help="writes OUT.json and OUT.md")
    add("--parts", default="memory,speed", help="memory, speed or both")
    add("--modes", type=_modes, default=list(MODES),
        help="the --shard modes, comma-separated (none first: the ratios are to it)")
    add("--context", type=int, default=64, help="tokens a row, both parts")
    add("--timeout-s", type=float, default=60.0, help="distnn's --timeout-s")
    add("--memory-world", type=int, default=4)
    add("--memory-d-model", type=int, default=768)
    add("--memory-layers", type=int, default=14)
    add("--memory-heads", type=int, default=12)
    add("--memory-batch", type=int, default=4, help="rows in the global batch")
    add("--memory-steps", type=int, default=3)
    add("--interval-s", type=float, default=0.1, help="between memory samples")
    add("--floor-modes", type=_modes_or_none, default=["none", "parameters"],
        help="the modes to run a tiny GPT in too (the process's own memory); '' for none")
    add("--mmap-modes", type=_modes_or_none, default=list(MODES),
        help="the modes to run again with glibc's mmap threshold fixed at 1 MiB (what the "
             "ranks hold without the heap's leftovers); '' for none")
    add("--speed-world", type=int, default=2)
    add("--speed-d-model", type=int, default=256)
    add("--speed-layers", type=int, default=4)
    add("--speed-heads", type=int, default=4)
    add("--speed-batch", type=int, default=8, help="rows in the global batch")
    add("--speed-steps", type=int, default=15, help="timed steps a run")
    add("--speed-warmup", type=int, default=3, help="steps of the run before each timed one")
    add("--speed-compile", action="store_true",
        help="also distnn's --shard parameters --compile and the torch loop with each block "
             "compiled")
    add("--rounds", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if not parts or set(parts) - {"memory", "speed"}:
        parser.error(f"--parts: got {args.parts!r}; allowed: memory, speed or memory,speed")
    if "speed" in parts and "parameters" not in args.modes:
        parser.error(f"--modes: got {','.join(args.modes)} with the speed part; allowed: "
                     "modes that include parameters (timed against the torch loop)")
    if args.memory_steps < 2:
        parser.error(f"--memory-steps: got {args.memory_steps}; allowed: 2 or more (the first "
                     "step is counted with the start-up)")
    error = below_one(args, ("memory_world", "memory_batch", "speed_world", "speed_batch",
                             "speed_steps", "speed_warmup", "rounds"))
    if error:
        print(error, file=sys.stderr)
        return 2
    report: dict[str, Any] = {"machine": machine(), "torch": torch.__version__, "argv": argv,
                              "load_before": load_average()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if "memory" in parts:
        report["memory"] = memory_part(args)
        report["load_after_memory"] = load_average()
    if "speed" in parts:
        report["speed"] = speed_part(args, args.out)
    report["load_after"] = load_average()
    write_report(args.out, report, markdown(report))
    failed = [f"{r['label']} {r['mode']}" for r in report.get("memory", {}).get("runs", [])
              if r["exit_code"] != 0]
    if failed:
        print(f"distnn: error: the memory runs of --shard {', '.join(failed)} failed",
              file=sys.stderr)
        return 1
    if "speed" in report and not report["speed"]["losses_agree"]:
        print("distnn: error: the variants' losses differ beyond the tolerance",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
