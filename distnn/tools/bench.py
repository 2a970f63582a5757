"""``python -m distnn.tools.bench``: distnn against the reference loop, DDP and Accelerate,
side by side.

Every variant trains the same model on the same data with the same sum-loss SGD, in the
same run, in alternating order over ``--repeats`` rounds (each round runs every workload,
starting one variant later than the round before; ``--budget-s`` can end the rounds
early); the table gives medians. Before a variant's times count, its global losses are
checked against the reference's. World sizes above 1 run as real gloo process groups
(spawned processes); on a GPU the run is world 1 over NCCL. Writes ``bench.md`` (the
table), ``bench.json`` (every sample) and ``bench.png``. A variant that fails gets a row
with its error instead of times, the others still run, and the exit code is 1.

How each is timed: the loops written here run ``--warmup`` steps, then ``--steps`` timed
steps ending in a device synchronisation. distnn runs its real trainer for ``--warmup``
steps, untimed, then for ``--steps`` steps, timed by the trainer's own ``wall_s`` (the step
loop and its final flush; start-up, compiling and capturing come before it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from distnn.distributed.runtime import setup
from distnn.settings import Settings
from distnn.step.precision import tf32_matmuls
from distnn.step.wgrad import AUTOGRAD, LAYOUTS
from distnn.tools.bench_loops import ddp_loop, end_worker, graph_floor_loop, reference_loop
from distnn.tools.bench_rates import (
    fusion_leads,
    matmul_tflops,
    step_matmul_tflops,
    weight_grad_layouts,
)
from distnn.tools.spawn import join, spawn
from distnn.tools.workload import Workload
from distnn.trainer import Trainer

REFERENCE = Workload("reference", 64, 1000, (100,), 10, 1e-4)
# Compute-bound: big matmuls, large enough to keep an H100 or H200 busy; the CPU one is
# smaller so that a step takes a fraction of a second on a few cores.
COMPUTE_GPU = Workload("compute", 8192, 4096, (4096,), 4096, 1e-9)
COMPUTE_CPU = Workload("compute", 1024, 1024, (1024,), 1024, 1e-7)
# Communication-heavy: 33.6M parameters (134 MB of gradients) for a batch of 64, to show
# what overlapping bucketed all-reduces with backward buys.
LARGE = Workload("large", 64, 4096, (4096,), 4096, 1e-6)
# The bucket size sweep: 7 layers of 2048 x 2048 (16 MiB of gradients each, 29.4M
# parameters), so that buckets of a few layers each are possible.
DEEP = Workload("deep", 64, 2048, (2048,) * 6, 2048, 1e-7)
BUCKET_SWEEP_MB = (8, 25, 40, 64)  # 7, 4, 3 and 2 buckets of the deep workload


def distnn_trainer(work: Workload, steps: int, warmup: int, rt, environ: dict[str, str],
                   **config_changes: Any) -> tuple[float, list[float]]:
    """distnn's own trainer: a ``warmup``-step run, untimed, then a timed ``steps``-step run,
    with the environment variables ``environ`` (DISTNN_*) and no others.

    The time is the trainer's own ``wall_s``: its step loop and final flush, without the
    start-up, compiling or capturing before it.
    """
    for count in (max(warmup, 1), steps):
        trainer = Trainer(work.config(steps=count, **config_changes), rt,
                          settings=Settings.from_environ(environ))
        with contextlib.redirect_stdout(io.StringIO()):  # its summary line
            result = trainer.train()
        if result.compiled is False:  # a --compile row must not time the eager step
            raise RuntimeError("--compile fell back to the eager step (its warning says why)")
    kept = result.losses  # the newest steps' losses (all of a short run)
    return result.wall_s / steps * 1e3, [None] * (steps - len(kept)) + kept


def variants_for(work: Workload, world: int, device: torch.device,
              chosen: list[str] | None = None) -> list[str]:
    """The variants run for ``work``: those that apply to it, world and device, or ``chosen``
    (``--variant``) as given, less the one-process reference loops at world sizes above 1."""
    if chosen:
        return [name for name in chosen if world == 1 or not name.startswith("reference loop")]
    if work.name == "large":
        return ["DDP", "distnn eager, one bucket", "distnn eager"]
    if work.name == "deep":
        return ["DDP", "distnn eager, one bucket",
                *(f"distnn eager, {mb} MiB buckets" for mb in BUCKET_SWEEP_MB)]
    names = []
    if world == 1:
        names += ["reference loop", "reference loop, no per-step sync"]
    names += ["DDP", "Accelerate", "distnn eager", "distnn --compile"]
    if device.type == "cuda" and world == 1:  # gloo (several ranks on one GPU) cannot be captured
        names += [*FLOORS, "distnn --cuda-graph", "distnn --cuda-graph --compile"]
    if work.name == "compute" and device.type == "cuda":
        # On a CPU without bf16 matrix units, bf16 matmuls run hundreds of times slower than
        # fp32, and TF32 does not exist.
        names += ["distnn eager, tf32", "distnn eager, bf16", "distnn --compile, tf32",
                  "distnn --compile, bf16", "distnn --cuda-graph --compile, tf32",
                  "distnn --cuda-graph --compile, bf16", BF16_AS_WRITTEN, WEIGHT_GRAD_VARIANT]
    return names


def _run_variant(name: str, work: Workload, steps: int, warmup: int, rt) -> tuple[float, list]:
    device = rt.device
    if name == "reference loop":
        return reference_loop(work, steps, warmup, device, per_step_sync=True)
    if name == "reference loop, no per-step sync":
        return reference_loop(work, steps, warmup, device, per_step_sync=False)
    if name in ("DDP", "Accelerate"):
        return ddp_loop(work, steps, warmup, device, use_accelerate=name == "Accelerate")
    if name in FLOORS:
        return graph_floor_loop(work, steps, warmup, device, compiled=name == FLOORS[1])
    if name == BF16_AS_WRITTEN:
        return distnn_trainer(work, steps, warmup, rt, {"DISTNN_BF16_FUSIONS": "0"},
                              precision="bf16", compile=True)
    if name in WEIGHT_GRAD_VARIANTS:
        return distnn_trainer(work, steps, warmup, rt,
                              {"DISTNN_WEIGHT_GRAD": WEIGHT_GRAD_VARIANTS[name]},
                              precision="tf32", compile=True)
    return distnn_trainer(work, steps, warmup, rt, {}, **DISTNN_VARIANTS[name])


def measure(name: str, work: Workload, steps: int, warmup: int, rt) -> dict[str, Any]:
    """One sample of variant ``name``: ``ms_per_step`` and ``losses``, or the ``error`` it
    raised, in one line. A failing variant (say, a capture the GPU refuses) costs its own row,
    not the rest of the run: on a lent GPU, one run has to bring back every number it can."""
    try:
        ms, losses = _run_variant(name, work, steps, warmup, rt)
    except Exception as error:  # noqa: BLE001 - reported in the table and the exit code
        text = " ".join(str(error).split()) or type(error).__name__
        return {"error": f"{type(error).__name__}: {text}"[:300]}
    return {"ms_per_step": ms, "losses": losses}


# The distnn variants: their TrainConfig changes.
DISTNN_VARIANTS: dict[str, dict[str, Any]] = {
    "distnn eager": {},
    "distnn --compile": {"compile": True},
    "distnn --cuda-graph": {"cuda_graph": True},
    "distnn --cuda-graph --compile": {"cuda_graph": True, "compile": True},
    "distnn eager, one bucket": {"bucket_mb": 1e6},
    **{f"distnn eager, {mb} MiB buckets": {"bucket_mb": float(mb)} for mb in BUCKET_SWEEP_MB},
    "distnn eager, tf32": {"precision": "tf32"},
    "distnn eager, bf16": {"precision": "bf16"},
    # The matmuls are the same; the whole step compiled fuses the elementwise work around
    # them (bias, ReLU, the loss, their gradients, the update; in bf16 the weights' casts):
    # these show how much of the gap to the matmul rate that work is.
    "distnn --compile, tf32": {"precision": "tf32", "compile": True},
    "distnn --compile, bf16": {"precision": "bf16", "compile": True},
    # ... and captured: no launch gaps between those kernels
    "distnn --cuda-graph --compile, tf32": {"precision": "tf32", "compile": True,
                                            "cuda_graph": True},
    "distnn --cuda-graph --compile, bf16": {"precision": "bf16", "compile": True,
                                            "cuda_graph": True},
}


# The compiled TF32 step with the Linear layers' weight gradients in a layout named
# (DISTNN_WEIGHT_GRAD, distnn/step/wgrad.py). On a GPU that step's default is the forward's layout
# (both operands copied: wgrad.default); beside it the GPU runs autograd's, which that
# default replaced; the others run when named (--variant).
WEIGHT_GRAD_VARIANTS = {f"distnn --compile, tf32, dW as {layout}": layout for layout in LAYOUTS}
WEIGHT_GRAD_VARIANT = f"distnn --compile, tf32, dW as {AUTOGRAD}"
# The compiled bf16 step without the fusions of distnn/step/fusions.py (DISTNN_BF16_FUSIONS=0):
# the loss as F.mse_loss writes it, each ReLU a pass after its matmul.
BF16_AS_WRITTEN = "distnn --compile, bf16, as written"
# The floors (bench_loops.graph_floor_loop): the reference loop captured by hand, with its
# forward and loss as written, then compiled. "vs floors" in the table is ms / their ms.
FLOORS = ("floor: hand-made graph", "floor: hand-made graph, compiled forward")
VARIANTS = ["reference loop", "reference loop, no per-step sync", "DDP", "Accelerate",
            *FLOORS, *DISTNN_VARIANTS, BF16_AS_WRITTEN, *WEIGHT_GRAD_VARIANTS]


def _worker(rank: int, world: int, port: int, plan: dict, out_path: str) -> None:
    join(rank, world, port, threads=plan["threads"] or None)  # 0: a GPU's, left as is
    samples = []
    works = [Workload(**w) for w in plan["workloads"]]
    with setup(device=plan["device"], timeout_s=600) as rt:
        started = round_started = time.perf_counter()
        for repeat in range(plan["repeats"]):
            if repeat and _out_of_time(started, round_started, plan["budget_s"]):
                if rank == 0:
                    print(f"world size {world}: --budget-s {plan['budget_s']:g} reached, so "
                          f"{repeat} of {plan['repeats']} rounds", file=sys.stderr, flush=True)
                break
            round_started = time.perf_counter()
            for work in works:
                names = variants_for(work, world, rt.device, plan["variants"])
                # Each round starts one variant later: a variant that leaves the process
                # slower for a while (DDP and Accelerate can) does not always slow the same
                # neighbour.
                shift = repeat % len(names)
                for name in names[shift:] + names[:shift]:
                    sample = {"workload": work.name, "world_size": world, "variant": name,
                              "repeat": repeat}
                    sample.update(measure(name, work, plan["steps"][work.name], plan["warmup"],
                                          rt))
                    samples.append(sample)
                    if rank == 0:  # as it goes: a run cut off by a time limit still tells
                        print(_progress(sample), file=sys.stderr, flush=True)
                    dist.barrier()
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as file:
                json.dump(samples, file)
        end_worker()  # after DDP: the teardown could abort the process (bench_loops)


def _progress(sample: dict) -> str:
    """One line per sample, before its losses are checked."""
    what = (f"failed: {sample['error']}" if "error" in sample
            else f"{sample['ms_per_step']:.3f} ms/step")
    return (f"world size {sample['world_size']}, round {sample['repeat'] + 1}, "
            f"{sample['workload']}, {sample['variant']}: {what}")


def _out_of_time(started: float, round_started: float, budget_s: float | None) -> bool:
    """Whether another round, as long as the last one, would end past ``budget_s`` seconds.

    Rank 0's clock decides for every rank, so all of them run the same rounds.
    """
    now = time.perf_counter()
    verdict = [budget_s is not None and now - started + (now - round_started) > budget_s]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def _check_losses(samples: list[dict], reference: dict[str, list[float]]) -> list[str]:
    """Marks samples whose losses stray from the reference loop's; returns the problems."""
    problems = []
    for sample in samples:
        if "error" in sample:
            continue
        want = reference[sample["workload"]]
        got = sample.pop("losses")
        # the first 20 steps both kept (a long distnn run keeps only its newest losses)
        pairs = [(g, w) for g, w in zip(got, want, strict=False) if g is not None][:20]
        tolerance = 0.05 if "bf16" in sample["variant"] or "tf32" in sample["variant"] else 1e-4
        worst = max(abs(g - w) / max(abs(w), 1e-12) for g, w in pairs)
        sample["loss_check_rel"] = worst
        sample["loss_ok"] = worst <= tolerance
        if not sample["loss_ok"]:
            problems.append(f"{sample['variant']} (world {sample['world_size']}, "
                            f"{sample['workload']}): losses differ by {worst:.3g}")
    return problems


