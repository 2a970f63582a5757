"""``python -m distnn.plot METRICS.jsonl -o loss.png``: the training loss, the validation
loss beside it (when the run validated), and the throughput.

Needs matplotlib (``pip install 'distnn[plot]'``).
"""

from __future__ import annotations

import json
import math
import os
import sys

from distnn.tools.cli import Parser


def read_rows(path: str) -> list[dict]:
    """The per-step objects of a --metrics file (the summary and restored rows included)."""
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number} is not JSON") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} is not a JSON object (a metrics record)")
            rows.append(row)
    return rows


def _number(value: object) -> bool:
    """Whether ``value`` is a number a record's field may hold (null, text: not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object, spec: str) -> str:
    return format(value, spec) if _number(value) else "n/a"


def records(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The step records with a loss, and the validation records with a loss per sample;
    raises ValueError when no step has a finite loss to draw."""
    steps = [row for row in rows if "step" in row and "event" not in row
             and _number(row["step"]) and _number(row.get("loss"))]
    val = [row for row in rows if row.get("event") == "val" and _number(row.get("step"))
           and _number(row.get("loss_per_sample"))]
    if not any(math.isfinite(row["loss"]) for row in steps):
        raise ValueError("the metrics file has no step records with a finite loss (was it "
                         "written with --log-every 0?)")
    return steps, val


def plot(rows: list[dict], output: str, *, title: str | None = None) -> None:
    """Draws the global loss per step (log scale) over the throughput (samples/s); with
    validation records, the validation loss per sample on a second scale of the loss axes
    (and the accuracy, for classification, in the legend's labels)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    steps, val = records(rows)
    timed = [row for row in steps if _number(row.get("samples_per_s"))]
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
        if _number(val[-1].get("accuracy")):  # (null: every label of the set ignored)
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
        backend = summary.get("backend", "?")
        title = (f"world size {summary.get('world_size', '?')}, {summary.get('device', '?')}, "
                 f"{'one process' if backend == 'none' else backend}: final loss "
                 f"{_shown(summary.get('final_loss'), '.4g')}")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m distnn.plot", description=__doc__)
    parser.add_argument("metrics", help="a JSON Lines file written by --metrics")
    parser.add_argument("-o", "--output", default="loss.png",
                        help="the image to write (.png unless it names another format)")
    parser.add_argument("--title", default=None, help="the figure's title")
    try:
        args = parser.parse_args(argv)
        import matplotlib  # noqa: F401
    except ValueError as error:
        print(f"distnn: error: {error}", file=sys.stderr)
        return 2
    except ImportError:
        print("distnn: error: plotting needs matplotlib; install it with "
              "pip install 'distnn[plot]'", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.metrics)
        records(rows)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        print(f"distnn: error: {args.metrics}: {error}", file=sys.stderr)
        return 2
    # what matplotlib writes: a name without an extension gets .png
    output = args.output if os.path.splitext(args.output)[1] else f"{args.output}.png"
    try:
        if not os.path.basename(args.output) or os.path.isdir(output):
            raise ValueError("not a file name")
        plot(rows, output, title=args.title)
    except (OSError, ValueError) as error:
        said = error.strerror if isinstance(error, OSError) and error.strerror else error
        print(f"distnn: error: -o {args.output}: {said}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
