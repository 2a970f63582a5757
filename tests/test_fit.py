"""distnn.fit: the trainer as a library, for the user's own model, loss, optimizer and data,
against the independent one-process reference (tests/reference.py)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import distnn
from tests.conftest import (
    as_rank,
    free_port,
    read_events,
    read_losses,
    run_cli,
    start_ranks,
)
from tests.reference import assert_close_run, minibatch_reference


def data(rows=40, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def build(d_in=6, d_out=3):
    return nn.Sequential(nn.Linear(d_in, 12), nn.Tanh(), nn.Linear(12, d_out))


def fit_adamw(out_dir: str, **settings):
    torch.manual_seed(11)
    model = build()
    x, y = data()
    val_x, val_y = data(rows=15, seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    result = distnn.fit(model, train=(x, y), val=(val_x, val_y), loss="cross-entropy",
                        optimizer=optimizer, batch_size=9, log_every=1, seed=11,
                        metrics=os.path.join(out_dir, "m.jsonl"), quiet=True,
                        **{"epochs": None if "steps" in settings else 3, **settings})
    return result


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    as_rank(rank, world, port)
    torch.set_num_threads(1)
    result = fit_adamw(out_dir, device="cpu")
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
              os.path.join(out_dir, f"rank{rank}.safetensors"))


def _rank_with_val_on_rank_0(rank: int, world: int, port: int, out_dir: str) -> None:
    as_rank(rank, world, port)
    try:
        distnn.fit(build(), train=data(), loss="cross-entropy", device="cpu", log_every=0,
                   val=data(rows=15, seed=4) if rank == 0 else None, timeout_s=60)
    except distnn.UsageError as error:
        Path(out_dir, f"rank{rank}.txt").write_text(str(error))


def reference():
    x, y = data()
    # the reference builds the model right after torch.manual_seed(11), as fit_adamw does
    return minibatch_reference(x=x, y=y, seed=11, build=lambda d_in, d_out: build(),
                               batch_size=9, epochs=3, loss="cross-entropy",
                               optimizer="adamw", lr=1e-2, weight_decay=0.05,
                               val=data(rows=15, seed=4))


def test_fit_on_three_ranks_matches_one_process_with_torch_optim(tmp_path):
    start_ranks(_rank, (3, free_port(), str(tmp_path)), nprocs=3)
    losses, weights, val = reference()
    assert_close_run(read_losses(tmp_path / "m.jsonl"), load_file(tmp_path / "rank0.safetensors"),
                     losses, weights)
    got = read_events(tmp_path / "m.jsonl")
    assert [r["step"] for r in got] == [5, 10, 15] == [r["step"] for r in val]
    for mine, want in zip(got, val, strict=True):
        assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert mine["accuracy"] == want["accuracy"]


def test_ranks_given_different_data_are_refused_on_every_rank_before_training(tmp_path):
    # val on rank 0 only: rank 0 alone would call the validation's collective, and wait
    started = time.monotonic()
    start_ranks(_rank_with_val_on_rank_0, (2, free_port(), str(tmp_path)), nprocs=2)
    assert time.monotonic() - started < 50  # not the collective's timeout
    for rank in range(2):
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert said.startswith("the ranks were started differently: validation rows (rank 0 "
                               "15, rank 1 None)"), said


def _resuming_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """fit to 4 steps, resumed to 8, then resumed with a model of other widths: writes
    each rank's validations of the resumed run, the refusal and how long it took."""
    as_rank(rank, world, port)
    ck, said = os.path.join(out_dir, "ck"), {}
    settings = dict(train=data(), val=data(rows=15, seed=4), loss="cross-entropy",
                    batch_size=8, val_every=2, checkpoint_dir=ck, log_every=0, quiet=True)
    with distnn.setup(device="cpu", sharding=False, timeout_s=60) as rt:
        for steps in (4, 8):
            torch.manual_seed(0)
            result = distnn.fit(build(), steps=steps, runtime=rt, **settings)
        said["val"] = [record["step"] for record in result.val]
        wider = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        started = time.monotonic()
        try:
            distnn.fit(wider, steps=12, runtime=rt, **settings)
        except distnn.UsageError as error:
            said["error"], said["s"] = str(error), time.monotonic() - started
        try:  # the runtime forgotten: fit would join a second group
            distnn.fit(build(), steps=12, **settings)
        except distnn.UsageError as error:
            said["no runtime"] = str(error)
    try:  # the group is over
        distnn.fit(build(), steps=12, runtime=rt, **settings)
    except distnn.UsageError as error:
        said["ended"] = str(error)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(said))


