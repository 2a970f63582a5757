"""python -m distnn.plot draws a PNG from a metrics file, and refuses a file that is not one."""

from __future__ import annotations

import pytest

from distnn.tools.plot import main as plot_main
from distnn.train import main as train_main

pytest.importorskip("matplotlib")


def test_plot_writes_a_png(tmp_path, capsys, no_launcher):
    metrics, png = tmp_path / "m.jsonl", tmp_path / "loss.png"
    assert train_main(["--steps", "30", "--metrics", str(metrics)]) == 0
    assert plot_main([str(metrics), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_draws_validation_beside_the_training_loss(tmp_path, capsys, no_launcher):
    import numpy as np

    from distnn.tools.plot import read_rows

    generator = np.random.default_rng(0)
    for name, rows in (("train.npz", 50), ("val.npz", 20)):
        x = generator.standard_normal((rows, 4)).astype(np.float32)
        np.savez(tmp_path / name, x=x, y=(x[:, 0] > 0).astype(np.int64))
    metrics, png = tmp_path / "m.jsonl", tmp_path / "loss.png"
    assert train_main(["--data", str(tmp_path / "train.npz"), "--val-data",
                       str(tmp_path / "val.npz"), "--loss", "cross-entropy", "--batch-size",
                       "10", "--epochs", "4", "--lr", "1e-2", "--metrics", str(metrics)]) == 0
    assert len([r for r in read_rows(str(metrics)) if r.get("event") == "val"]) == 4
    assert plot_main([str(metrics), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("content, words", [
    ("not json\n", "m.jsonl:1 is not JSON"),
    ('{"event": "summary"}\n', "no step records with a finite loss"),
    ('{"step": 0, "loss": 1.0}\n[1, 2]\n', "m.jsonl:2 is not a JSON object"),
    ("42\n", "m.jsonl:1 is not a JSON object"),
    ('{"step": 0}\n{"step": 1, "loss": null}\n', "no step records with a finite loss"),
])
def test_plot_refuses_a_file_that_is_not_metrics(tmp_path, capsys, content, words):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(content)
    assert plot_main([str(metrics), "-o", str(tmp_path / "x.png")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distnn: error: {metrics}") and words in (
        lines[0]), lines
    assert not (tmp_path / "x.png").exists()


def test_plot_draws_what_distnn_writes_where_a_value_is_null(tmp_path, capsys):
    # a validation set whose every label is ignored has no accuracy; a run stopped before
    # its first step has no final loss
    metrics, out = tmp_path / "m.jsonl", tmp_path / "out"
    metrics.write_text(
        '{"step": 0, "loss": 2.0, "samples_per_s": 10.0}\n'
        '{"step": 1, "loss": 1.0, "samples_per_s": 11.0}\n'
        '{"event": "val", "step": 1, "loss_per_sample": 0.5, "accuracy": null}\n'
        '{"event": "summary", "world_size": 1, "device": "cpu", "backend": "none", '
        '"final_loss": null}\n')
    assert plot_main([str(metrics), "-o", str(out)]) == 0  # no extension: a PNG, named so
    assert capsys.readouterr().out == f"wrote {out}.png\n"
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("output, words", [
    ("out.xyz", "-o {tmp}/out.xyz: Format 'xyz' is not supported"),
    ("missing/out.png", "-o {tmp}/missing/out.png: No such file or directory"),
    ("", "-o : not a file name"),
])
def test_plot_names_the_output_it_cannot_write(tmp_path, capsys, output, words):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 0, "loss": 1.0}\n')
    path = str(tmp_path / output) if output else ""
    assert plot_main([str(metrics), "-o", path]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "distnn: error: " + words.format(tmp=tmp_path)), lines


def test_plot_s_usage_errors_are_one_line(capsys):
    assert plot_main(["--bogus"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "distnn: error: the following arguments are required: metrics; see python -m "
        "distnn.plot --help"]
