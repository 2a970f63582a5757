"""``python -m distnn.plot METRICS.jsonl -o loss.png``: the training loss, the validation
loss beside it (when the run validated), and the throughput.

Needs matplotlib (``pip install 'distnn[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import sys


def read_rows(path: str) -> list[dict]:
    """The per-step objects of a --metrics file (the summary and restored rows included)."""
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number} is not JSON") from None
    return rows


def plot(rows: list[dict], output: str, *, title: str | None = None) -> None:
    """Draws the global loss per step (log scale) over the throughput (samples/s); with
    validation records, the validation loss per sample on a second scale of the loss axes
    (and the accuracy, for classification, in the legend's labels)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    steps = [row for row in rows if "step" in row and "event" not in row]
    val = [row for row in rows if row.get("event") == "val"]
    if not steps:
        raise ValueError("the metrics file has no step rows (was it written with --log-every 0?)")
    timed = [row for row in steps if "samples_per_s" in row]
    figure, (loss_axes, speed_axes) = plt.subplots(2, 1, sharex=True, figsize=(7, 6),
                                                   height_ratios=(2, 1))
    loss_axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], linewidth=1.2,
                   label="training (sum over the batch)")
    loss_axes.set_yscale("log")
    loss_axes.set_ylabel("global loss (sum over the batch)")
    loss_axes.grid(True, which="both", alpha=0.3)
    if val:
        val_axes = loss_axes.twinx()
        label = "validation (per sample)"
        if "accuracy" in val[-1]:
            label += f"; final accuracy {val[-1]['accuracy']:.3g}"
        val_axes.plot([r["step"] for r in val], [r["loss_per_sample"] for r in val],
                      marker="o", markersize=3, color="tab:orange", label=label)
        val_axes.set_yscale("log")
        val_axes.set_ylabel("validation loss per sample")
        handles = [*loss_axes.get_legend_handles_labels()[0],
                   *val_axes.get_legend_handles_labels()[0]]
        loss_axes.legend(handles=handles, loc="upper right", fontsize="small")
    speed_axes.plot([r["step"] for r in timed], [r["samples_per_s"] for r in timed],
                    linewidth=1.2, color="tab:green")
    speed_axes.set_ylabel("samples/s")
    speed_axes.set_xlabel("step")
    speed_axes.grid(True, alpha=0.3)
    summary = next((row for row in rows if row.get("event") == "summary"), None)
    if title is None and summary:
        backend = summary['backend'] if summary['backend'] != 'none' else 'one process'
        title = (f"world size {summary['world_size']}, {summary['device']}, "
                 f"{backend}: final loss {summary['final_loss']:.4g}")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distnn.plot", description=__doc__)
    parser.add_argument("metrics", help="a JSON Lines file written by --metrics")
    parser.add_argument("-o", "--output", default="loss.png", help="the PNG to write")
    parser.add_argument("--title", default=None, help="the figure's title")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("distnn: error: plotting needs matplotlib; install it with "
              "pip install 'distnn[plot]'", file=sys.stderr)
        return 2
    try:
        plot(read_rows(args.metrics), args.output, title=args.title)
    except (OSError, ValueError, KeyError) as error:
        print(f"distnn: error: {args.metrics}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
