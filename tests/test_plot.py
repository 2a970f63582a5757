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


@pytest.mark.parametrize("content, words", [("not json\n", "is not JSON"),
                                             ('{"event": "summary"}\n', "no step rows")])
def test_plot_refuses_a_file_that_is_not_metrics(tmp_path, capsys, content, words):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(content)
    assert plot_main([str(metrics), "-o", str(tmp_path / "x.png")]) == 2
    assert words in capsys.readouterr().err
