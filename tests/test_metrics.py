"""The loss log: the same lines whether flushed once or every step; timing; progress bar."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from distnn.data.batches import BatchPlan
from distnn.run import metrics
from distnn.run.lossrecord import LossRecord
from distnn.run.metrics import StepLog
from tests.conftest import REPO, clean_env


class Run:
    """A trainer's part: the losses of the steps, put into a LossRecord one by one."""

    def __init__(self, losses, start=0, window=3):
        self.losses = losses
        self.record = LossRecord(torch.device("cpu"), start=start, window=window)

    def step(self, log, step):
        self.record.put(step, torch.tensor(self.losses[step]))
        log.maybe_flush()


def eight_rows_a_step(start, stop):
    return 8 * (stop - start)


def make_log(run, path, out, **kwargs) -> StepLog:
    return StepLog(record=run.record, steps=len(run.losses),
                   log_every=kwargs.pop("log_every", 1),
                   rows_between=kwargs.pop("rows_between", eight_rows_a_step),
                   metrics_path=str(path) if path else None, out=out, **kwargs)


def drive(losses, path, out, **kwargs) -> None:
    run = Run(losses)
    log = make_log(run, path, out, **kwargs)
    log.begin()
    for step in range(len(losses)):
        run.step(log, step)
    log.flush()
    log.summary({"steps": len(losses), "final_loss": run.record.last()})
    log.close()


def test_batched_flushes_print_what_per_step_printing_would(tmp_path, monkeypatch):
    losses = [652.1390380859375, 3.5, 0.25, 1e-05, 7.0]
    outputs = []
    for flush_seconds in (0.0, 1e9):  # a flush at every step, then one at the end
        monkeypatch.setattr(metrics, "FLUSH_SECONDS", flush_seconds)
        out = io.StringIO()
        path = tmp_path / f"m{flush_seconds}.jsonl"
        drive(losses, path, out, log_every=2)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        outputs.append((out.getvalue(), [(r.get("step"), r.get("loss")) for r in rows]))
        for row in rows[:-1]:
            assert row["ms_per_step"] > 0 and row["samples_per_s"] > 0
    assert outputs[0] == outputs[1]
    text, rows = outputs[0]
    assert text.splitlines() == ["0 652.1390380859375", "2 0.25", "4 7.0",
                                 "summary: steps=5 final_loss=7"]
    assert rows == [(0, 652.1390380859375), (2, 0.25), (4, 7.0), (None, None)]


def test_each_window_counts_the_rows_its_steps_had(tmp_path, monkeypatch):
    # 10 rows in batches of 4: every third step is an epoch's last batch, of 2 rows
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 0.0)  # a window per step
    path = tmp_path / "m.jsonl"
    plan = BatchPlan(rows=10, batch_size=4, seed=0)
    drive([1.0] * 6, path, io.StringIO(), rows_between=plan.rows_between)
    rows = [json.loads(line) for line in path.read_text().splitlines()][:-1]
    per_step = [r["samples_per_s"] * r["ms_per_step"] / 1e3 for r in rows]
    assert [round(n) for n in per_step] == [4, 4, 2, 4, 4, 2]


def test_close_writes_what_was_recorded_before_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 1e9)
    out = io.StringIO()
    path = tmp_path / "m.jsonl"
    run = Run([2.0, 1.0, 0.0])
    log = make_log(run, path, out)
    log.begin()
    run.step(log, 0)
    run.step(log, 1)
    log.close()  # what the trainer's `finally` does when a step raises
    assert out.getvalue().splitlines() == ["0 2.0", "1 1.0"]
    assert len(path.read_text().splitlines()) == 2


def test_a_resumed_run_goes_on_with_the_metrics_of_the_steps_before_it(tmp_path):
    path = tmp_path / "m.jsonl"
    earlier = [{"step": 0, "loss": 4.0}, {"step": 1, "loss": 3.0}, {"event": "val", "step": 2},
               {"step": 2, "loss": 2.0}, {"event": "val", "step": 3}, {"event": "summary"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in earlier) + '{"step": 3, "lo')
    out = io.StringIO()
    run = Run([4.0, 3.0, 2.5, 1.5], start=2)
    log = make_log(run, path, out)
    log.begin(2)  # the checkpoint was at step 2: later records are the cut-off run's
    run.step(log, 2)
    run.step(log, 3)
    log.close()
    assert out.getvalue().splitlines() == ["2 2.5", "3 1.5"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r.get("event"), r["step"], r.get("loss")) for r in rows] == [
        (None, 0, 4.0), (None, 1, 3.0), ("val", 2, None), (None, 2, 2.5), (None, 3, 1.5)]


