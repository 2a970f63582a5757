"""How far it scales: predicted step time per world size from a calibrated cost model.

    python -m distnn.scale calibrate --out FILE [--worlds 2,4,8] [--sizes 4096,...]
    python -m distnn.scale [--batch-size B --d-in D --hidden H,... --d-out O | --params N]
        [--compute-ms X | --measure] --cluster PRESET|FILE --worlds 1,2,4,...
        [--scaling strong|weak] [--bucket-mb M] [--json PATH] [--plot PATH]

The model and its sources: docs/scaling.md; the formulas: distnn/tools/costmodel.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from distnn.errors import UsageError
from distnn.tools import costmodel

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
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise UsageError(f"{flag} {value:g} is not allowed; allowed: a number "
                         f"{'>= 0' if zero_ok else '> 0'}")


def load_cluster(spec: str) -> costmodel.Cluster:
    """A preset by name, or a cluster description JSON file (as ``calibrate`` writes)."""
    if spec == "this-machine-gloo":
        spec_path = _this_machine_file()
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


def _this_machine_file() -> str | None:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.join(repo, "docs", "results", "scale-calibration-cpu.json")
    return here if os.path.exists(here) else None


def measure_compute(*, d_in: int, hidden: list[int], d_out: int, batch: int,
                    steps: int = 7) -> costmodel.Compute:
    """One rank's step here (forward, sum MSE loss, backward, SGD update), one CPU thread,
    median of ``steps``, at ``batch`` and at ``max(1, batch // 8)`` rows: the line through
    the two gives fixed and per-sample time."""
    import torch

    from distnn.job.model import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(d_in=d_in, hidden=tuple(hidden), d_out=d_out)
    loss_fn = torch.nn.MSELoss(reduction="sum")

    def median_ms(rows: int) -> float:
        x, y = torch.randn(rows, d_in), torch.randn(rows, d_out)
        times = []
        for step in range(steps + 2):
            started = time.perf_counter()
            model.zero_grad()
            loss_fn(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-9 * p.grad
            if step >= 2:
                times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    small = max(1, batch // 8)
    big_ms, small_ms = median_ms(batch), median_ms(small)
    if batch == small:
        return costmodel.Compute(fixed_ms=0.0, per_sample_ms=big_ms / batch)
    per_sample = max(0.0, (big_ms - small_ms) / (batch - small))
    return costmodel.Compute(fixed_ms=max(0.0, big_ms - per_sample * batch),
                             per_sample_ms=per_sample)


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


def _calibrate(argv: list[str]) -> int:
    from distnn.tools import calibrate

    parser = argparse.ArgumentParser(prog="python -m distnn.scale calibrate")
    parser.add_argument("--out", required=True, help="cluster description JSON to write")
    parser.add_argument("--worlds", default="2,4,8")
    parser.add_argument("--sizes", default=",".join(str(s) for s in calibrate.DEFAULT_SIZES),
                        help="buffer sizes in bytes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="this-machine-gloo")
    args = parser.parse_args(argv)
    worlds = _ints(args.worlds, "--worlds", 2)
    sizes = _ints(args.sizes, "--sizes", 4)
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats} is not allowed; allowed: integers >= 1")
    started = time.perf_counter()
    samples = calibrate.measure(worlds, sizes, repeats=args.repeats,
                                out_dir=os.path.dirname(os.path.abspath(args.out)))
    rows = calibrate.medians(samples)
    cluster = calibrate.cluster_description(rows, name=args.name, cores=os.cpu_count())
    with open(args.out, "w", encoding="utf-8") as file:
        json.dump({"cluster": cluster, "medians": rows, "samples": samples,
                   "seconds": time.perf_counter() - started}, file, indent=1)
    print(f"alpha {cluster['intra_alpha_s'] * 1e6:.1f} us, beta "
          f"{cluster['intra_beta_s'] * 1e9:.3f} ns/B ({1e-9 / cluster['intra_beta_s']:.2f} GB/s); "
          f"wrote {args.out}")
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
        plot(rows, args.plot, header)
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
    with open(os.path.join(docs, "scale-calibration-cpu.json")) as f:
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
