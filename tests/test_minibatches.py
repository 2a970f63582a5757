"""Mini-batches over a data file: the run on 1 to 4 ranks equals one process training with
torch.optim in the documented order (tests/reference.py), with validation, classification,
a user's model, and resume in the middle of an epoch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distnn.data.batches import BatchPlan
from distnn.train import main
from tests.conftest import read_events, read_losses, run_world
from tests.reference import assert_close_run, minibatch_reference
from tests.user_models import routed


def regression(rows=23, d_in=6, d_out=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, d_in, generator=generator),
            torch.randn(rows, d_out, generator=generator))


def classes(rows=30, d_in=5, count=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=generator)
    return x, torch.randint(0, count, (rows,), generator=generator)


def save(path, x, y):
    if path.suffix == ".npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    else:
        save_file({"x": x.contiguous(), "y": y.contiguous()}, path)
    return str(path)


def test_the_order_is_randperm_seeded_with_seed_plus_epoch():
    plan = BatchPlan(rows=10, batch_size=4, seed=7)
    assert plan.per_epoch == 3 and not plan.uniform
    for epoch in range(2):
        generator = torch.Generator()
        generator.manual_seed(7 + epoch)
        perm = torch.randperm(10, generator=generator)
        got = [plan.indices(epoch * 3 + k) for k in range(3)]
        assert [t.tolist() for t in got] == [perm[:4].tolist(), perm[4:8].tolist(),
                                             perm[8:].tolist()]
    dropped = BatchPlan(rows=10, batch_size=4, seed=7, drop_last=True, shuffle=False)
    assert dropped.per_epoch == 2 and dropped.indices(2).tolist() == [0, 1, 2, 3]
    # a batch of 2 on 4 ranks: two shards of one row, two empty ones, the same rows in all
    shards = [BatchPlan(rows=10, batch_size=4, seed=7).shard(2, 4, rank) for rank in range(4)]
    assert [len(s) for s in shards] == [1, 1, 0, 0]
    assert torch.cat(shards).tolist() == plan.indices(2).tolist()


@pytest.mark.parametrize("rows, batch_size, drop_last", [
    (10, 4, False), (10, 4, True), (12, 4, False), (3, 8, False)])
def test_rows_between_counts_each_batch_as_the_rows_it_has(rows, batch_size, drop_last):
    plan = BatchPlan(rows=rows, batch_size=min(batch_size, rows) if drop_last else batch_size,
                     seed=0, drop_last=drop_last)
    sizes = [len(plan.indices(step)) for step in range(4 * plan.per_epoch + 1)]
    for start in range(len(sizes)):
        for stop in range(start, len(sizes) + 1):
            assert plan.rows_between(start, stop) == sum(sizes[start:stop])


@pytest.mark.parametrize("world, flags, reference", [
    # the last batch (3 rows) smaller than the world (4 ranks): empty shards
    (4, ["--batch-size", "5", "--epochs", "4", "--lr", "1e-2", "--optimizer", "momentum"],
     {"batch_size": 5, "epochs": 4, "lr": 1e-2, "optimizer": "momentum"}),
    (3, ["--batch-size", "4", "--steps", "20", "--no-shuffle", "--lr", "3e-3",
         "--optimizer", "adamw", "--weight-decay", "0.1"],
     {"batch_size": 4, "steps": 20, "shuffle": False, "lr": 3e-3, "optimizer": "adamw",
      "weight_decay": 0.1}),
    (2, ["--batch-size", "6", "--epochs", "3", "--drop-last", "--lr", "1e-2", "--seed", "3"],
     {"batch_size": 6, "epochs": 3, "drop_last": True, "lr": 1e-2, "seed": 3}),
])
def test_regression_in_mini_batches_matches_one_process(tmp_path, world, flags, reference):
    x, y = regression()
    data = save(tmp_path / "d.safetensors", x, y)
    result = run_world(world, ["--data", data, "--hidden", "8", *flags], tmp_path / "run")
    losses, weights, _ = minibatch_reference(x=x, y=y, hidden=(8,), **reference)
    assert_close_run(result["losses"], result["weights"][0], losses, weights)
    for other in result["weights"][1:]:  # the replicas are identical
        assert all(torch.equal(other[k], result["weights"][0][k]) for k in other)


def test_one_process_matches_with_validation(tmp_path, capsys, no_launcher):
    x, y = regression(rows=17)
    val_x, val_y = regression(rows=9, seed=5)
    data, val = save(tmp_path / "d.npz", x, y), save(tmp_path / "v.npz", val_x, val_y)
    metrics = tmp_path / "m.jsonl"
    assert main(["--data", data, "--val-data", val, "--batch-size", "4", "--epochs", "2",
                 "--hidden", "8", "--lr", "1e-2", "--metrics", str(metrics),
                 "--save", str(tmp_path / "w.safetensors")]) == 0
    losses, weights, val_results = minibatch_reference(x=x, y=y, val=(val_x, val_y),
                                                      batch_size=4, epochs=2, hidden=(8,),
                                                      lr=1e-2)
    assert_close_run(read_losses(metrics), load_file(tmp_path / "w.safetensors"), losses,
                     weights)
    got = read_events(metrics)
    assert [r["step"] for r in got] == [5, 10] == [r["step"] for r in val_results]
    for mine, want in zip(got, val_results, strict=True):
        assert mine["samples"] == 9 and mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert mine["loss_per_sample"] == pytest.approx(want["loss"] / 9, rel=1e-5)
    out = capsys.readouterr().out
    assert "val 5 loss=" in out and "loss_per_sample=" in out


def test_without_batch_size_a_batch_is_all_of_the_files_rows(tmp_path, no_launcher):
    x, y = regression(rows=70)  # more than the reference's batch of 64
    metrics = tmp_path / "m.jsonl"
    assert main(["--data", save(tmp_path / "d.safetensors", x, y), "--epochs", "3",
                 "--hidden", "8", "--lr", "1e-2", "--metrics", str(metrics),
                 "--save", str(tmp_path / "w.safetensors")]) == 0
    losses, weights, _ = minibatch_reference(x=x, y=y, batch_size=70, epochs=3, hidden=(8,),
                                             lr=1e-2)
    assert len(losses) == 3  # one step an epoch
    assert_close_run(read_losses(metrics), load_file(tmp_path / "w.safetensors"), losses,
                     weights)


def test_bf16_validation_evaluates_as_the_step_computes(tmp_path, no_launcher):
    """Under --precision bf16 validation runs in bf16 autocast too: the last validation is
    the saved weights' loss under autocast, not their fp32 loss."""
    x, y = regression(rows=16)
    val_x, val_y = regression(rows=9, seed=5)
    data, val = save(tmp_path / "d.npz", x, y), save(tmp_path / "v.npz", val_x, val_y)
    metrics, saved = tmp_path / "m.jsonl", tmp_path / "w.safetensors"
    assert main(["--data", data, "--val-data", val, "--batch-size", "8", "--steps", "6",
                 "--hidden", "8", "--lr", "1e-2", "--precision", "bf16", "--metrics",
                 str(metrics), "--save", str(saved)]) == 0
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model.load_state_dict(load_file(saved))
    loss_fn = torch.nn.MSELoss(reduction="sum")
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = loss_fn(model(val_x), val_y).item()
        fp32 = loss_fn(model(val_x), val_y).item()
    got = read_events(metrics)[-1]
    assert got["step"] == 6 and got["loss"] == pytest.approx(want, rel=1e-6)
    assert got["loss"] != pytest.approx(fp32, rel=1e-5)


