"""Memory that runs out: what a run needs, known from its sizes before anything is allocated,
against what the device has; and torch's out-of-memory errors turned into one line.

Exit code 5 (``EXIT_MEMORY``) says that something did not fit.
"""

from __future__ import annotations

import re

import torch

from distnn.errors import EXIT_MEMORY, RunFailed

FLOAT_BYTES = 4
LABEL_BYTES = 8  # a class label, int64


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on ``device``: the GPU's free memory, or the host's
    MemAvailable (/proc/meminfo); None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def mlp_needs(*, batch: int, d_in: int, hidden: tuple[int, ...], d_out: int,
              data_rows: int, y_bytes: int | None = None) -> dict[str, int]:
    """Bytes a run of the MLP needs on its device, by what the flags size: the data rows it
    holds (``data_rows``; a row's target is ``y_bytes``, by default ``d_out`` floats), the
    weights (4 copies: parameters, gradients, the flat gradient buffer, an optimizer's
    state) and the activations of a batch (kept for backward, twice)."""
    widths = (d_in, *hidden, d_out)
    parameters = sum((a + 1) * b for a, b in zip(widths, widths[1:], strict=False))
    target = d_out * FLOAT_BYTES if y_bytes is None else y_bytes
    return {
        "data": data_rows * (d_in * FLOAT_BYTES + target),
        "weights": 4 * parameters * FLOAT_BYTES,
        "activations": 2 * batch * sum(widths[1:]) * FLOAT_BYTES,
    }


def check_fits(needs: dict[str, int], *, flags: dict[str, str], device: torch.device,
               sharing: int = 1) -> None:
    """Raises RunFailed (exit 5) when ``needs`` (bytes by part, for one rank) visibly
    exceeds this rank's share of the memory available on ``device`` (``sharing`` ranks use
    it), naming the part that needs the most and the flags that size it (``flags``: part ->
    the flags' text)."""
    available = available_bytes(device)
    total = sum(needs.values())
    if available is None or total * sharing <= available:
        return
    part = max(needs, key=needs.get)
    ranks = f"{sharing} ranks, each needing {_size(total)}," if sharing > 1 else f"{_size(total)}"
    raise RunFailed(f"out of memory: {flags[part]} needs {_size(needs[part])} for the {part} "
                    f"per rank ({ranks} in all) on {device}, which has {_size(available)} "
                    "available; allowed: sizes that fit", EXIT_MEMORY)


def out_of_memory(error: BaseException, device: torch.device) -> RunFailed | None:
    """The one-line RunFailed for torch's out-of-memory ``error`` (on the host or a GPU);
    None when ``error`` is something else."""
    text = str(error)
    if not (isinstance(error, torch.OutOfMemoryError)
            or (isinstance(error, RuntimeError) and (
                "can't allocate memory" in text or "out of memory" in text.lower()))):
        return None
    asked = re.search(r"allocate (\d+) bytes", text) or re.search(
        r"allocate ([\d.]+ [KMGT]i?B)", text)
    if asked:
        amount = asked.group(1)
        what = f"{_size(int(amount))}" if amount.isdigit() else amount
        said = f"torch could not allocate {what}"
    else:
        said = text.strip().splitlines()[0][:200]
    return RunFailed(f"out of memory on {device}: {said}; allowed: a smaller batch or model, "
                     "or --micro-batches M to bound the activations", EXIT_MEMORY)


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
