"""``python -m distnn.tools.bench_gpt``: the language-model recipe on one device, distnn against
the plain loop the field holds up (nanoGPT's ``train.py``), in one invocation.

Both train the project's GPT (distnn.models.gpt, ``F.scaled_dot_product_attention``: flash
attention on a GPU) from the same weights on the same generated token rows: AdamW (fused),
a cosine schedule after a warm-up, gradients clipped to norm 1, the mean cross-entropy over
every target token, ``--precision bf16`` by autocast (weights and gradients fp32) and, with
``--compile``, ``torch.compile``:

- **plain loop**: written here as nanoGPT writes it: ``torch.compile(model)``, the forward
  and loss under ``torch.autocast(dtype=bfloat16)``, ``loss.backward()``,
  ``clip_grad_norm_``, ``optimizer.step()``, a ``LambdaLR`` step, ``zero_grad(set_to_none)``.
- **distnn**: ``distnn.fit`` with the same settings (``precision=``, ``compile=``), one
  process: alone (no process group), or under ``torchrun --nproc_per_node=1`` (a world of
  one, NCCL on a GPU, as ``make gpu-check`` runs it); timed by its ``TrainResult.wall_s``
  (its step loop, after compiling).

Each variant runs once untimed first (compiling), then ``--rounds`` rounds of a
``--steps``-step timed run each, every round starting with the other variant (``--budget-s``
may end them early); medians.
Tokens per second count every target token of a step's batch. MFU (model FLOPs
utilisation) is nanoGPT's estimate: a token costs ``6 N + 12 L d T`` FLOPs (N the parameters
less the position embeddings, L layers, d the model width, T the context: the forward and
backward of the matmuls, and of attention's scores and weighted sums), over the device's
dense bf16 peak (PEAK_TFLOPS by the device's name, or ``--peak-tflops``; none on a CPU).
The first loss of every run is checked against the plain loop's (exit 1 when they part).

Defaults are GPT-2 small (12 layers, width 768, 12 heads, context 1024, vocabulary 50,304)
with 8 rows a step, for a GPU; ``make gpu-lm`` runs it. Writes ``OUT.json`` and
``OUT.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import distnn
from distnn.models.gpt import build
from distnn.tools.bench_data import below_one, load_average, machine, write_report
from distnn.tools.bench_lm import cosine_with_warmup

SEED = 0
# dense bf16 peak, TFLOP/s, by a word of torch.cuda.get_device_name(): NVIDIA's datasheets
# for the SXM parts (H100 SXM5 and H200: 989.4; A100: 312)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
PLAIN, DISTNN = "plain loop (nanoGPT style)", "distnn.fit"


def flops_per_token(model: nn.Module, *, n_layers: int, d_model: int, context: int) -> int:
    """nanoGPT's estimate (model.py, estimate_mfu): 6 N + 12 L d T, N without the position
    embeddings."""
    parameters = sum(p.numel() for p in model.parameters())
    parameters -= model.positions.weight.numel()
    return 6 * parameters + 12 * n_layers * d_model * context


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for word, peak in PEAK_TFLOPS.items() if word in name), None)


def data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of random token ids and their next tokens (the throughput does not depend on
    what the tokens say)."""
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, args.vocab, (args.rows, args.context + 1), generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def seeded_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(SEED)
    return build(d_in=args.context, d_out=args.vocab, d_model=args.d_model,
                 n_layers=args.n_layers, n_heads=args.n_heads)


def run_plain(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, *, steps: int,
              device: torch.device, runtime: distnn.Runtime) -> dict[str, Any]:
    del runtime  # a plain loop of one process: it joins no group (run_distnn's signature)
    model = seeded_model(args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup=args.warmup_steps, total=steps))
    forward = torch.compile(model) if args.compile else model
    bf16 = args.precision == "bf16"
    losses = []

    def step(index: int) -> None:
        first = (index * args.batch_size) % args.rows
        xb = x[first:first + args.batch_size].to(device, non_blocking=True)
        yb = y[first:first + args.batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = forward(xb)
            loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), yb.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if index < 2:
            losses.append(loss.item())

    step(0)  # outside the timing, as distnn's compile is: the first step compiles
    _sync(device)
    started = time.perf_counter()
    for index in range(1, steps):
        step(index)
    _sync(device)
    return {"wall_s": time.perf_counter() - started, "timed_steps": steps - 1,
            "first_loss": losses[0]}