def test_classification_with_adamw_and_validation_on_two_ranks(tmp_path):
    x, y = classes()
    val_x, val_y = classes(rows=11, seed=9)
    data, val = save(tmp_path / "d.safetensors", x, y), save(tmp_path / "v.safetensors",
                                                              val_x, val_y)
    result = run_world(2, ["--data", data, "--val-data", val, "--loss", "cross-entropy",
                           "--batch-size", "7", "--steps", "12", "--val-every", "5",
                           "--optimizer", "adamw", "--lr", "1e-2", "--hidden", "8",
                           "--d-out", "5"], tmp_path / "run")
    losses, weights, val_results = minibatch_reference(
        x=x, y=y, val=(val_x, val_y), loss="cross-entropy", batch_size=7, steps=12,
        val_every=5, optimizer="adamw", lr=1e-2, hidden=(8,), d_out=5)
    assert_close_run(result["losses"], result["weights"][0], losses, weights)
    assert [r["step"] for r in result["val"]] == [5, 10, 12]
    for mine, want in zip(result["val"], val_results, strict=True):
        assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert mine["accuracy"] == want["accuracy"]


def test_a_model_whose_ranks_skip_different_parameters_matches_one_process(tmp_path):
    x, y = regression(rows=24, d_in=6, d_out=2, seed=4)
    data = save(tmp_path / "d.safetensors", x, y)
    # one expert (6*2 + 2 floats) per bucket: four buckets, started in one order
    result = run_world(3, ["--data", data, "--model", "tests.user_models:routed",
                           "--batch-size", "5", "--epochs", "2", "--lr", "1e-2",
                           "--bucket-mb", str(14 * 4 / 2**20)], tmp_path / "run")
    losses, weights, _ = minibatch_reference(x=x, y=y, build=routed, batch_size=5, epochs=2,
                                             lr=1e-2)
    assert_close_run(result["losses"], result["weights"][0], losses, weights)


