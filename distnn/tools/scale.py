"""How far it scales: predicted step time per world size from a calibrated cost model.

    python -m distnn.scale calibrate --out FILE [--worlds 2,4,8] [--overhead-worlds 1,2,4,8]
    python -m distnn.scale [--batch-size B --d-in D --hidden H,... --d-out O | --params N]
        [--compute-ms X | --measure] --cluster PRESET|FILE --worlds 1,2,4,...
        [--scaling strong|weak] [--bucket-mb M] [--json PATH] [--plot PATH]
    python -m distnn.scale measure [--batch-size B --d-in D --hidden H,... --d-out O]
        --worlds 1,2,4 [--steps 500,2500] [--against PREDICTION.json] [--json PATH]

``calibrate`` measures on this machine everything a prediction takes from a cluster file (the
collectives, and distnn's per-step overhead on held-out models); ``measure`` times distnn's
own step, to check a prediction the way a user would.

The model and its sources: docs/scaling.md; the formulas: distnn/tools/costmodel.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from distnn.errors import UsageError
from distnn.resilience.outputs import check_writable
from distnn.tools import calibrate, costmodel, steptime
from distnn.tools.calibrate import measure_compute

PRESET_NAMES = ("nvlink-ib400", "horovod-roce25", "this-machine-gloo")


def _ints(text: str, flag: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of integers; "
                         f"allowed: integers >= {minimum}, e.g. 1,2,4") from None
    if not values or min(values) < minimum:
        raise UsageError(f"{flag} {text!r} has a value below {minimum}; "
                         f"allowed: integers >= {minimum}")
    return values


def _positive(value: float | None, flag: str, *, zero_ok: bool = False) -> None:
    if value is not None and (not math.isfinite(value) or value < 0
                              or (value == 0 and not zero_ok)):
        raise UsageError(f"{flag} {value:g} is not allowed; allowed: a finite number "
                         f"{'>= 0' if zero_ok else '> 0'}")


def load_cluster(spec: str) -> costmodel.Cluster:
    """A preset by name, or a cluster description JSON file (as ``calibrate`` writes)."""
    if spec == "this-machine-gloo":
        spec_path = this_machine_file()
        if spec_path is None:
            raise UsageError("--cluster this-machine-gloo: docs/results/scale-calibration-cpu.json "
                             "not found; allowed: run from the repository, or give a FILE from "
                             "`python -m distnn.scale calibrate`")
        spec = spec_path
    elif spec in costmodel.PRESETS:
        return costmodel.PRESETS[spec]
    elif not os.path.exists(spec):
        raise UsageError(f"--cluster {spec!r} is neither a preset nor a file; allowed: "
                         f"{', '.join(PRESET_NAMES)}, or a JSON file from `calibrate`")
    try:
        with open(spec, encoding="utf-8") as file:
            data = json.load(file)
        return costmodel.Cluster.from_json(data.get("cluster", data))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"--cluster {spec!r} could not be read ({error}); allowed: "
                         f"{', '.join(PRESET_NAMES)}, or a JSON file from `calibrate`") from None


def this_machine_file() -> str | None:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.join(repo, "docs", "results", "scale-calibration-cpu.json")
    return here if os.path.exists(here) else None


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| world | batch/rank | compute ms | exposed comm ms | overhead ms | step ms "
             "| samples/s | speedup | efficiency |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['per_rank_batch']} | {r['compute_ms']:.4g} "
                     f"| {r['comm_ms']:.4g} | {r['overhead_ms']:.4g} | {r['step_ms']:.4g} "
                     f"| {r['samples_per_s']:.4g} "
                     f"| {r['speedup']:.3g} | {100 * r['efficiency']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [r["world_size"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(worlds, [r["step_ms"] for r in rows], "o-", label="step")
    left.plot(worlds, [r["compute_ms"] for r in rows], "s--", label="compute")
    left.plot(worlds, [max(r["comm_ms"], 1e-6) for r in rows], "^:", label="exposed comm")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("world size")
    left.set_ylabel("ms per step")
    left.legend()
    right.plot(worlds, [100 * r["efficiency"] for r in rows], "o-")
    right.set_xscale("log", base=2)
    right.set_ylim(0, 105)
    right.set_xlabel("world size")
    right.set_ylabel("scaling efficiency, %")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _kb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def _calibrate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distnn.scale calibrate",
        description="Measures here everything the prediction takes from a cluster file: gloo's "
                    "all-reduce and distnn's sum through rank 0 at --worlds, and distnn's own "
                    "step (python -m distnn.train) on held-out models at --overhead-worlds, "
                    "whose time beyond the rest of the prediction is the per-step overhead.")
    parser.add_argument("--out", required=True, help="cluster description JSON to write")
    parser.add_argument("--worlds", default="2,4,8", help="world sizes of the collectives")
    parser.add_argument("--sizes", default=",".join(str(s) for s in calibrate.DEFAULT_SIZES),
                        help="buffer sizes in bytes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="samples per collective")
    parser.add_argument("--overhead-worlds", default=None,
                        help="world sizes of the per-step overhead (default: 1 and --worlds); "
                             "'none' measures none (the prediction then has no overhead)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of distnn's step per held-out model and world size")
    parser.add_argument("--run-seconds", type=float, default=1.0,
                        help="about how long the longer of each pair of timed runs takes")
    parser.add_argument("--name", default="this-machine-gloo")
    args = parser.parse_args(argv)
    worlds = _ints(args.worlds, "--worlds", 2)
    sizes = _ints(args.sizes, "--sizes", 4)
    if args.overhead_worlds is None:
        overhead_worlds = sorted({1, *worlds})
    elif args.overhead_worlds.strip().lower() == "none":
        overhead_worlds = []
    else:
        overhead_worlds = _ints(args.overhead_worlds, "--overhead-worlds", 1)
    if missing := sorted(set(overhead_worlds) - {1, *worlds}):
        raise UsageError(f"--overhead-worlds {args.overhead_worlds}: no collective is measured "
                         f"at {', '.join(map(str, missing))}; allowed: 1 and --worlds "
                         f"({args.worlds})")
    for flag, value in (("--repeats", args.repeats), ("--rounds", args.rounds)):
        if value < 1:
            raise UsageError(f"{flag} {value} is not allowed; allowed: integers >= 1")
    _positive(args.run_seconds, "--run-seconds")
    check_writable(args.out, "--out", in_place=True)  # before the minutes of measuring
    load = os.getloadavg()[0]  # other work on these cores slows all that is measured
    started = time.perf_counter()
    samples = calibrate.measure(worlds, sizes, repeats=args.repeats,
                                out_dir=os.path.dirname(os.path.abspath(args.out)))
    collectives_s = time.perf_counter() - started
    rows = calibrate.medians(samples)
    cluster = calibrate.cluster_description(rows, name=args.name, cores=os.cpu_count())
    _note(f"calibrate: collectives measured ({collectives_s:.1f} s)")
    overhead = None
    if overhead_worlds:
        overhead = calibrate.measure_overhead(cluster, overhead_worlds, rounds=args.rounds,
                                              seconds_per_run=args.run_seconds, log=_note)
        cluster["step_overhead_fit"] = overhead["step_overhead_fit"]
        cluster["source"] += ("; step_overhead_fit: distnn's step on the held-out models "
                              + ", ".join(m["name"] for m in overhead["models"])
                              + " less the prediction without it")
    total_s = time.perf_counter() - started
    with open(args.out, "w", encoding="utf-8") as file:
        json.dump({"cluster": cluster, "argv": argv, "load_average_at_start": load,
                   "seconds": {"collectives": collectives_s,
                               "overhead": overhead["seconds"] if overhead else 0.0,
                               "total": total_s},
                   "medians": rows, "samples": samples, "overhead": overhead}, file, indent=1)
    print(calibration_report(cluster, rows, overhead, repeats=args.repeats, load=load,
                             collectives_s=collectives_s, total_s=total_s, out=args.out), end="")
    return 0


def calibration_report(cluster: dict, rows: list[dict], overhead: dict | None, *, repeats: int,
                       load: float, collectives_s: float, total_s: float, out: str) -> str:
    """What ``calibrate`` measured, how long each part took, and what it found."""
    ring = sorted({r["world_size"] for r in rows if r["kind"] == "allreduce"})
    root = sorted({r["world_size"] for r in rows if r["kind"] == "via_root"})
    sizes = sorted({r["bytes"] for r in rows})
    lines = [f"calibrate: measured here in {total_s:.0f} s ({os.cpu_count()} cores, load average "
             f"{load:.2f} at the start"
             + ("; other work was running, and it slows all that is measured" if load >= 0.5
                else "") + "):",
             f"- gloo all-reduce at {', '.join(map(str, ring))} ranks, {len(sizes)} sizes "
             f"{_kb(sizes[0])} to {_kb(sizes[-1])}"
             + (f", and distnn's sum through rank 0 at {', '.join(map(str, root))} ranks"
                if root else "")
             + f", {repeats} samples each: {collectives_s:.0f} s. Ring fit alpha "
             f"{cluster['intra_alpha_s'] * 1e6:.1f} us, beta {cluster['intra_beta_s'] * 1e9:.3f} "
             f"ns/B ({1e-9 / cluster['intra_beta_s']:.2f} GB/s)."]
    if overhead is None:
        lines.append("- no per-step overhead (--overhead-worlds none): predictions from this "
                     "file leave out distnn's own per-step work and waits")
    else:
        names = ", ".join(m["name"] for m in overhead["models"])
        worlds = sorted(int(p) for p in overhead["points"])
        lines.append(f"- one rank's compute (one thread, as --measure times it) and distnn's "
                     f"own step (python -m distnn.train, the marginal time per step) on the "
                     f"held-out models {names}, batch {overhead['models'][0]['batch']}, at "
                     f"{', '.join(map(str, worlds))} rank(s): {overhead['seconds']:.0f} s.")
        lines.append("- per-step overhead, distnn's step less the prediction without it, "
                     "fitted as a + b n (n: gradient bytes):")
        for p in worlds:
            a, b = cluster["step_overhead_fit"][str(p)]
            at = "; ".join(f"{_kb(n)} {t * 1e3:+.3f} ms" for n, t in overhead["points"][str(p)])
            lines.append(f"  {p} rank{'s' if p > 1 else ''}: a = {a * 1e3:.3f} ms, "
                         f"b = {b * 1e9:.3f} ns/B (measured: {at})")
    lines.append(f"wrote {out}")
    return "\n".join(lines) + "\n"


def _measure(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distnn.scale measure",
        description="Measures distnn's step here: python -m distnn.train with the MLP flags on "
                    "each world size of spawned CPU ranks (one thread each, gloo, as torchrun "
                    "starts them), the marginal time per step between a run of the first and "
                    "of the second --steps (start-up and warm-up cancel), median of --rounds. "
                    "With --against, beside a prediction's --json rows.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--d-in", type=int, default=1000)
    parser.add_argument("--hidden", default="100", help="hidden widths, comma-separated")
    parser.add_argument("--d-out", type=int, default=10)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--steps", default="300,1500", help="SHORT,LONG step counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", default=None,
                        help="a prediction's --json file: its step_ms beside the measurement")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--d-in", args.d_in),
                        ("--d-out", args.d_out)):
        _positive(value, flag)
    hidden = _ints(args.hidden, "--hidden", 1)
    worlds = _ints(args.worlds, "--worlds", 1)
    steps = _ints(args.steps, "--steps", 1)
    if len(steps) != 2 or steps[0] >= steps[1]:
        raise UsageError(f"--steps {args.steps!r} is not SHORT,LONG; allowed: two step counts, "
                         "the first smaller, e.g. 500,2500")
    if args.rounds < 1:
        raise UsageError(f"--rounds {args.rounds} is not allowed; allowed: integers >= 1")
    predicted = {}
    if args.against:
        try:
            with open(args.against, encoding="utf-8") as file:
                predicted = {int(r["world_size"]): r for r in json.load(file)}
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise UsageError(f"--against {args.against!r} could not be read ({error}); allowed: "
                             "the --json file of `python -m distnn.scale`") from None
    flags = steptime.mlp_flags(batch=args.batch_size, d_in=args.d_in, hidden=hidden,
                               d_out=args.d_out)
    what = f"MLP {args.d_in}-{'-'.join(map(str, hidden))}-{args.d_out}, batch {args.batch_size}"
    samples = []
    started = time.perf_counter()
    for p in worlds:
        _note(f"measure: {what} on {p} rank{'s' if p > 1 else ''}...")
        samples += steptime.measure([(what, flags)], world=p, steps={what: tuple(steps)},
                                    rounds=args.rounds)
    medians = steptime.medians(samples)
    rows = []
    for p in worlds:
        row = {"world_size": p, **medians[what, p]}
        if p in predicted:
            row["predicted_step_ms"] = predicted[p]["step_ms"]
            row["error"] = predicted[p]["step_ms"] / row["ms_per_step"] - 1
        rows.append(row)
    loads = [s["load_average"] for s in samples]
    lines = [f"{what}: python -m distnn.train {' '.join(flags)}, ms per step between "
             f"{steps[0]} and {steps[1]} steps, median of {args.rounds} rounds "
             f"({time.perf_counter() - started:.0f} s; load average {min(loads):.2f} to "
             f"{max(loads):.2f}, these ranks included)", "",
             "| world | measured ms/step | range | predicted ms/step | error |",
             "|---|---|---|---|---|"]
    for row in rows:
        guess = (f"{row['predicted_step_ms']:.3f} | {100 * row['error']:+.0f}%"
                 if "error" in row else " | ")
        lines.append(f"| {row['world_size']} | {row['ms_per_step']:.3f} | {row['min_ms']:.3f}-"
                     f"{row['max_ms']:.3f} | {guess} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"argv": argv, "flags": flags, "steps": steps, "rows": rows,
                       "samples": samples}, file, indent=1)
    return 0


def _predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m distnn.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="global batch (strong) or per-rank batch (weak)")
    parser.add_argument("--d-in", type=int, default=1000)
    parser.add_argument("--hidden", default="100", help="hidden widths, comma-separated")
    parser.add_argument("--d-out", type=int, default=10)
    parser.add_argument("--params", type=int, default=None,
                        help="a model by its parameter count alone (spread over 100 layers)")
    parser.add_argument("--compute-ms", type=float, default=None,
                        help="one rank's step compute for the whole --batch-size")
    parser.add_argument("--fixed-ms", type=float, default=0.0,
                        help="with --compute-ms: the part that does not shrink with the batch")
    parser.add_argument("--measure", action="store_true",
                        help="time one rank's step of the MLP here (CPU, one thread)")
    parser.add_argument("--cluster", default="nvlink-ib400",
                        help=f"{', '.join(PRESET_NAMES)}, or a JSON file from `calibrate`")
    parser.add_argument("--worlds", default="1,2,4,8,16,32,64,128,256,512,1024")
    parser.add_argument("--scaling", default="strong")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    for flag, path, in_place in (("--json", args.json, True), ("--plot", args.plot, False)):
        if path:
            check_writable(path, flag, in_place=in_place)

    if args.scaling not in ("strong", "weak"):
        raise UsageError(f"--scaling {args.scaling!r} is not known; allowed: strong, weak")
    for flag, value in (("--batch-size", args.batch_size), ("--d-in", args.d_in),
                        ("--d-out", args.d_out), ("--params", args.params),
                        ("--bucket-mb", args.bucket_mb)):
        _positive(value, flag)
    _positive(args.compute_ms, "--compute-ms")
    _positive(args.fixed_ms, "--fixed-ms", zero_ok=True)
    hidden = _ints(args.hidden, "--hidden", 1) if args.hidden else []
    worlds = _ints(args.worlds, "--worlds", 1)
    cluster = load_cluster(args.cluster)
    if args.measure and args.compute_ms is not None:
        raise UsageError("--measure and --compute-ms both give the step's compute; allowed: "
                         "one of them")
    if args.fixed_ms and args.compute_ms is None:
        raise UsageError("--fixed-ms is a part of --compute-ms; allowed: --fixed-ms with "
                         "--compute-ms")
    if args.measure and args.params is not None:
        raise UsageError("--measure needs the MLP flags, not --params; allowed: --measure with "
                         "--d-in/--hidden/--d-out, or --params with --compute-ms")
    if args.params is not None:
        layers = costmodel.uniform_layer_params(args.params)
        flop = 6.0 * args.params * args.batch_size
        what = f"{args.params:,} parameters"
    else:
        layers = costmodel.mlp_layer_params(args.d_in, hidden, args.d_out)
        flop = costmodel.mlp_flop(args.d_in, hidden, args.d_out, args.batch_size)
        what = f"MLP {args.d_in}-{'-'.join(map(str, hidden))}-{args.d_out} ({sum(layers):,} " \
               "parameters)"
    if args.measure:
        compute = measure_compute(d_in=args.d_in, hidden=hidden, d_out=args.d_out,
                                  batch=args.batch_size)
        how = "measured here"
    elif args.compute_ms is not None:
        if args.fixed_ms > args.compute_ms:
            raise UsageError(f"--fixed-ms {args.fixed_ms:g} is more than --compute-ms "
                             f"{args.compute_ms:g}; allowed: 0 to --compute-ms")
        compute = costmodel.Compute(
            fixed_ms=args.fixed_ms,
            per_sample_ms=(args.compute_ms - args.fixed_ms) / args.batch_size)
        how = "given"
    elif cluster.flop_per_s:
        compute = costmodel.Compute(fixed_ms=cluster.step_floor_ms,
                                    per_sample_ms=flop / args.batch_size / cluster.flop_per_s
                                    * 1e3)
        how = f"from the cluster's {cluster.flop_per_s / 1e12:g} TFLOP/s"
    else:
        raise UsageError(f"cluster {cluster.name} has no compute rate; allowed: --compute-ms X "
                         "or --measure")
    rows = costmodel.predict(layer_params=layers, batch=args.batch_size, compute=compute,
                             cluster=cluster, worlds=worlds, scaling=args.scaling,
                             bucket_mb=args.bucket_mb)
    per = "global" if args.scaling == "strong" else "per rank"
    header = (f"{what}, batch {args.batch_size} ({per}, {args.scaling} scaling), "
              f"cluster {cluster.name}; compute {how}: "
              f"{compute.fixed_ms:.4g} ms + {compute.per_sample_ms:.4g} ms per sample; "
              f"buckets of {args.bucket_mb:g} MiB")
    print(table(rows, header), end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(rows, file, indent=1)
    if args.plot:
        try:
            plot(rows, args.plot, header)
        except ValueError as error:  # matplotlib's: a format it does not write
            said = str(error).replace(" (supported formats: ", "; allowed: ").rstrip(")")
            raise UsageError(f"--plot {args.plot}: {said}") from None
    return 0


def tbf_burst_bytes(rate_bits: float) -> float:
    """tc tbf's burst as launch/netns-cluster.sh sets it: 1 ms at the rate, at least 64 KiB."""
    return max(65536.0, float(int(rate_bits / 8 / 1000)))