def test_a_resume_gives_every_rank_the_validations_and_refuses_another_model_on_all(tmp_path):
    # the checkpoint is rank 0's: what it holds reaches the others in the start-up exchange,
    # so their results hold its validations too, and a model it does not fit (the same
    # arguments, other widths) stops every rank at once, not rank 0 alone
    start_ranks(_resuming_rank, (2, free_port(), str(tmp_path)), nprocs=2)
    ck = tmp_path / "ck"
    for rank in range(2):
        said = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert said["val"] == [2, 4, 6, 8], said
        assert said["error"] == (f"--checkpoint-dir: {ck / 'step-8'} holds weights that do "
                                 "not fit the model: 0.weight [12, 6] (the model's [16, 6]), "
                                 "0.bias [12] (the model's [16]), 2.weight [3, 12] (the "
                                 "model's [3, 16]); allowed: resume with the same model, or "
                                 "use another --checkpoint-dir"), said
        assert said["s"] < 20, said  # not the collective's timeout
        assert said["no runtime"].startswith("distnn.fit: this process is in a process group "
                                             "already (inside `with distnn.setup() as rt:`?); "
                                             "allowed: runtime=rt"), said
        assert said["ended"].startswith("distnn.fit: runtime=rt's process group has ended"), said


class Many(torch.utils.data.Dataset):
    """3000 rows, beyond what start-up reads of a dataset; row 1500 is None."""

    def __len__(self):
        return 3000

    def __getitem__(self, index):
        return None if index == 1500 else (torch.zeros(6), torch.zeros(3))


def test_a_bad_item_a_dataloader_worker_meets_is_one_line(no_launcher):
    with pytest.raises(distnn.UsageError) as error:
        distnn.fit(build(), train=Many(), batch_size=500, steps=6, num_workers=1, log_every=0,
                   quiet=True)
    assert str(error.value).startswith("distnn.fit: the dataset's item ")
    assert "cannot be batched (TypeError: " in str(error.value)
    assert "\n" not in str(error.value)  # not torch's worker traceback


def test_paths_may_be_pathlib_paths_and_a_plateau_scheduler_is_refused(tmp_path, no_launcher):
    result = distnn.fit(build(), train=data(), loss="cross-entropy", steps=2, log_every=0,
                        quiet=True, save=tmp_path / "w.safetensors",
                        metrics=tmp_path / "m.jsonl", checkpoint_dir=tmp_path / "ck")
    assert result.steps == 2 and (tmp_path / "w.safetensors").exists()
    assert (tmp_path / "m.jsonl").exists() and (tmp_path / "ck" / "step-2").is_dir()
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(distnn.UsageError, match="scheduler is a ReduceLROnPlateau, which steps "
                                                "on a metric that fit does not pass it"):
        distnn.fit(model, train=data(), loss="cross-entropy", optimizer=optimizer, steps=2,
                   scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))


def test_a_part_that_fails_to_close_leaves_the_others_closed(tmp_path, no_launcher,
                                                              monkeypatch):
    # the metrics' last flush fails: the checkpoint folder's lock is still let go, so the
    # same process can run on the folder again (a notebook); and when the run itself failed,
    # its error is the one raised, not the close's
    from distnn.run.metrics import StepLog
    from distnn.trainer import Trainer

    def fails(self):
        raise OSError("the last flush failed")

    settings = dict(train=data(), loss="cross-entropy", batch_size=8, log_every=0,
                    checkpoint_dir=str(tmp_path / "ck"), quiet=True)
    with monkeypatch.context() as patch:
        patch.setattr(StepLog, "close", fails)
        with pytest.raises(OSError, match="the last flush failed"):
            distnn.fit(build(), steps=2, **settings)
        patch.setattr(Trainer, "_finish", lambda *args: (_ for _ in ()).throw(
            ValueError("the run's own error")))
        with pytest.raises(ValueError, match="the run's own error"):
            distnn.fit(build(), steps=3, **settings)
    assert distnn.fit(build(), steps=4, **settings).steps == 4  # the folder is free


def test_fit_runs_outside_the_main_thread(no_launcher):
    import threading

    results, errors = [], []

    def train():
        try:
            results.append(distnn.fit(build(), train=data(), loss="cross-entropy",
                                      log_every=0, steps=2))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join(timeout=60)
    assert not errors and results[0].steps == 2, errors