def test_a_resume_killed_while_it_rewrites_the_metrics_leaves_the_earlier_file_whole(
        tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    earlier = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(4))
    path.write_text(earlier)

    def killed(*args):
        raise KeyboardInterrupt  # as a kill between writing the kept records and using them

    monkeypatch.setattr(os, "replace", killed)
    log = make_log(Run([1.0] * 6, start=2), path, io.StringIO())
    with pytest.raises(KeyboardInterrupt):
        log.begin(2)
    assert path.read_text() == earlier and [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_a_metrics_file_that_cannot_be_opened_warns_and_the_run_goes_on(tmp_path, caplog):
    run = Run([3.0, 2.0])
    log = make_log(run, tmp_path, io.StringIO())  # a folder: open() fails
    log.begin()
    run.step(log, 0)
    log.close()
    assert "could not write --metrics" in caplog.text


def test_the_record_is_bounded_on_the_device_and_pulls_when_its_window_is_full():
    record = LossRecord(torch.device("cpu"), window=4)
    pulled = []
    record.listeners.append(lambda first, values: pulled.append((first, values)))
    for step in range(10):
        record.put(step, torch.tensor(float(step)))
    assert pulled == [(0, [0.0, 1.0, 2.0, 3.0]), (4, [4.0, 5.0, 6.0, 7.0])]
    record.pull()
    assert pulled[-1] == (8, [8.0, 9.0]) and record.last() == 9.0 and record.first_bad is None
    record.put(10, torch.tensor(float("nan")))
    record.pull()
    assert record.first_bad[0] == 10 and record.first_bad[2] == 9.0


def test_a_loss_of_one_value_in_another_shape_is_recorded_as_indexing_took_it():
    """A user's loss may hold its one value as [1] or [1, 1] (a sum over the rows only)."""
    record = LossRecord(torch.device("cpu"), window=4)
    for step, loss in enumerate((torch.tensor([1.5]), torch.tensor([[2.5]]), torch.tensor(3.5))):
        record.put(step, loss)
    record.pull()
    assert list(record.tail) == [1.5, 2.5, 3.5]


def test_the_progress_bar_keeps_the_loss_lines(tmp_path):
    out = io.StringIO()
    drive([3.0, 2.0, 1.0], tmp_path / "m.jsonl", out, progress=True)
    text = out.getvalue()
    for line in ("0 3.0", "1 2.0", "2 1.0", "summary: steps=3 final_loss=1"):
        assert line in text.splitlines()
    assert "3/3" in text and "loss=1" in text  # the bar, finished


@pytest.mark.parametrize("reported, environ, size", [
    ((120, 40), {}, (120, 40)),  # a terminal that knows its size
    ((0, 0), {}, (80, 24)),  # a pty that reports none: tqdm alone would take -1 lines, no bar
    (None, {}, (80, 24)),  # no terminal at all (a bar asked for with progress=True)
    ((120, 0), {}, (120, 24)),
    ((0, 0), {"COLUMNS": "100", "LINES": "30"}, (100, 30)),  # as shutil.get_terminal_size
    ((120, 40), {"COLUMNS": "60"}, (60, 40)),
    ((0, 0), {"COLUMNS": "wide", "LINES": "-3"}, (80, 24)),
])
def test_the_bar_size_falls_back_where_the_terminal_reports_none(reported, environ, size):
    assert metrics.bar_size(reported, environ) == size


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("script") is None,
                    reason="needs util-linux's script (a pseudo-terminal)")
@pytest.mark.parametrize("stty, columns", [("", 80), ("stty cols 100 rows 30; ", 100)])
def test_the_bar_shows_in_a_pseudo_terminal_with_or_without_a_size(stty, columns):
    env = {k: v for k, v in clean_env().items() if k not in ("COLUMNS", "LINES")}
    # `script` outside a terminal gives the command a pty of 0 x 0 unless stty sizes it
    command = f"{stty}{shlex.quote(sys.executable)} -m distnn.train --steps 20 --log-every 0"
    done = subprocess.run(["script", "-q", "-c", command, "/dev/null"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    bars = [line for line in done.stdout.replace("\r", "\n").splitlines() if "20/20" in line]
    assert bars and len(bars[-1]) == columns, done.stdout[-2000:]


def test_the_bar_appears_on_a_terminal_only(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    on_terminal = make_log(Run([1.0, 2.0]), None, Terminal())
    in_a_log = make_log(Run([1.0, 2.0]), None, io.StringIO())
    assert on_terminal.bar is not None and in_a_log.bar is None
    on_terminal.close()
