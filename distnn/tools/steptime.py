"""distnn's own step time, measured as a user measures it: ``python -m distnn.train`` with
the user's flags, on ranks started as torchrun starts them (one process and one CPU thread
each, a real gloo group), timed by the run's own summary (``wall_s``: its step loop).

The time per step is the MARGINAL one: (``wall_s`` of a long run - ``wall_s`` of a short run)
/ (the difference in steps), so what a run pays once (its first steps' warm-up, the final
flush) cancels. Every run is ``distnn.train.main`` called in the spawned ranks, so a
measurement costs one start of the ranks, not one per run; each run builds its process
group, model and data as the command does. The runs alternate (each round starts one
workload later, and every other round runs the long run first); the result is the median
over ``rounds`` rounds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Sequence

from distnn.tools.spawn import free_ports, join, spawn

WALL_S = re.compile(r"\bwall_s=([0-9.eE+-]+)")


def mlp_flags(*, batch: int, d_in: int, hidden: Sequence[int], d_out: int) -> list[str]:
    """``python -m distnn.train``'s flags for its MLP on one fixed batch (the tutorial's job),
    on the CPU over gloo, printing only its summary."""
    return ["--batch-size", str(batch), "--d-in", str(d_in), "--hidden",
            ",".join(map(str, hidden)), "--d-out", str(d_out), "--device", "cpu",
            "--log-every", "0", "--quiet"]


def _run(argv: list[str], steps: int, port: int) -> float | None:
    """One ``python -m distnn.train ARGV --steps STEPS`` in this rank, its group met at
    ``port``; its ``wall_s`` (on the rank that prints the summary; None on the others)."""
    from distnn.train import main

    # A port of its own: the previous run's store may still be closing on the last one.
    os.environ["MASTER_PORT"] = str(port)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--steps", str(steps)])
    if code != 0:
        raise RuntimeError(f"python -m distnn.train {' '.join(argv)} --steps {steps} exited "
                           f"with {code}")
    found = WALL_S.search(out.getvalue())
    return float(found.group(1)) if found else None


def _worker(rank: int, world: int, port: int, plan: dict, out_path: str) -> None:
    join(rank, world, port)
    ports = iter(plan["ports"])
    runs = [(name, argv) for name, argv in plan["runs"]]
    for _, argv in runs:  # untimed: the first run of each pays for imports and allocations
        _run(argv, plan["warmup"], next(ports))
    samples = []
    for repeat in range(plan["rounds"]):
        shift = repeat % len(runs)
        for name, argv in runs[shift:] + runs[:shift]:
            short, long = plan["steps"][name]
            walls = {}
            for steps in ((short, long) if repeat % 2 == 0 else (long, short)):
                walls[steps] = _run(argv, steps, next(ports))
            if rank == 0:
                ms = (walls[long] - walls[short]) / (long - short) * 1e3
                samples.append({"name": name, "world_size": world, "round": repeat,
                                "short_steps": short, "long_steps": long,
                                "short_wall_s": walls[short], "long_wall_s": walls[long],
                                "ms_per_step": ms, "load_average": os.getloadavg()[0]})
                if plan["progress"]:
                    print(f"  {name}, {world} rank{'s' if world > 1 else ''}, round "
                          f"{repeat + 1}: {ms:.3f} ms/step", file=sys.stderr, flush=True)
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as file:
            json.dump(samples, file)


def measure(runs: Sequence[tuple[str, list[str]]], *, world: int,
            steps: dict[str, tuple[int, int]], rounds: int = 3, warmup: int = 20,
            progress: bool = True) -> list[dict]:
    """Samples of distnn's marginal step time on ``world`` spawned ranks: for each
    ``(name, argv)`` of ``runs`` (``python -m distnn.train``'s flags, without ``--steps``),
    ``steps[name]`` = (short, long) step counts; one sample per run per round:
    ``{"name", "world_size", "round", "ms_per_step", ...}``."""
    for name, _ in runs:
        short, long = steps[name]
        if not 0 < short < long:
            raise ValueError(f"steps of {name}: need 0 < short < long, got {short}, {long}")
    plan = {"runs": [list(run) for run in runs], "steps": steps, "rounds": rounds,
            "warmup": warmup, "progress": progress,
            "ports": free_ports(len(runs) * (1 + 2 * rounds))}
    with tempfile.TemporaryDirectory(prefix="distnn-steptime-") as scratch:
        path = os.path.join(scratch, "samples.json")
        spawn(_worker, world, plan, path)
        with open(path, encoding="utf-8") as file:
            return json.load(file)


def medians(samples: Sequence[dict]) -> dict[tuple[str, int], dict]:
    """Per (name, world size): the median ms/step of its rounds, their range and count."""
    groups: dict[tuple[str, int], list[float]] = {}
    for s in samples:
        groups.setdefault((s["name"], s["world_size"]), []).append(s["ms_per_step"])
    return {key: {"ms_per_step": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                  "rounds": len(v)} for key, v in groups.items()}


def steps_for(predicted_ms: float, *, seconds: float = 1.5, least: int = 50,
              most: int = 2500) -> tuple[int, int]:
    """(short, long) step counts whose difference takes about ``seconds`` at
    ``predicted_ms`` a step: long in [``least``, ``most``], short a fifth of it."""
    long = int(min(most, max(least, seconds * 1e3 / max(predicted_ms, 1e-3))))
    return max(1, long // 5), long
