"""The loss log: the same lines whether flushed once or every step."""

from __future__ import annotations

import io
import json

import torch

from distnn import metrics
from distnn.metrics import StepLog


def drive(log: StepLog, losses: list[float]) -> None:
    for step, loss in enumerate(losses):
        log.losses[step] = loss
        log.record(step)
    log.summary({"steps": len(losses), "final_loss": log.final_loss()})
    log.close()


def test_batched_flushes_print_what_per_step_printing_would(tmp_path, monkeypatch):
    losses = [652.1390380859375, 3.5, 0.25, 1e-05, 7.0]
    outputs = []
    for flush_seconds in (0.0, 1e9):  # a flush at every step, then one at the end
        monkeypatch.setattr(metrics, "FLUSH_SECONDS", flush_seconds)
        out = io.StringIO()
        path = tmp_path / f"m{flush_seconds}.jsonl"
        drive(StepLog(losses=torch.zeros(5), log_every=2, metrics_path=str(path), out=out),
              losses)
        outputs.append((out.getvalue(), path.read_text()))
    assert outputs[0] == outputs[1]
    text, jsonl = outputs[0]
    assert text.splitlines() == ["0 652.1390380859375", "2 0.25", "4 7.0",
                                 "summary: steps=5 final_loss=7"]
    rows = [json.loads(line) for line in jsonl.splitlines()]
    assert rows == [{"step": 0, "loss": 652.1390380859375}, {"step": 2, "loss": 0.25},
                    {"step": 4, "loss": 7.0}, {"event": "summary", "steps": 5, "final_loss": 7.0}]


def test_close_writes_what_was_recorded_before_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 1e9)
    out = io.StringIO()
    path = tmp_path / "m.jsonl"
    log = StepLog(losses=torch.tensor([2.0, 1.0, 0.0]), log_every=1, metrics_path=str(path),
                  out=out)
    log.record(0)
    log.record(1)
    log.close()  # what the trainer's `finally` does when a step raises
    assert out.getvalue().splitlines() == ["0 2.0", "1 1.0"]
    assert len(path.read_text().splitlines()) == 2


def test_restored_steps_go_to_the_metrics_file_not_to_stdout(tmp_path):
    out = io.StringIO()
    path = tmp_path / "m.jsonl"
    log = StepLog(losses=torch.tensor([4.0, 3.0, 2.0, 1.0]), log_every=1, metrics_path=str(path),
                  out=out)
    log.restore(2)
    log.record(2)
    log.record(3)
    log.close()
    assert out.getvalue().splitlines() == ["2 2.0", "3 1.0"]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