@pytest.mark.parametrize("kwargs, words", [
    ({"device": "gpu"}, "distnn.setup: device='gpu'; allowed: 'auto', 'cpu', 'cuda'"),
    ({"backend": "mpi"}, "distnn.setup: backend='mpi'; allowed: 'auto', 'gloo', 'nccl'"),
    ({"timeout_s": 0}, "distnn.setup: timeout_s=0; allowed: seconds from 1 to 1e6"),
    ({"timeout_s": "30"}, "distnn.setup: timeout_s='30'; allowed: seconds from 1 to 1e6"),
])
def test_setups_arguments_are_checked(kwargs, words, no_launcher):
    with pytest.raises(distnn.UsageError, match=re.escape(words)), distnn.setup(**kwargs):
        pass


def test_shard_bounds_says_what_it_takes():
    assert distnn.shard_bounds(10, 3, 1) == (4, 7)
    for args in ((10, 2, 2), (10.0, 3, 1), (-1, 2, 0)):
        with pytest.raises(ValueError, match="allowed: integers with total >= 0"):
            distnn.shard_bounds(*args)


def test_cross_entropy_takes_class_probabilities_too(no_launcher):
    x, y = data()
    soft = torch.nn.functional.one_hot(y, 3).float() * 0.8 + 0.2 / 3
    result = distnn.fit(build(), train=(x, soft), loss="cross-entropy", log_every=0, steps=2)
    assert result.steps == 2


def test_a_label_the_loss_ignores_is_not_counted_as_a_class(no_launcher):
    x, y = data()
    y[3] = 255  # CrossEntropyLoss(ignore_index=255) leaves these rows out
    loss = nn.CrossEntropyLoss(reduction="sum", ignore_index=255)
    result = distnn.fit(build(), train=(x, y), loss=loss, log_every=0, steps=2)
    assert result.steps == 2


def test_a_loss_of_shape_1_trains_and_validates_as_its_value(no_launcher):
    x, y = data()

    def loss(output, target):  # one value, in shape [1]
        return nn.functional.cross_entropy(output, target, reduction="sum").reshape(1)

    torch.manual_seed(0)
    shaped = distnn.fit(build(), train=(x[:30], y[:30]), val=(x[30:], y[30:]), loss=loss,
                        log_every=0, steps=2, quiet=True)
    torch.manual_seed(0)
    plain = distnn.fit(build(), train=(x[:30], y[:30]), val=(x[30:], y[30:]),
                       loss="cross-entropy", log_every=0, steps=2, quiet=True)
    assert shaped.losses == plain.losses
    assert shaped.val[-1]["loss"] == plain.val[-1]["loss"]


class Items(torch.utils.data.Dataset):
    """16 items, ``make(i)`` each."""

    def __init__(self, make):
        self.make = make

    def __len__(self):
        return 16

    def __getitem__(self, index):
        return self.make(index)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


def test_a_dataset_trains_as_its_tensors_do(tmp_path, no_launcher):
    x, y = data()
    results = []
    for train in ((x, y), Pairs(x, y)):
        torch.manual_seed(0)
        model = build()
        results.append(distnn.fit(model, train=train, loss="cross-entropy", optimizer="momentum",
                                  lr=1e-2, batch_size=8, steps=12, log_every=0, quiet=True))
    for name, tensor in results[0].model.state_dict().items():
        assert torch.equal(results[1].model.state_dict()[name], tensor), name


def test_without_batch_size_a_batch_is_all_of_the_rows(no_launcher):
    x, y = data(rows=70)  # more than the reference's batch of 64
    torch.manual_seed(0)
    result = distnn.fit(build(), train=(x, y), loss="cross-entropy", epochs=2, log_every=0,
                        quiet=True)
    assert result.steps == 2