def run_distnn(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, *, steps: int,
               device: torch.device, runtime: distnn.Runtime) -> dict[str, Any]:
    model = seeded_model(args)
    result = distnn.fit(model, train=(x, y), loss="cross-entropy", optimizer="adamw",
                        loss_reduction="mean", lr_schedule="cosine",
                        warmup_steps=args.warmup_steps, clip_grad_norm=1.0,
                        batch_size=args.batch_size, steps=steps, lr=args.lr, no_shuffle=True,
                        precision=args.precision, compile=args.compile, device=device.type,
                        log_every=0, quiet=True, verify_every=0, runtime=runtime)
    return {"wall_s": result.wall_s, "timed_steps": steps, "first_loss": result.losses[0],
            "compile_s": result.compile_s, "compiled": result.compiled}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, rt: distnn.Runtime) -> dict[str, Any]:
    device = rt.device
    x, y = data(args)
    variants = {PLAIN: run_plain, DISTNN: run_distnn}
    for name, run in variants.items():  # untimed: compiling, the allocator's first blocks
        print(f"{name}: a first run (compiles)...", file=sys.stderr, flush=True)
        run(args, x, y, steps=min(args.steps, 3), device=device, runtime=rt)
    samples: list[dict[str, Any]] = []
    names = list(variants)
    started = time.perf_counter()
    for round_ in range(args.rounds):
        round_started = time.perf_counter()
        for name in names[round_ % 2:] + names[:round_ % 2]:
            sample = variants[name](args, x, y, steps=args.steps, device=device,
                                    runtime=rt)
            sample.update(variant=name, round=round_,
                          tokens_per_s=sample["timed_steps"] * args.batch_size *
                          args.context / sample["wall_s"])
            samples.append(sample)
            print(f"round {round_ + 1}, {name}: {sample['tokens_per_s']:.0f} tokens/s",
                  file=sys.stderr, flush=True)
        now = time.perf_counter()
        if (args.budget_s is not None and round_ + 1 < args.rounds
                and now - started + (now - round_started) > args.budget_s):
            print(f"--budget-s {args.budget_s:g} reached: {round_ + 1} of {args.rounds} rounds",
                  file=sys.stderr, flush=True)
            break
    model = seeded_model(args)
    per_token = flops_per_token(model, n_layers=args.n_layers, d_model=args.d_model,
                                context=args.context)
    peak = peak_tflops(device, args.peak_tflops)
    rows = []
    reference = next(s["first_loss"] for s in samples if s["variant"] == PLAIN)
    for name in names:
        mine = [s for s in samples if s["variant"] == name]
        tokens = statistics.median(s["tokens_per_s"] for s in mine)
        rows.append({"variant": name, "tokens_per_s": tokens,
                     "min": min(s["tokens_per_s"] for s in mine),
                     "max": max(s["tokens_per_s"] for s in mine),
                     "mfu": tokens * per_token / (peak * 1e12) if peak else None,
                     "first_loss": mine[0]["first_loss"],
                     "first_loss_rel_diff": abs(mine[0]["first_loss"] - reference) /
                     abs(reference)})
    return {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else machine()),
            "backend": torch.distributed.get_backend() if rt.distributed else "none",
            "torch": torch.__version__, "args": vars(args), "samples": samples,
            "rows": rows, "rounds_done": len(samples) // len(names),
            "flops_per_token": per_token, "peak_tflops": peak,
            "parameters": sum(p.numel() for p in model.parameters()),
            "ratio": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]}


def markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    lines = ["# The language-model recipe on one device: distnn against a plain loop", "",
             f"Device: {report['device']}; torch {report['torch']}; distnn's process group: "
             f"{report['backend']}. The GPT: {args['n_layers']} "
             f"layers, width {args['d_model']}, {args['n_heads']} heads, context "
             f"{args['context']}, vocabulary {args['vocab']} ({report['parameters']:,} "
             f"parameters); {args['batch_size']} rows a step; AdamW (fused), cosine after "
             f"{args['warmup_steps']} warm-up steps, clipping at 1, the mean cross-entropy; "
             f"precision {args['precision']}, compile {'on' if args['compile'] else 'off'}. "
             f"{report['rounds_done']} round{'s' if report['rounds_done'] != 1 else ''} of "
             f"{args['steps']} steps, medians. MFU: "
             f"{report['flops_per_token']:,} FLOPs a token (6 N + 12 L d T) over "
             + (f"{report['peak_tflops']} TFLOP/s" if report["peak_tflops"] else "no known peak")
             + f". Load average (1 min) at the end: {report.get('load_after')}.", "",
             "| variant | tokens/s (median) | min-max | MFU | first loss |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] is not None else "-"
        lines.append(f"| {row['variant']} | {row['tokens_per_s']:.0f} | {row['min']:.0f}-"
                     f"{row['max']:.0f} | {mfu} | {row['first_loss']:.5f} |")
    lines += ["", f"distnn / plain loop: {report['ratio']:.3f}x by the medians."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distnn.tools.bench_gpt",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", default="bench-gpt", help="writes OUT.json and OUT.md")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--precision", default="bf16", choices=("fp32", "bf16"))
    add("--compile", action=argparse.BooleanOptionalAction, default=True)
    add("--n-layers", type=int, default=12)
    add("--d-model", type=int, default=768)
    add("--n-heads", type=int, default=12)
    add("--context", type=int, default=1024)
    add("--vocab", type=int, default=50304)
    add("--batch-size", type=int, default=8, help="rows a step")
    add("--rows", type=int, default=256, help="rows of generated tokens")
    add("--steps", type=int, default=30, help="steps a timed run")
    add("--rounds", type=int, default=3)
    add("--budget-s", type=float, default=None,
        help="no round starts that would end past this many seconds of timed rounds (as "
             "long as the last round): the report holds the rounds done, at least one")
    add("--lr", type=float, default=6e-4)
    add("--warmup-steps", type=int, default=2)
    add("--peak-tflops", type=float, default=None,
        help="the device's dense bf16 peak, TFLOP/s (default: known GPUs by name)")
    add("--tolerance", type=float, default=None,
        help="the first losses' largest relative difference (default 1e-5 fp32, 2e-2 bf16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    error = below_one(args, ("n_layers", "d_model", "n_heads", "context", "vocab",
                             "batch_size", "rows", "rounds"))
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.steps < 2 or args.warmup_steps >= args.steps or args.rows % args.batch_size:
        print(f"distnn: error: got --steps {args.steps}, --warmup-steps {args.warmup_steps}, "
              f"--rows {args.rows}, --batch-size {args.batch_size}; allowed: 2 or more steps, "
              "fewer warm-up steps, rows a multiple of the batch size (both variants then "
              "read the same batches)", file=sys.stderr)
        return 2
    with distnn.setup(device=args.device) as rt:  # torchrun --nproc_per_node=1: NCCL
        if rt.world_size > 1:
            print(f"distnn: error: got a world of {rt.world_size} ranks; allowed: one "
                  "process (alone, or torchrun --nproc_per_node=1)", file=sys.stderr)
            return 2
        report = measure(args, rt)
    report["load_after"] = load_average()
    write_report(args.out, report, markdown(report))
    tolerance = args.tolerance or (2e-2 if args.precision == "bf16" else 1e-5)
    apart = max(row["first_loss_rel_diff"] for row in report["rows"])
    if apart > tolerance:
        print(f"distnn: error: the variants' first losses are {apart:.2e} apart (relative); "
              f"allowed: {tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