def summarise(samples: list[dict], workloads: dict[str, Workload], matmul: dict[str, float],
              step_matmul: dict[str, float]) -> list[dict]:
    """One row per (workload, world size, variant): medians of the samples that passed."""
    rows = []
    keys = dict.fromkeys((s["workload"], s["world_size"], s["variant"]) for s in samples)
    order = {"reference": 0, "compute": 1, "large": 2, "deep": 3}
    baseline = {}
    for workload, world, variant in sorted(keys, key=lambda k: (order[k[0]], k[1])):
        mine = [s for s in samples if (s["workload"], s["world_size"], s["variant"]) == (
            workload, world, variant)]
        times = [s["ms_per_step"] for s in mine if s.get("loss_ok")]
        errors = [s["error"] for s in mine if "error" in s]
        if errors:  # the run failed: its row says how, first time, whatever else it measured
            rows.append({"workload": workload, "world_size": world, "variant": variant,
                         "error": errors[0], "failed_runs": len(errors), "runs": len(mine)})
            continue
        if not times:
            continue
        work = workloads[workload]
        ms = statistics.median(times)
        if variant == "reference loop" and world == 1:
            baseline[workload] = ms
        row = {"workload": workload, "world_size": world, "variant": variant,
               "ms_per_step": ms, "min_ms": min(times), "max_ms": max(times), "runs": len(times),
               "samples_per_s": work.batch_size / ms * 1e3}
        if workload != "reference":
            tflops = work.flop_per_step / (ms / 1e3) / 1e12
            precision = "bf16" if "bf16" in variant else "tf32" if "tf32" in variant else "fp32"
            rate, floor = matmul.get(precision), step_matmul.get(precision)
            row["tflops"] = tflops
            row["matmul_pct"] = 100 * tflops / rate if rate else None
            row["step_matmul_pct"] = 100 * tflops / floor if floor else None
        rows.append(row)
    floors = {(r["workload"], r["variant"]): r["ms_per_step"] for r in rows
              if r["variant"] in FLOORS and "ms_per_step" in r}
    for row in rows:
        base = baseline.get(row["workload"])
        if "ms_per_step" in row:
            row["speedup_vs_reference"] = base / row["ms_per_step"] if base else None
            row["vs_floors"] = [row["ms_per_step"] / floors[row["workload"], name]
                                if (row["workload"], name) in floors else None
                                for name in FLOORS]
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| workload | world | variant | ms/step (median) | min-max | samples/s "
             "| vs reference loop | vs floors (graph; compiled) | TFLOP/s | % of matmul "
             "| % of its matmuls |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['world_size']} | {r['variant']} | failed "
                         f"({r['failed_runs']} of {r['runs']} runs): {r['error']} "
                         "| | | | | | | |")
            continue
        speedup = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else ""
        tflops = f"{r['tflops']:.3f}" if "tflops" in r else ""
        pct = f"{r['matmul_pct']:.0f}%" if r.get("matmul_pct") else ""
        own = f"{r['step_matmul_pct']:.0f}%" if r.get("step_matmul_pct") else ""
        floors = "; ".join(f"{v:.2f}x" if v else "-" for v in r["vs_floors"])
        floors = "" if set(floors) <= set("-; ") else floors
        lines.append(f"| {r['workload']} | {r['world_size']} | {r['variant']} "
                     f"| {r['ms_per_step']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} "
                     f"| {r['samples_per_s']:.0f} | {speedup} | {floors} | {tflops} | {pct} "
                     f"| {own} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    figure, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5),
                                squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        mine = [r for r in rows if r["workload"] == workload and "ms_per_step" in r]
        labels = [f"{r['variant']}\n(world {r['world_size']})" for r in mine]
        ax.barh(labels, [r["ms_per_step"] for r in mine],
                color=["tab:blue" if "distnn" in r["variant"] else "tab:gray" for r in mine])
        ax.set_xlabel("ms per step (median, lower is better)")
        ax.set_title(f"{workload} workload")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distnn.tools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default=None,
                        help="world sizes, comma-separated (default: 1,2,4 on the CPU, 1 on a GPU)")
    parser.add_argument("--workloads", default="reference,compute",
                        help="reference, compute, large (bucketed overlap) and/or deep (bucket "
                             "sizes), comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200, help="timed steps, reference workload")
    parser.add_argument("--compute-steps", type=int, default=10,
                        help="timed steps, compute, large and deep workloads")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per rank (default: the cores shared among the ranks)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds per world size: no round starts that would end past it "
                             "(judged by the last round), so fewer than --repeats may run")
    parser.add_argument("--variant", action="append", choices=VARIANTS, metavar="NAME",
                        help="run only this variant (repeatable), even where it does not "
                             f"apply; one of: {'; '.join(VARIANTS)}")
    parser.add_argument("--out", default="bench-results", help="folder for the three files")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    worlds = [int(w) for w in (args.worlds or ("1" if cuda else "1,2,4")).split(",")]
    known = {"reference": REFERENCE, "compute": COMPUTE_GPU if cuda else COMPUTE_CPU,
             "large": LARGE, "deep": DEEP}
    workloads = {name: known[name] for name in args.workloads.split(",")}
    os.makedirs(args.out, exist_ok=True)

    # For the compute workload: the plain square matmul rate, and the rate of the step's own
    # matmuls (its shapes and layouts), and its first weight gradient's layouts, per precision;
    # on a GPU, the bf16 step's elementwise work two ways each (bench_rates.fusion_leads).
    matmul, step_matmul, layouts, leads = {}, {}, {}, {}
    if "compute" in workloads:
        size = 8192 if cuda else 1024
        dev = torch.device(device)
        precisions = {"fp32": torch.float32}
        if cuda:
            precisions.update({"tf32": torch.float32, "bf16": torch.bfloat16})
        for precision, dtype in precisions.items():
            with tf32_matmuls(precision == "tf32"):
                matmul[precision] = matmul_tflops(dev, size, dtype)
                step_matmul[precision] = step_matmul_tflops(workloads["compute"], dev, dtype)
                layouts[precision] = weight_grad_layouts(workloads["compute"], dev, dtype)
        if cuda:
            try:
                leads = fusion_leads(workloads["compute"], dev, torch.bfloat16)
            except Exception as error:  # noqa: BLE001 - a probe: the variants still run
                print(f"distnn: warning: the fusion leads failed: {error}", file=sys.stderr)

    steps = {"reference": args.steps, "compute": args.compute_steps, "large": args.compute_steps,
             "deep": args.compute_steps}

    def threads(world: int) -> int:
        return args.threads or max(1, (os.cpu_count() or 1) // world)

    samples = []
    for world in worlds:
        plan = {"device": device, "repeats": args.repeats, "warmup": args.warmup,
                "variants": args.variant, "budget_s": args.budget_s,
                "workloads": [w.__dict__ for w in workloads.values()],
                "steps": steps,
                "threads": 0 if cuda else threads(world)}
        out_path = os.path.join(args.out, f".samples-{world}.json")
        print(f"world size {world}: running...", file=sys.stderr, flush=True)
        spawn(_worker, world, plan, out_path)
        with open(out_path, encoding="utf-8") as file:
            samples += json.load(file)
        os.remove(out_path)

    reference = {}
    for work in workloads:
        _, reference[work] = reference_loop(workloads[work], 20, 0, torch.device(device),
                                            per_step_sync=True)
    problems = _check_losses(samples, reference)
    rows = summarise(samples, workloads, matmul, step_matmul)
    machine = (f"{torch.cuda.get_device_name()}" if cuda else
               f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
               "threads per rank: " + ", ".join(f"{threads(w)} at world {w}" for w in worlds)
               + ")")
    done = {w: 1 + max(s["repeat"] for s in samples if s["world_size"] == w) for w in worlds}
    rounds = (str(done[worlds[0]]) if len(set(done.values())) == 1
              else ", ".join(f"{count} at world {w}" for w, count in done.items()))
    header = (f"Machine: {machine}; torch {torch.__version__}; rounds: {rounds}; "
              "timed steps: " + ", ".join(f"{name} {steps[name]}" for name in workloads) + "."
              + (" Matmul rate, same run (square; the step's own matmuls): "
                 + ", ".join(f"{k} {v:.3f}; {step_matmul[k]:.3f} TFLOP/s"
                             for k, v in matmul.items()) + "."
                 if matmul else "")
              + (" The first layer's weight gradient by layout: "
                 + "; ".join(f"{k}: " + ", ".join(f"{name} {rate:.3f}"
                                                  for name, rate in ways.items())
                             for k, ways in layouts.items()) + " TFLOP/s."
                 if layouts else "")
              + (" The bf16 step's elementwise work two ways each: "
                 + ", ".join(f"{name} {ms:.3f}" for name, ms in leads.items()) + " ms."
                 if leads else ""))
    table = markdown(rows, header)
    with open(os.path.join(args.out, "bench.md"), "w", encoding="utf-8") as file:
        file.write(table)
    with open(os.path.join(args.out, "bench.json"), "w", encoding="utf-8") as file:
        json.dump({"machine": machine, "torch": torch.__version__, "matmul_tflops": matmul,
                   "step_matmul_tflops": step_matmul, "weight_grad_layout_tflops": layouts,
                   "fusion_lead_ms": leads,
                   "workloads": {k: w.__dict__ for k, w in workloads.items()},
                   "rows": rows, "samples": samples}, file, indent=1)
    try:
        plot(rows, os.path.join(args.out, "bench.png"))
    except ImportError:
        print("distnn: note: no matplotlib, so no bench.png", file=sys.stderr)
    print(table)
    for problem in problems:
        print(f"distnn: warning: left out: {problem}", file=sys.stderr)
    failed = [r for r in rows if "error" in r]
    for row in failed:
        print(f"distnn: error: {row['variant']} (world {row['world_size']}, {row['workload']}) "
              f"failed: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
