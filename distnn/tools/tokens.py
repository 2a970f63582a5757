"""``python -m distnn.tools.tokens INPUT.txt OUTPUT.safetensors --context T [--stride S]
[--val-fraction F --val-output VAL.safetensors]``: a text file as a token data file for a
language model.

Tokens are the file's bytes (vocabulary 256, no tokenizer). Row i is the window of T + 1
bytes that starts at byte i * S: ``x`` is its first T bytes, ``y`` its last T (the next
token after each of x's). Both are uint8 [N, T] tensors in a .safetensors file. With
``--val-fraction F`` the last F of the bytes are cut off before windowing and written the
same way to ``--val-output``, so no window crosses the split.

Memory stays bounded whatever the input's size: the input is read a chunk of rows at a
time (not memory-mapped whole, whose pages would stay resident once touched) and the
safetensors file is written by hand (header first, then each chunk's x and y rows at their
places), into a temporary file that is renamed to the output at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from distnn.errors import EXIT_USAGE, UsageError
from distnn.tools.cli import Parser

VOCAB_SIZE = 256
CHUNK_BYTES = 16 << 20  # input read per chunk; the chunk's x and y copies are no larger


def row_count(length: int, *, context: int, stride: int) -> int:
    """How many windows of ``context + 1`` bytes, one every ``stride``, fit in ``length``."""
    return 0 if length < context + 1 else (length - context - 1) // stride + 1


def _header(rows: int, context: int, stride: int) -> bytes:
    """The safetensors header: its 8-byte little-endian length, then JSON padded with spaces
    to a multiple of 8 (so the tensor data starts aligned, as safetensors' own writer does)."""
    size = rows * context
    entries = {
        "__metadata__": {"vocab_size": str(VOCAB_SIZE), "context": str(context),
                         "stride": str(stride)},
        "x": {"dtype": "U8", "shape": [rows, context], "data_offsets": [0, size]},
        "y": {"dtype": "U8", "shape": [rows, context], "data_offsets": [size, 2 * size]},
    }
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _need_a_window(what: str, length: int, context: int) -> None:
    if length < context + 1:
        raise UsageError(f"{what} has {length} bytes; --context {context} needs at least "
                         f"{context + 1}")


def write_tokens(text_path: str, out_path: str, *, context: int, stride: int,
                 start: int = 0, stop: int | None = None) -> int:
    """Writes the windows of bytes ``start:stop`` of ``text_path`` (default: all of it) to
    ``out_path`` as uint8 ``x`` and ``y`` [N, context] and returns N. ``out_path`` appears
    only once complete; raises UsageError when the bytes hold no window, OSError when the
    file cannot be written."""
    temp_path = _temporary(out_path)
    rows = _write_windows(text_path, temp_path, context=context, stride=stride, start=start,
                          stop=stop)
    os.replace(temp_path, out_path)
    return rows


def _temporary(out_path: str) -> str:
    """Where ``out_path`` is written before it gets its name."""
    return os.path.join(os.path.dirname(os.path.abspath(out_path)),
                        f".{os.path.basename(out_path)}.{os.getpid()}.tmp")


def _write_windows(text_path: str, temp_path: str, *, context: int, stride: int,
                   start: int = 0, stop: int | None = None) -> int:
    """write_tokens' file at ``temp_path``, removed again if its writing fails."""
    stop = os.path.getsize(text_path) if stop is None else stop
    _need_a_window(text_path, stop - start, context)
    rows = row_count(stop - start, context=context, stride=stride)
    header = _header(rows, context, stride)
    x_at, y_at = len(header), len(header) + rows * context
    rows_per_chunk = max(1, CHUNK_BYTES // max(stride, context + 1))
    try:
        with open(temp_path, "wb") as out:
            out.write(header)
            for first in range(0, rows, rows_per_chunk):
                count = min(rows_per_chunk, rows - first)
                needed = (count - 1) * stride + context + 1
                try:
                    span = np.fromfile(text_path, dtype=np.uint8, count=needed,
                                       offset=start + first * stride)
                except OSError as error:
                    raise UsageError(f"{text_path} cannot be read "
                                     f"({error.strerror or error})") from None
                if span.size < needed:
                    raise UsageError(f"{text_path} got shorter while being read")
                windows = sliding_window_view(span, context + 1)[::stride]
                out.seek(x_at + first * context)
                out.write(np.ascontiguousarray(windows[:, :-1]))
                out.seek(y_at + first * context)
                out.write(np.ascontiguousarray(windows[:, 1:]))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    return rows


def _check_paths(args: argparse.Namespace) -> None:
    if os.path.isdir(args.input):
        raise UsageError(f"{args.input} is a directory; allowed: a text file")
    try:
        with open(args.input, "rb"):
            pass
    except OSError as error:
        raise UsageError(f"{args.input} cannot be read ({error.strerror})") from None
    outputs = [("OUTPUT", args.output)]
    if args.val_output is not None:
        outputs.append(("--val-output", args.val_output))
        if os.path.realpath(args.val_output) == os.path.realpath(args.output):
            raise UsageError(f"--val-output {args.val_output} is OUTPUT too; allowed: "
                             "another path")
    for name, path in outputs:
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.realpath(path) == os.path.realpath(args.input):
            raise UsageError(f"{name} {path} is the input {args.input}, which writing it "
                             "would destroy; allowed: another path")
        if not path.endswith(".safetensors"):
            raise UsageError(f"{name} {path} does not end in .safetensors")
        if os.path.isdir(path):
            raise UsageError(f"{name} {path} is a directory; allowed: a file path")
        if not os.path.isdir(folder):
            kind = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
            raise UsageError(f"{name} {path}: the folder {folder} {kind}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{name} {path}: the folder {folder} is not writable")


def _run(args: argparse.Namespace) -> str:
    """Checks the arguments, writes the file(s) and returns the line to print."""
    for flag, value in (("--context", args.context), ("--stride", args.stride)):
        if value < 1:
            raise UsageError(f"{flag} {value} is not allowed; allowed: integers >= 1")
    if (args.val_fraction is None) != (args.val_output is None):
        raise UsageError("--val-fraction and --val-output go together; give both or neither")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction {args.val_fraction:g} is not allowed; allowed: a "
                         "number between 0 and 1, both excluded")
    _check_paths(args)
    length = os.path.getsize(args.input)
    split = length - int(length * (args.val_fraction or 0))
    parts = [(args.output, 0, split)]
    if args.val_output is not None:
        parts.append((args.val_output, split, length))
    for path, start, stop in parts:  # refuse before writing anything
        part = f" (the part for {path})" if len(parts) > 1 else ""
        _need_a_window(args.input + part, stop - start, args.context)
    written, temporaries = [], []
    try:  # every file written under a temporary name first: all of them appear, or none
        for path, start, stop in parts:
            temporaries.append(_temporary(path))
            try:
                rows = _write_windows(args.input, temporaries[-1], context=args.context,
                                      stride=args.stride, start=start, stop=stop)
            except OSError as error:
                raise UsageError(f"could not write {path} ({error.strerror or error}); "
                                 "nothing was written") from None
            written.append(f"{rows} rows ({rows * args.context} tokens) to {path}")
        for temporary, (path, _, _) in zip(temporaries, parts, strict=True):
            os.replace(temporary, path)
    finally:
        for temporary in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    return f"wrote {'; '.join(written)}; T={args.context}, stride {args.stride}"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m distnn.tools.tokens", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the text file; each byte is a token (0..255)")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--context", type=int, required=True, help="T, tokens per row")
    parser.add_argument("--stride", type=int, default=None,
                        help="bytes between the starts of two rows (default: T)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="the last fraction F of the bytes goes to --val-output")
    parser.add_argument("--val-output", default=None, help="the validation .safetensors file")
    try:
        args = parser.parse_args(argv)
        if args.stride is None:
            args.stride = args.context
        print(_run(args))
    except (UsageError, OSError) as error:
        print(f"distnn: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