NETNS_RATES = {"netns-1gbit": 1e9, "netns-200mbit": 2e8}  # bits/s, docs/results/scale-netns.md
NETNS_MODELS = {"tutorial": ("tutorial", 1000, [100], 10, 64),
                "compute-bound": ("compute", 1024, [1024], 1024, 512)}


def netns_check(docs: str = "docs/results") -> list[dict]:
    """The namespace check (docs/scaling.md): predictions beside docs/results/scale-netns.json's
    medians. Compute and the 2-rank overhead from docs/results/scale-check-cpu.json and the
    calibration; loopback and unshaped veth use this machine's fits; a shaped link is 2 nodes
    of 1 rank, beta = 1/rate, alpha = half the loopback 2-rank sum via rank 0's intercept,
    its tbf bucket as the script sets it (:func:`tbf_burst_bytes`), the bucket's bytes at
    the loopback per-message line speed (half the 2-rank via-root slope)."""
    with open(os.path.join(docs, "scale-netns.json")) as f:
        measured = json.load(f)
    with open(os.path.join(docs, "scale-check-cpu.json")) as f:
        check = {(r["model"], r["world_size"]): r for r in json.load(f)}
    # the calibration behind check 1, whose 2-rank overhead these predictions share
    with open(os.path.join(docs, "scale-calibration-cpu-check1.json")) as f:
        cal = json.load(f)["cluster"]
    a2, b2 = cal["via_root_fit"]["2"]  # 2 ranks via rank 0: 2 (alpha + n beta)
    alpha, line_beta = a2 / 2, b2 / 2
    out = []
    for name, (key, d_in, hidden, d_out, batch) in NETNS_MODELS.items():
        c = check[(key, 2)]
        compute = costmodel.Compute(c["compute_fixed_ms"], c["compute_per_sample_ms"])
        layers = costmodel.mlp_layer_params(d_in, hidden, d_out)
        for link, med in measured["median_ms_per_step"][name].items():
            rate = NETNS_RATES.get(link)
            if rate is None:
                cluster = costmodel.Cluster.from_json(cal)
                how = "this-machine-gloo (2 ranks)"
            else:
                beta, burst = 8 / rate, tbf_burst_bytes(rate)
                cluster = costmodel.Cluster(
                    name=link, gpus_per_node=1, intra_alpha_s=alpha, intra_beta_s=beta,
                    inter_alpha_s=alpha, inter_beta_s=beta, backend="gloo", cores=2,
                    step_overhead_fit={"2": cal["step_overhead_fit"]["2"]},
                    burst_bytes=burst, burst_beta_s=line_beta)
                how = (f"alpha {alpha * 1e3:.3f} ms, beta 1/({rate / 8e6:g} MB/s), "
                       f"tbf burst {burst:.0f} B at 1/({1 / line_beta / 1e6:.0f} MB/s)")
            r = costmodel.predict(layer_params=layers, batch=batch, compute=compute,
                                  cluster=cluster, worlds=[2])[0]
            out.append({"model": name, "link": link, "cluster": how,
                        "burst_bytes": cluster.burst_bytes,
                        "predicted_compute_ms": r["compute_ms"],
                        "predicted_comm_ms": r["comm_ms"],
                        "predicted_overhead_ms": r["overhead_ms"],
                        "predicted_step_ms": r["step_ms"], "measured_step_ms": med,
                        "relative_error": r["step_ms"] / med - 1})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["calibrate"]:
            return _calibrate(argv[1:])
        if argv[:1] == ["measure"]:
            return _measure(argv[1:])
        return _predict(argv)
    except UsageError as error:
        print(f"distnn: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"distnn: error: {error}; allowed: a writable --json/--plot/--out path",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
