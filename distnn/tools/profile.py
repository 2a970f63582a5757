"""``python -m distnn.tools.profile``: what a training step runs on the device, per step.

Takes the flags of ``python -m distnn.train`` (``--cuda-graph``, ``--compile``,
``--precision``, ``--steps``, ...), runs the trainer once to warm up and once under
``torch.profiler``, and prints, for the step loop alone (start-up, compiling and capturing
left out: the trainer marks its steps with a profiler range):

- on a GPU: the kernels per step (memory copies and fills included), the time the GPU was
  busy running them per step against the wall time per step, and the 25 kernels that took
  the most of it (all of a small model's). In a captured graph the GPU runs the kernels
  back to back, so busy time is the step's floor, and fewer or shorter kernels are the way
  below it;
- on the CPU: the operators per step (the outermost ``aten::`` calls; the kernels of a
  compiled graph are not operators, so ``--compile`` shows fewer) and their self time.

With ``--floor`` (on a GPU, in fp32), the same for the floor ``python -m distnn.tools.bench`` sets
distnn against: the reference loop captured whole in one CUDA graph by hand
(``bench_loops.captured_floor``; with ``--compile``, its forward and loss compiled), at the
sizes the flags give. Its kernels beside those of ``--cuda-graph`` show where distnn's step
does more or other work.

One process, or every rank of a launch (each profiles its own steps; rank 0 prints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from distnn.config import TrainConfig, parse_config
from distnn.distributed.environment import detect_launch
from distnn.distributed.process_group import CollectiveFailed
from distnn.distributed.runtime import Runtime, setup
from distnn.errors import RunFailed, UsageError
from distnn.tools.bench_loops import captured_floor
from distnn.trainer import STEPS_RANGE, Trainer

WARMUP_STEPS = 5
# What --floor takes from the flags (the rest must be left at their defaults)
FLOOR_FLAGS = {"batch_size", "d_in", "hidden", "d_out", "lr", "seed", "steps", "compile",
               "cuda_graph", "device", "backend", "timeout_s", "quiet", "verbose",
               "log_every"}


class ProfileEmpty(RuntimeError):
    """The profiler's record lacks what a step profile counts (its range, or any work)."""


@dataclass
class StepProfile:
    device: str
    steps: int
    wall_us: float  # per step, the trainer's own timing of its step loop, under the profiler
    work_per_step: float  # kernels (GPU) or outermost operators (CPU)
    busy_us: float | None  # GPU time in kernels per step (summed over streams); None on a CPU
    top: list[tuple[str, float, float]]  # (name, calls per step, us per step), longest first


def profile_steps(config: TrainConfig, rt: Runtime, top: int = 25) -> StepProfile:
    """Runs ``config`` twice (a short warm-up, then profiled); returns its steps' profile."""
    config = dataclasses.replace(config, quiet=True, log_every=0, metrics=None, save=None)
    cuda = rt.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # No empty profiler session first, the workaround (pytorch PR #100441) for replaying under
    # the profiler a CUDA graph captured before its first use: the graph profiled here is
    # captured inside the session, and with CUDA 13.0 an empty session was reported to leave
    # later ones without kernel records (a check below says so if it happens).
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' summary lines
        Trainer(dataclasses.replace(config, steps=WARMUP_STEPS), rt).train()
        with profile(activities=activities) as prof:
            result = Trainer(config, rt).train()
    return _step_profile(prof.events(), rt, result.steps, result.wall_s, top)


