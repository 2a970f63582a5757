"""The loss log: the same lines whether flushed once or every step; timing; progress bar."""

from __future__ import annotations

import io
import json

import torch

from distnn import metrics
from distnn.metrics import StepLog


def make_log(losses, path, out, **kwargs) -> StepLog:
    return StepLog(losses=torch.tensor(losses), log_every=kwargs.pop("log_every", 1),
                   batch_size=8, metrics_path=str(path), out=out, **kwargs)


def drive(log: StepLog, steps: int) -> None:
    log.begin()
    for step in range(steps):
        log.record(step)
    log.summary({"steps": steps, "final_loss": log.final_loss()})
    log.close()


def test_batched_flushes_print_what_per_step_printing_would(tmp_path, monkeypatch):
    losses = [652.1390380859375, 3.5, 0.25, 1e-05, 7.0]
    outputs = []
    for flush_seconds in (0.0, 1e9):  # a flush at every step, then one at the end
        monkeypatch.setattr(metrics, "FLUSH_SECONDS", flush_seconds)
        out = io.StringIO()
        path = tmp_path / f"m{flush_seconds}.jsonl"
        drive(make_log(losses, path, out, log_every=2), 5)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        outputs.append((out.getvalue(), [(r.get("step"), r.get("loss")) for r in rows]))
        for row in rows[:-1]:
            assert row["ms_per_step"] > 0 and row["samples_per_s"] > 0
    assert outputs[0] == outputs[1]
    text, rows = outputs[0]
    assert text.splitlines() == ["0 652.1390380859375", "2 0.25", "4 7.0",
                                 "summary: steps=5 final_loss=7"]
    assert rows == [(0, 652.1390380859375), (2, 0.25), (4, 7.0), (None, None)]


def test_close_writes_what_was_recorded_before_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 1e9)
    out = io.StringIO()
    path = tmp_path / "m.jsonl"
    log = make_log([2.0, 1.0, 0.0], path, out)
    log.begin()
    log.record(0)
    log.record(1)
    log.close()  # what the trainer's `finally` does when a step raises
    assert out.getvalue().splitlines() == ["0 2.0", "1 1.0"]
    assert len(path.read_text().splitlines()) == 2


def test_restored_steps_go_to_the_metrics_file_not_to_stdout(tmp_path):
    out = io.StringIO()
    path = tmp_path / "m.jsonl"
    log = make_log([4.0, 3.0, 2.0, 1.0], path, out)
    log.begin(2)
    log.record(2)
    log.record(3)
    log.close()
    assert out.getvalue().splitlines() == ["2 2.0", "3 1.0"]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_the_progress_bar_keeps_the_loss_lines(tmp_path):
    out = io.StringIO()
    drive(make_log([3.0, 2.0, 1.0], tmp_path / "m.jsonl", out, progress=True), 3)
    text = out.getvalue()
    for line in ("0 3.0", "1 2.0", "2 1.0", "summary: steps=3 final_loss=1"):
        assert line in text.splitlines()
    assert "3/3" in text and "loss=1" in text  # the bar, finished


def test_the_bar_appears_on_a_terminal_only(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    on_terminal = StepLog(losses=torch.zeros(2), log_every=1, batch_size=1, metrics_path=None,
                          out=Terminal())
    in_a_log = StepLog(losses=torch.zeros(2), log_every=1, batch_size=1, metrics_path=None,
                       out=io.StringIO())
    assert on_terminal.bar is not None and in_a_log.bar is None
    on_terminal.close()
