"""``python -m distnn.tools.memory_limit``: the largest model that trains under a fixed memory
limit per rank, in each ``--shard`` mode.

Every rank of ``--world`` runs in a memory cgroup of its own (cgroup v1, the ``memory``
controller: ``memory.limit_in_bytes`` = ``--limit-mb``), so a rank that needs more than the
limit is killed by the kernel, as a rank of a device with that much memory would fail. A
trial is ``python -m distnn.train`` under torchrun, the project's GPT (``--d-model``,
``--heads``, context and byte vocabulary as ``distnn.tools.bench_shard``'s memory part) with
``n`` layers, AdamW, ``--steps`` steps; it passes when the job exits 0. For each mode the
tool searches the layer counts 1 to ``--max-layers`` by bisection (a model that trains under
the limit trains with fewer layers too) and reports the largest that passed, its parameters,
and each rank's peak usage as the cgroup counted it (``memory.max_usage_in_bytes``: its
resident memory and the page cache it filled). ``--allocator mmap-1MiB`` (the default) runs
the ranks with glibc's mmap threshold fixed at 1 MiB, as docs/sharding.md advises on a CPU.

Needs root (or a delegated cgroup) and the v1 memory controller at /sys/fs/cgroup/memory;
says so in one line and exits 2 otherwise. Writes ``OUT.json`` (every trial) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from distnn.config import SHARD_MODES as MODES
from distnn.tools.bench_data import below_one, load_average, machine, write_report
from distnn.tools.bench_shard import ALLOCATORS, GPTShape, train_command, write_tokens

CGROUP_ROOT = "/sys/fs/cgroup/memory"
MB = 10**6


def cgroup_path(prefix: str, rank: int) -> str:
    return os.path.join(CGROUP_ROOT, f"{prefix}-{rank}")


def check_cgroups() -> str | None:
    """Why memory cgroups cannot be made here, or None when they can."""
    probe = cgroup_path(f"distnn-probe-{os.getpid()}", 0)
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as error:
        return (f"cannot make a memory cgroup under {CGROUP_ROOT} ({error.strerror}); "
                "allowed: root with the cgroup v1 memory controller mounted there")
    return None


def make_cgroups(prefix: str, world: int, limit_bytes: int) -> None:
    for rank in range(world):
        path = cgroup_path(prefix, rank)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as file:
            file.write(str(limit_bytes))


def read_cgroups(prefix: str, world: int) -> list[dict[str, int]]:
    """Each rank's peak usage and how often it met the limit."""
    usage = []
    for rank in range(world):
        path = cgroup_path(prefix, rank)

        def number(name: str, path: str = path) -> int:
            with open(os.path.join(path, name)) as file:
                return int(file.read().split()[0])

        usage.append({"max_usage_bytes": number("memory.max_usage_in_bytes"),
                      "failcnt": number("memory.failcnt")})
    return usage


def remove_cgroups(prefix: str, world: int) -> None:
    for rank in range(world):
        path = cgroup_path(prefix, rank)
        for _ in range(50):  # the killed ranks' exits settle first
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def enter(prefix: str, argv: list[str]) -> None:
    """A rank's entry (torchrun runs it once a rank): join this rank's cgroup, then become
    ``python -m distnn.train argv``."""
    with open(os.path.join(cgroup_path(prefix, int(os.environ["LOCAL_RANK"])),
                           "cgroup.procs"), "w") as file:
        file.write(str(os.getpid()))
    os.execv(sys.executable, [sys.executable, "-m", "distnn.train", *argv])