def profile_floor(config: TrainConfig, rt: Runtime, top: int = 25) -> StepProfile:
    """The hand-made floor's replays for ``config`` (its sizes, ``--steps``, ``--compile``),
    profiled as :func:`profile_steps` profiles the trainer's steps."""
    default = TrainConfig()
    others = [f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(config)
              if field.name not in FLOOR_FLAGS
              and getattr(config, field.name) != getattr(default, field.name)]
    if others or rt.world_size != 1:
        given = f"got {', '.join(others)}" if others else f"got {rt.world_size} processes"
        raise UsageError(f"--floor: {given}; the floor is the reference loop (fp32, MSE, the "
                         "reference program's update, a fixed batch) in one process; allowed "
                         "with it: --batch-size, --d-in, --hidden, --d-out, --lr, --seed, --steps, "
                         "--compile, --cuda-graph (it is a graph anyway)")
    if rt.device.type != "cuda":
        raise UsageError("--floor: the floor is a CUDA graph; this process computes on the "
                         "CPU")
    config = config.resolved()
    replay, loss = captured_floor(config, rt.device, compiled=config.compile)
    losses = torch.zeros(config.steps, device=rt.device)
    for _ in range(WARMUP_STEPS):
        replay()
    torch.cuda.synchronize(rt.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function(STEPS_RANGE):
            started = time.perf_counter()
            for index in range(config.steps):
                replay()
                losses[index] = loss  # as the benchmark's floor keeps its losses
            torch.cuda.synchronize(rt.device)
            wall_s = time.perf_counter() - started
    return _step_profile(prof.events(), rt, config.steps, wall_s, top)


def _step_profile(events, rt: Runtime, steps: int, wall_s: float, top: int) -> StepProfile:
    """The kernels (GPU) or outermost operators (CPU) inside the one STEPS_RANGE."""
    cuda = rt.device.type == "cuda"
    # The trainer's range on the host (on a GPU the profiler also shows it on the device)
    ranges = [e for e in events if e.name == STEPS_RANGE and e.device_type == DeviceType.CPU]
    if len(ranges) != 1:
        raise ProfileEmpty(f"expected one {STEPS_RANGE!r} range in the profile, "
                           f"found {len(ranges)}")
    start, end = ranges[0].time_range.start, ranges[0].time_range.end
    if cuda:
        # Kernels start after their launch and before the last flush ends (it waits for them).
        work = [(e.name, e.time_range.elapsed_us()) for e in events
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation
                and start <= e.time_range.start <= end]
    else:
        work = [(e.name, e.self_cpu_time_total) for e in events
                if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
                and start <= e.time_range.start and e.time_range.end <= end
                and not _inside_an_operator(e)]
    if not work:
        raise ProfileEmpty(f"the profiler recorded no {'kernels' if cuda else 'operators'} "
                           "in the steps' range, so there is nothing to count")
    calls, times = Counter(), defaultdict(float)
    for name, us in work:
        calls[name] += 1
        times[name] += us
    longest = sorted(times, key=times.get, reverse=True)[:top]
    return StepProfile(
        device=torch.cuda.get_device_name(rt.device) if cuda else "CPU", steps=steps,
        wall_us=wall_s / steps * 1e6, work_per_step=len(work) / steps,
        busy_us=sum(times.values()) / steps if cuda else None,
        top=[(name, calls[name] / steps, times[name] / steps) for name in longest])


def _inside_an_operator(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def report(result: StepProfile, flags: list[str]) -> str:
    what = "kernels" if result.busy_us is not None else "operators"
    head = (f"{' '.join(flags) or 'eager'} on {result.device}, {result.steps} steps: "
            f"{result.wall_us:.1f} us/step wall (profiled), {result.work_per_step:.1f} {what} "
            "per step")
    if result.busy_us is not None:
        head += (f", GPU busy {result.busy_us:.1f} us/step "
                 f"({100 * result.busy_us / result.wall_us:.0f}% of the wall time)")
    unit = "GPU" if result.busy_us is not None else "self CPU"
    lines = [head, "", f"| {what[:-1]} | per step | {unit} us per step |", "|---|---|---|"]
    lines += [f"| `{name[:120]}` | {calls:g} | {us:.2f} |" for name, calls, us in result.top]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        launch = detect_launch(os.environ)
        floor = "--floor" in argv
        config = parse_config([arg for arg in argv if arg != "--floor"])
        with setup(device=config.device, backend=config.backend, timeout_s=config.timeout_s,
                   launch=launch) as rt:
            result = profile_floor(config, rt) if floor else profile_steps(config, rt)
            if rt.is_main:
                print(report(result, argv), flush=True)
    except (UsageError, CollectiveFailed, RunFailed) as error:
        print(f"distnn.tools.profile: error: {' '.join(str(error).split())}", file=sys.stderr)
        return error.exit_code if isinstance(error, RunFailed) else 2
    except ProfileEmpty as error:
        print(f"distnn.tools.profile: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
