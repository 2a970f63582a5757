"""``python -m distnn.tools.sample WEIGHTS [--prompt TEXT] [--tokens N] [--temperature T]
[--top-k K] [--seed S] [--device auto|cpu|cuda]``: text that a language model distnn.train
trained writes.

WEIGHTS is the file ``--save`` wrote, or a checkpoint's step-N folder: the metadata of its
weights says which model it holds (``--model``, ``--model-args`` and the sizes), so nothing
else is needed. Tokens are bytes, as
distnn.tools.tokens makes them: the prompt's UTF-8 bytes go in, and the prompt and the N
bytes the model adds come out on stdout, as they are (a byte sequence cut mid-character is
the model's). Each byte is drawn from the model's scores over ``--temperature`` among the
``--top-k`` likeliest (``--temperature 0``: always the likeliest), repeatably for a
``--seed`` on one machine (distnn.models.sampling.generate, which also takes your own model
from Python).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from safetensors import SafetensorError, safe_open

from distnn.distributed.environment import detect_launch, resolve_placement
from distnn.errors import EXIT_USAGE, UsageError
from distnn.job.losses import scores_of
from distnn.job.model import model_from_recipe
from distnn.models.sampling import generate
from distnn.resilience.checkpoint import WEIGHTS
from distnn.tools.cli import Parser
from distnn.tools.tokens import VOCAB_SIZE


def load_trained(path: str, device: torch.device) -> tuple[torch.nn.Module, int, int]:
    """The model ``path`` (a --save file, or a checkpoint's step-N folder) holds, with its
    trained weights, on ``device``; with its context (d_in) and vocabulary (d_out)."""
    if os.path.isdir(path):
        weights_file = os.path.join(path, WEIGHTS)
        if not os.path.isfile(weights_file):
            raise UsageError(f"{path} holds no {WEIGHTS} (a sharded checkpoint of --shard "
                             "gradients or parameters, where each rank wrote its part, or "
                             "not a checkpoint); allowed: a --save file, or the step-N folder "
                             "of an unsharded run's checkpoint")
        path = weights_file
    try:
        with safe_open(path, framework="pt") as file:
            recipe = file.metadata() or {}
            weights = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except OSError as error:
        raise UsageError(f"cannot read {path} ({error.strerror or error}); allowed: a file "
                         "distnn.train's --save wrote") from None
    except SafetensorError as error:
        raise UsageError(f"{path} is not a safetensors file ({error}); allowed: a file "
                         "distnn.train's --save wrote") from None
    model, context, vocab = model_from_recipe(recipe, where=path)
    if not recipe["distnn.model"]:
        raise UsageError(f"{path} holds distnn's MLP (no --model), which scores rows of "
                         "features, not next tokens; allowed: a language model's file "
                         "(--model distnn.models.gpt:build, say)")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # "Error(s) in loading state_dict for GPT:", then what
        what = " ".join(str(error).split("\n", 1)[-1].split())
        what = what if len(what) <= 300 else what[:297] + "..."
        raise UsageError(f"{path}: its weights do not fit the model its metadata names "
                         f"({what}); allowed: the file as --save wrote it") from None
    return model.to(device), context, vocab


def _run(args: argparse.Namespace) -> bytes:
    if args.tokens < 0:
        raise UsageError(f"--tokens {args.tokens}; allowed: 0 or more")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature:g}; allowed: 0 (always the "
                         "likeliest byte) or a finite number above it")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed}; allowed: 0 to 2**63 - 1")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}; allowed: 1 or more")
    prompt = args.prompt.encode("utf-8", "surrogateescape")  # argv's bytes, whatever they are
    if not prompt:
        raise UsageError("--prompt is empty; allowed: at least one character")
    device = torch.device(resolve_placement(  # as --device picks it for one process
        device=args.device, backend="auto", launch=detect_launch({}),
        cuda_devices=torch.cuda.device_count()).device)
    model, context, vocab = load_trained(args.weights, device)
    if vocab > VOCAB_SIZE:
        raise UsageError(f"{args.weights}: the model scores {vocab} tokens, and this tool's "
                         f"tokens are bytes ({VOCAB_SIZE}, distnn.tools.tokens'); allowed: a "
                         "model of a byte vocabulary (for another tokenizer, call "
                         "distnn.models.sampling.generate and decode its ids yourself)")
    if max(prompt) >= vocab:
        raise UsageError(f"--prompt holds the byte {max(prompt)}, and the model knows bytes "
                         f"0 to {vocab - 1} only; allowed: a prompt of those bytes")
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    with torch.no_grad():
        scores = scores_of(model.eval()(ids[:, -context:]))
    if scores.dim() != 3 or scores.shape[-1] != vocab:
        shape = list(scores.shape)
        raise UsageError(f"{args.weights}: the model maps token ids [1, {ids.shape[1]}] to "
                         f"{shape}, not to next-token scores [1, {ids.shape[1]}, {vocab}]; "
                         "allowed: a language model (--model distnn.models.gpt:build, say)")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, ids, new_tokens=args.tokens, context=context,
                   temperature=args.temperature, top_k=args.top_k, generator=generator)
    return bytes(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m distnn.tools.sample", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="the .safetensors file distnn.train's --save wrote, "
                        "or a checkpoint's step-N folder")
    parser.add_argument("--prompt", default="\n", help="the text to go on from (default: a "
                        "newline)")
    parser.add_argument("--tokens", type=int, default=200, help="bytes to add (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="below 1: surer, above 1: more varied; 0: always the likeliest "
                        "(default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="draw among the K likeliest bytes only (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draws (default: 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default: auto, a GPU if there is one)")
    try:
        args = parser.parse_args(argv)
        text = _run(args)
    except UsageError as error:
        print(f"distnn: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.buffer.write(text + b"\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