def test_fit_resumes_bitwise_from_its_checkpoint(tmp_path, no_launcher):
    whole = fit_adamw(str(tmp_path), device="cpu")
    ck = tmp_path / "ck"
    fit_adamw(str(tmp_path), device="cpu", steps=7, checkpoint_dir=str(ck))
    rest = fit_adamw(str(tmp_path), device="cpu", steps=15, checkpoint_dir=str(ck))
    # the 7-step run validated at its end too, and its record is kept
    assert rest.steps == 15 and [r["step"] for r in rest.val] == [5, 7, 10, 15]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(rest.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("kwargs, words", [
    ({"train": "nowhere.safetensors"}, "distnn.fit train: 'nowhere.safetensors' does not exist"),
    ({"train": [1, 2, 3]}, "distnn.fit: train[0] is a int; allowed: a dataset whose items"),
    ({"train": 5}, "distnn.fit: train is a int; allowed: (x, y) tensors"),
    ({"train": []}, "distnn.fit: train holds no rows; allowed: at least one"),
    ({"train": (torch.tensor([[0.0], [float("nan")]]), torch.tensor([0, 1]))},
     "distnn.fit: train holds a non-finite value in its inputs; allowed: finite values"),
    ({"train": (torch.zeros(2, 6), torch.tensor([0, -1])), "loss": "cross-entropy"},
     "distnn.fit: train holds the negative class label -1; allowed"),
    ({"train": (torch.zeros(2, 6), torch.tensor([0, 1]))},
     "train holds integer targets y (class labels?) under loss='mse'; allowed: "
     "floating-point targets with loss='mse', or loss='cross-entropy' for class labels"),
    ({"train": (torch.zeros(3, 6), torch.zeros(2))}, "train holds 3 inputs and 2 targets"),
    ({"hidden": (4,)}, "distnn.fit: got hidden as settings"),
    ({"btach_size": 4}, "distnn.fit: got btach_size, not a setting; allowed: the flags"),
    ({"optimizer": object()}, "optimizer is a object"),
    ({"optimizer": torch.optim.SGD(build().parameters(), lr=0.1)},
     "the optimizer steps 4 tensors that are not the model's parameters; allowed: an "
     "optimizer built on model.parameters()"),
    ({"epochs": 0}, "--epochs: got 0"),
    ({"loss": nn.CrossEntropyLoss()}, "the loss CrossEntropyLoss(reduction='mean') does not "
                                      "sum over the rows, so the ranks' losses and gradients "
                                      "would not add up to the batch's; allowed: "
                                      "reduction='sum'"),
    ({"loss": nn.MSELoss}, "distnn.fit: loss is the class MSELoss; allowed: 'mse'"),
    ({"loss": "cross-entropy", "train": (torch.zeros(4, 6), torch.tensor([0, 1, 7, 2]))},
     "the model gives 3 scores a position but the data holds the class label 7; allowed: a "
     "model with a score for each class, 8 or more"),
    ({"loss": "cross-entropy", "train": (torch.zeros(4, 6), torch.zeros(4))},
     "distnn.fit: train holds targets y of shape [] a row and dtype float32 under "
     "loss='cross-entropy'; allowed: integer class labels (y [N], or one a position: [N, T]), "
     "or class probabilities (y [N, ..., classes])"),
    ({"loss": "cross-entropy", "train": (torch.zeros(4, 6), torch.zeros(4, 1).long())},
     "the model's scores for 2 rows have shape [2, 3] but their labels have [2, 1]"),
    ({"loss": "cross-entropy", "val": (torch.zeros(4, 7), torch.zeros(4).long())},
     "distnn.fit: val holds inputs of shape [7] a row; allowed: [6], as the training "
     "data's"),
    ({"loss": "cross-entropy", "val": (torch.zeros(4, 6), torch.zeros(4))},
     "distnn.fit: val holds floating-point targets; allowed: integer class labels, as the "
     "training data holds"),
    ({"train": (torch.zeros(4, 6), torch.zeros(4, 1)),
      "val": (torch.zeros(4, 6), torch.zeros(4))},
     "distnn.fit: val holds targets of shape [] a row; allowed: [1], as the training "
     "data's"),
    ({"loss": 123}, "distnn.fit: loss is a int; allowed: 'mse'"),
    ({"train": {"x": torch.zeros(4, 6), "y": torch.zeros(4, 3)}},
     "distnn.fit: train is a dict; allowed: (x, y) tensors (a dict of tensors d: (d['x'], "
     "d['y']))"),
    ({"train": (torch.zeros(4, 6).numpy(), torch.zeros(4, 3).numpy())},
     "distnn.fit: train holds ndarray arrays; allowed: (x, y) torch tensors"),
    ({"train": (torch.tensor(1.0), torch.tensor(2.0))},
     "distnn.fit: train holds tensors of shapes [] and []; allowed: rows [N, ...]"),
    ({"optimizer": "OWN", "lr": 5.0, "momentum": 0.5},
     "distnn.fit: got lr=5.0, momentum=0.5 with a torch.optim optimizer, which brings its own"),
    ({"collate_fn": lambda items: items, "num_workers": 2},
     "got collate_fn=<function"),
    ({"train": Items(lambda i: None if i == 5 else (torch.zeros(6), torch.zeros(3))),
      "batch_size": 4, "steps": 3},
     "distnn.fit: the dataset's row 5 cannot be batched (TypeError: "),
    ({"train": (torch.zeros(4, 6), torch.zeros(4, 3, dtype=torch.complex64))},
     "distnn.fit: train holds targets of dtype complex64 and layout strided; allowed: dense"),
    ({"train": (torch.zeros(4, 6).to_sparse(), torch.zeros(4, 3))},
     "distnn.fit: train holds inputs of dtype float32 and layout sparse_coo; allowed: dense"),
    ({"runtime": 5}, "distnn.fit: runtime is a int; allowed: the runtime of `with "
                     "distnn.setup() as rt:`"),
    ({"train": Pairs(torch.zeros(4, 6), torch.zeros(4, 3)),
      "collate_fn": lambda items: (torch.zeros(3, 6), torch.zeros(3, 3))},
     "distnn.fit: the collate_fn made [3, 6] inputs and [3, 3] targets of 1 item; allowed"),
])
def test_bad_fit_arguments_raise_usage_errors(kwargs, words, no_launcher):
    model = build()
    if kwargs.get("optimizer") == "OWN":  # an optimizer of this model's
        kwargs = {**kwargs, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    arguments = {"train": data(), "log_every": 0, **kwargs}
    with pytest.raises(distnn.UsageError, match=re.escape(words)):
        distnn.fit(model, **arguments)


def test_a_data_file_is_checked_as_the_command_line_checks_it(tmp_path, no_launcher):
    x, y = data()
    x[5, 1] = float("nan")
    save_file({"x": x, "y": y}, tmp_path / "nan.safetensors")
    with pytest.raises(distnn.UsageError, match=re.escape(
            "distnn.fit train: " + repr(str(tmp_path / "nan.safetensors"))
            + " holds a non-finite value in x")):
        distnn.fit(build(), train=str(tmp_path / "nan.safetensors"), loss="cross-entropy")


@pytest.mark.parametrize("output", ["save", "metrics"])
def test_an_output_naming_fits_own_data_file_is_refused_and_the_file_kept(tmp_path, output,
                                                                          no_launcher):
    x, y = data()
    path = tmp_path / "d.safetensors"
    save_file({"x": x, "y": y}, path)
    before = path.read_bytes()
    with pytest.raises(distnn.UsageError, match=re.escape(
            f"--{output}: got {str(path)!r}, the file that distnn.fit train names")):
        distnn.fit(build(), train=str(path), loss="cross-entropy", log_every=0,
                   **{output: str(path)})
    assert path.read_bytes() == before


@pytest.mark.parametrize("model, words", [(None, "model is a NoneType"),
                                          (nn.Linear, "model is a type")])
def test_a_model_that_is_not_a_module_instance_is_refused(model, words, no_launcher):
    with pytest.raises(distnn.UsageError, match=re.escape(words)):
        distnn.fit(model, train=data())


def sum_of_squares(prediction, target):
    return ((prediction - target) ** 2).sum()


def sum_of_absolutes(prediction, target):
    return (prediction - target).abs().sum()


def test_a_resume_with_another_loss_or_optimizer_object_is_refused(tmp_path, no_launcher):
    """fit takes the user's own loss and optimizer, which no flag names: the checkpoint
    records their classes (or functions), and a resume with others stops with one line."""
    x = torch.randn(12, 6)
    y = torch.randn(12, 3)
    ck = str(tmp_path / "ck")

    def run(loss, make_optimizer, steps):
        torch.manual_seed(0)
        model = build()
        return distnn.fit(model, train=(x, y), loss=loss, optimizer=make_optimizer(model),
                          batch_size=4, steps=steps, checkpoint_dir=ck, log_every=0,
                          quiet=True)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=1e-2)

    run(sum_of_squares, sgd, 3)
    with pytest.raises(distnn.UsageError, match=re.escape(
            "was made with loss tests.test_fit:sum_of_squares (now "
            "tests.test_fit:sum_of_absolutes); allowed: resume with the same loss")):
        run(sum_of_absolutes, sgd, 6)
    with pytest.raises(distnn.UsageError, match=re.escape(
            "optimizer torch.optim.sgd:SGD (now torch.optim.adam:Adam)")):
        run(sum_of_squares, lambda model: torch.optim.Adam(model.parameters()), 6)
    assert run(sum_of_squares, sgd, 6).steps == 6  # the same objects resume


def test_a_program_without_logging_gets_the_command_lines_messages(tmp_path):
    program = (
        "import torch, distnn\n"
        "x = torch.randn(8, 3); y = torch.randn(8, 2)\n"
        "for steps in (2, 4):\n"
        "    torch.manual_seed(0)\n"
        "    distnn.fit(torch.nn.Linear(3, 2), train=(x, y), steps=steps, log_every=0,\n"
        f"               checkpoint_dir={str(tmp_path / 'ck')!r})\n")
    done = run_cli([sys.executable, "-c", program])
    assert done.returncode == 0, done.stderr
    assert "distnn: note: resuming from " in done.stderr