def test_resume_mid_epoch_is_bitwise_on_the_same_world_and_close_on_another(tmp_path):
    x, y = classes(rows=26)
    data = save(tmp_path / "d.safetensors", x, y)
    flags = ["--data", data, "--loss", "cross-entropy", "--batch-size", "4", "--hidden", "8",
             "--optimizer", "adamw", "--lr", "1e-2", "--checkpoint-every", "100"]
    whole = run_world(2, [*flags, "--steps", "17"], tmp_path / "whole")
    ck = tmp_path / "ck"
    run_world(2, [*flags, "--steps", "9", "--checkpoint-dir", str(ck)], tmp_path / "first")
    state = (ck / "step-9" / "state.json").read_text()
    assert '"epoch": 1' in state and '"batch_in_epoch": 2' in state  # 7 batches per epoch
    assert (ck / "step-9" / "optimizer.safetensors").exists()
    shutil.copytree(ck, tmp_path / "ck3")
    rest = run_world(2, [*flags, "--steps", "17", "--checkpoint-dir", str(ck)],
                     tmp_path / "rest")
    assert rest["losses"] == whole["losses"][9:]  # its own metrics file starts at step 9
    for name, tensor in whole["weights"][0].items():
        assert torch.equal(rest["weights"][0][name], tensor), name
    other = run_world(3, [*flags, "--steps", "17", "--checkpoint-dir", str(tmp_path / "ck3")],
                      tmp_path / "other")
    losses, weights, _ = minibatch_reference(x=x, y=y, loss="cross-entropy", batch_size=4,
                                             hidden=(8,), optimizer="adamw", lr=1e-2, steps=17)
    assert_close_run(whole["losses"][:9] + other["losses"], other["weights"][0], losses,
                     weights)


def test_frozen_parameters_and_buffers_are_rank_0s_on_every_rank(tmp_path):
    # the model draws its frozen layer and a buffer from a seed of the rank's own
    x, y = classes(rows=12)
    data = save(tmp_path / "d.safetensors", x, y)
    result = run_world(2, ["--data", data, "--loss", "cross-entropy", "--batch-size", "4",
                           "--model", "tests.user_models:frozen_first_layer_of_the_rank",
                           "--steps", "6"], tmp_path / "run")
    rank0, rank1 = result["weights"]
    assert rank0["scale"].item() == 1.0  # rank 0's
    for name, tensor in rank0.items():
        assert torch.equal(rank1[name], tensor), name


def test_a_resume_on_other_data_of_the_same_rows_is_refused(tmp_path, capsys, no_launcher):
    x, y = classes(rows=20)
    first = save(tmp_path / "a.safetensors", x, y)
    flags = ["--loss", "cross-entropy", "--batch-size", "5", "--hidden", "4", "--device",
             "cpu", "--log-every", "0", "--checkpoint-dir", str(tmp_path / "ck")]
    assert main(["--data", first, "--steps", "4", *flags]) == 0
    other = save(tmp_path / "b.safetensors", x.flip(0), y.flip(0))  # the same rows, reordered
    capsys.readouterr()
    assert main(["--data", other, "--steps", "8", *flags]) == 2
    assert "was made on other data (the same 20 rows, but other values, order or dtypes)" in (
        capsys.readouterr().err)
    copy = shutil.copy(first, tmp_path / "copy.safetensors")  # the same bytes elsewhere
    assert main(["--data", str(copy), "--steps", "8", *flags]) == 0


def test_the_datas_digest_is_of_its_rows_in_any_container(tmp_path):
    from distnn.data.batches import TensorRows
    from distnn.data.datafile import DataFile
    from distnn.run.startup import rows_digest

    x, y = classes(rows=20)
    as_tensors = rows_digest(TensorRows(x, y))
    assert rows_digest(DataFile(save(tmp_path / "a.safetensors", x, y))) == as_tensors
    for name in ("a.pt", "b.pt"):  # torch.save writes the file's name into the archive
        torch.save({"x": x, "y": y}, tmp_path / name)
        assert rows_digest(DataFile(str(tmp_path / name))) == as_tensors
    assert rows_digest(TensorRows(x.flip(0), y.flip(0))) != as_tensors
    assert rows_digest(TensorRows(x.double(), y)) != as_tensors


def test_a_resume_with_another_learning_rate_says_so(tmp_path, capsys, no_launcher):
    x, y = classes(rows=20)
    data = save(tmp_path / "a.safetensors", x, y)
    flags = ["--data", data, "--loss", "cross-entropy", "--batch-size", "5", "--hidden", "4",
             "--device", "cpu", "--log-every", "0", "--checkpoint-dir", str(tmp_path / "ck")]
    assert main([*flags, "--steps", "4", "--lr", "1e-2"]) == 0
    capsys.readouterr()
    assert main([*flags, "--steps", "8", "--lr", "1e-3"]) == 0
    assert (f"warning: resuming {tmp_path / 'ck' / 'step-4'}, made with --lr 0.01 (now 0.001): "
            "the steps after it follow this run's settings") in capsys.readouterr().err