def trial(mode: str, shape: GPTShape, data: str, args: argparse.Namespace) -> dict[str, Any]:
    """One job of ``shape`` under ``--shard mode``, every rank in its cgroup."""
    prefix = f"distnn-limit-{os.getpid()}"
    command = train_command(mode, shape, data, world=args.world, steps=args.steps,
                            batch_size=args.batch, timeout_s=args.timeout_s)
    at = command.index("distnn.train")
    command[at:at + 1] = ["distnn.tools.memory_limit", "--enter", prefix, "--"]
    make_cgroups(prefix, args.world, args.limit_mb * MB)
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1",
                                     **ALLOCATORS[args.allocator]},
                                timeout=args.timeout_s * 10)
        code, tail = result.returncode, (result.stdout + result.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        code, tail = None, "timed out"
    finally:  # (interrupted too: the ranks were ended with the job)
        usage = read_cgroups(prefix, args.world)
        remove_cgroups(prefix, args.world)
    return {"mode": mode, "layers": shape.n_layers, "parameters": shape.parameters,
            "passed": code == 0, "exit_code": code, "seconds": round(time.monotonic() -
                                                                      started, 1),
            "ranks": usage, "tail": "" if code == 0 else tail}


def largest(mode: str, data: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The trials of the bisection over 1..--max-layers, in the order run."""
    trials: list[dict[str, Any]] = []
    low, high = 0, args.max_layers + 1  # low passed (0: none yet), high failed
    while high - low > 1:
        layers = (low + high) // 2
        shape = GPTShape(args.d_model, layers, args.heads, args.context)
        record = trial(mode, shape, data, args)
        trials.append(record)
        print(f"--shard {mode}: {layers} layers ({record['parameters']:,} parameters): "
              f"{'trains' if record['passed'] else 'fails'} (peak "
              f"{max(r['max_usage_bytes'] for r in record['ranks']) / MB:.0f} MB, "
              f"{record['seconds']} s)", file=sys.stderr, flush=True)
        low, high = (layers, high) if record["passed"] else (low, layers)
    return trials


def markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    lines = [f"# The largest GPT under {args['limit_mb']} MB a rank, by --shard mode", "",
             f"Machine: {report['machine']}; torch {report['torch']}; gloo, {args['world']} "
             f"ranks started by torchrun, each in a memory cgroup of its own "
             f"(memory.limit_in_bytes = {args['limit_mb']} MB = 10^6 bytes x "
             f"{args['limit_mb']}), malloc {args['allocator']}. The GPT: d_model "
             f"{args['d_model']}, {args['heads']} heads, context {args['context']}, byte "
             f"vocabulary; AdamW; {args['steps']} steps of a {args['batch']}-row global batch. "
             f"Layers searched by bisection over 1 to {args['max_layers']}. Load average "
             f"(1 min) at the start and the end: {report['load_before']}, "
             f"{report['load_after']}.", "",
             "| --shard | most layers that train | parameters | / none | worst rank's peak "
             "(cgroup) | first that fails | trials |", "|---|---|---|---|---|---|---|"]
    base = (report["modes"].get("none") or {}).get("largest")
    for mode, row in report["modes"].items():
        best, failed = row["largest"], row["first_failing_layers"]
        fails = failed if failed else f"none up to {args['max_layers']}"
        if best is None:
            lines.append(f"| {mode} | none | | | | {fails} | {len(row['trials'])} |")
            continue
        ratio = f"{best['parameters'] / base['parameters']:.2f}x" if base else ""
        peak = max(r["max_usage_bytes"] for r in best["ranks"]) / MB
        lines.append(f"| {mode} | {best['layers']} | {best['parameters']:,} | {ratio} | "
                     f"{peak:.0f} MB | {fails} | {len(row['trials'])} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distnn.tools.memory_limit",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", default="memory-limit", help="writes OUT.json and OUT.md")
    add("--modes", default=",".join(MODES), help="the --shard modes, comma-separated")
    add("--limit-mb", type=int, default=1000, help="each rank's memory limit, MB (10^6 B)")
    add("--world", type=int, default=4)
    add("--d-model", type=int, default=768)
    add("--heads", type=int, default=12)
    add("--context", type=int, default=64)
    add("--max-layers", type=int, default=48)
    add("--steps", type=int, default=2)
    add("--batch", type=int, default=4, help="rows in the global batch")
    add("--allocator", choices=sorted(ALLOCATORS), default="mmap-1MiB")
    add("--timeout-s", type=float, default=120.0, help="distnn's --timeout-s")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--enter"]:  # a rank's entry, under torchrun
        enter(argv[1], argv[3:])
    args = build_parser().parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or set(modes) - set(MODES):
        print(f"distnn: error: --modes: got {args.modes!r}; allowed: some of "
              f"{', '.join(MODES)}", file=sys.stderr)
        return 2
    error = below_one(args, ("limit_mb", "world", "max_layers", "steps", "batch"))
    if error:
        print(error, file=sys.stderr)
        return 2
    why = check_cgroups()
    if why:
        print(f"distnn: error: {why}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"machine": machine(), "torch": torch.__version__,
                              "args": vars(args), "load_before": load_average(), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="memory-limit-") as scratch:
        data = os.path.join(scratch, "tokens.safetensors")
        write_tokens(data, GPTShape(args.d_model, 1, args.heads, args.context),
                     args.batch * args.steps)
        for mode in modes:
            trials = largest(mode, data, args)
            passed = [t for t in trials if t["passed"]]
            failed = [t["layers"] for t in trials if not t["passed"]]
            report["modes"][mode] = {
                "trials": trials,
                "largest": max(passed, key=lambda t: t["layers"]) if passed else None,
                "first_failing_layers": min(failed) if failed else None}
    report["load_after"] = load_average()
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
