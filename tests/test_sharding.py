"""--shard optimizer, gradients, parameters: the sharded run equals one process training
with plain torch (no FSDP, no ZeroRedundancyOptimizer): a small GPT (two blocks) and an MLP,
SGD, momentum and AdamW, sum and mean losses, clipping, a schedule, micro-batches,
--activation-checkpointing and shards left empty by a small last batch, on 2 to 4 real gloo
ranks. A sharded checkpoint (each rank's shards, written with DCP) resumes bitwise on the
same world size and mode, and onto another world size and mode within the tolerance.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from distnn.errors import UsageError
from distnn.models.gpt import build
from distnn.resilience.checkpoint import read_checkpoint
from distnn.train import main
from tests.conftest import (
    _rank_worker,
    as_rank,
    free_port,
    read_metrics,
    run_world,
    start_ranks,
)
from tests.reference import assert_close_run
from tests.test_language_model import CONTEXT, VOCAB, byte_rows
from tests.test_recipe import rate_factor


def plain_torch(model, x, y, *, loss, optimizer, lr, steps, batch_size, mean=False, clip=None,
                warmup=0, min_lr=0.0):
    """One process, plain torch, the documented batch order: each step's loss and the
    weights. ``optimizer`` "sgd" is the reference program's ``p -= lr * p.grad``; with a
    ``warmup``, the rate follows the cosine schedule."""
    params = list(model.parameters())
    opt = {"momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
           "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
           "sgd": lambda: None}[optimizer]()
    scheduler = opt and warmup and torch.optim.lr_scheduler.LambdaLR(opt, lambda s: rate_factor(
        "cosine", s, lr=lr, total=steps, warmup=warmup, min_lr=min_lr))
    reduction = "mean" if mean else "sum"
    per_epoch = -(-len(x) // batch_size)
    losses = []
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        batch = order[k * batch_size:(k + 1) * batch_size]
        out = model(x[batch])
        if loss == "cross-entropy":
            value = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[batch].reshape(-1),
                                    reduction=reduction, ignore_index=-100)
        else:
            value = F.mse_loss(out, y[batch], reduction=reduction)
        model.zero_grad()
        value.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if opt is None:
            with torch.no_grad():
                for p in params:
                    p -= lr * p.grad
        else:
            opt.step()
            if scheduler:
                scheduler.step()
        losses.append(value.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def gpt():
    torch.manual_seed(0)
    return build(d_in=CONTEXT, d_out=VOCAB, d_model=32)


def mlp(d_in=6, d_out=2):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, d_out))


def regression(rows=37, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=generator), torch.randn(rows, 2, generator=generator)


GPT_FLAGS = ["--model", "distnn.models.gpt:build", "--model-args", '{"d_model": 32}',
             "--d-out", str(VOCAB), "--loss", "cross-entropy"]

CASES = {
    # 21 rows in batches of 5: the last batch of 1 row leaves 2 of 3 ranks empty
    "parameters-gpt-adamw-mean-clip-micro": dict(
        world=3, mode="parameters", model="gpt", optimizer="adamw", lr=3e-3, batch_size=5,
        steps=25, mean=True, clip=1.0, warmup=4, min_lr=3e-4,
        flags=["--micro-batches", "2", "--activation-checkpointing"]),
    "gradients-mlp-momentum-sum": dict(
        world=2, mode="gradients", model="mlp", optimizer="momentum", lr=1e-2, batch_size=8,
        steps=20, flags=[]),
    "optimizer-gpt-adamw-mean-clip": dict(
        world=4, mode="optimizer", model="gpt", optimizer="adamw", lr=3e-3, batch_size=6,
        steps=20, mean=True, clip=1.0, warmup=4, min_lr=3e-4,
        flags=["--activation-checkpointing"]),
    "parameters-gpt-adamw-compile": dict(
        world=2, mode="parameters", model="gpt", optimizer="adamw", lr=3e-3, batch_size=6,
        steps=20, flags=["--compile"]),
    "parameters-mlp-sgd-clip": dict(
        world=2, mode="parameters", model="mlp", optimizer="sgd", lr=1e-2, batch_size=8,
        steps=20, clip=0.5, flags=[]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_sharded_run_equals_plain_torch(tmp_path, name):
    case = CASES[name]
    if case["model"] == "gpt":
        x, y = byte_rows()
        model_flags, reference_model, loss = GPT_FLAGS, gpt(), "cross-entropy"
    else:
        x, y = regression()
        model_flags, reference_model, loss = ["--hidden", "16"], mlp(), "mse"
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    flags = ["--data", str(tmp_path / "d.safetensors"), *model_flags, "--shard", case["mode"],
             "--optimizer", case["optimizer"], "--lr", str(case["lr"]), "--batch-size",
             str(case["batch_size"]), "--steps", str(case["steps"]), *case["flags"]]
    if case.get("mean"):
        flags += ["--loss-reduction", "mean"]
    if case.get("clip"):
        flags += ["--clip-grad-norm", str(case["clip"])]
    if case.get("warmup"):
        flags += ["--lr-schedule", "cosine", "--warmup-steps", str(case["warmup"]),
                  "--min-lr", str(case["min_lr"])]
    run = run_world(case["world"], flags, tmp_path / "run")
    losses, weights = plain_torch(reference_model, x, y, loss=loss,
                                  optimizer=case["optimizer"], lr=case["lr"],
                                  steps=case["steps"], batch_size=case["batch_size"],
                                  mean=case.get("mean", False), clip=case.get("clip"),
                                  warmup=case.get("warmup", 0), min_lr=case.get("min_lr", 0.0))
    # every rank ends with the whole weights of the one-process run (gathered for --save-like
    # output by the test worker: sharded ranks save their gathered state)
    assert_close_run(run["losses"], run["weights"][0], losses, weights)


def test_a_sharded_checkpoint_resumes_bitwise_and_onto_another_world_and_mode(tmp_path):
    x, y = byte_rows()
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    flags = ["--data", str(tmp_path / "d.safetensors"), *GPT_FLAGS, "--optimizer", "adamw",
             "--lr", "3e-3", "--batch-size", "6", "--steps", "8", "--loss-reduction", "mean",
             "--clip-grad-norm", "1.0", "--checkpoint-every", "4"]
    whole = run_world(2, [*flags, "--shard", "parameters", "--checkpoint-dir",
                          str(tmp_path / "ck")], tmp_path / "whole")
    # each rank wrote its own shards (DCP), every file under the checksums of state.json
    step_4 = tmp_path / "ck" / "step-4"
    state = json.loads((step_4 / "state.json").read_text())
    assert state["format"] == "sharded" and not (step_4 / "weights.safetensors").exists()
    assert {"shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"} <= set(
        state["sha256"])
    assert read_checkpoint(str(step_4)).sharded
    broken = tmp_path / "broken"
    shutil.copytree(step_4, broken)
    with open(broken / "shards" / "__1_0.distcp", "r+b") as part:
        part.seek(100)
        byte = part.read(1)
        part.seek(100)
        part.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match="__1_0.distcp does not match its checksum"):
        read_checkpoint(str(broken))
    # the same world and mode from step 4: bitwise
    shutil.copytree(tmp_path / "ck", tmp_path / "ck-same")
    shutil.rmtree(tmp_path / "ck-same" / "step-8")
    same = run_world(2, [*flags, "--shard", "parameters", "--checkpoint-dir",
                         str(tmp_path / "ck-same")], tmp_path / "same")
    assert same["losses"] == whole["losses"][4:]
    assert all(torch.equal(same["weights"][0][k], v) for k, v in whole["weights"][0].items())
    # onto one process, unsharded, onto 3 ranks sharding the optimizer, and onto 3 ranks
    # shards of the parameters' gradients (DCP reshards at load time): within tolerance
    for world, mode in ((1, "none"), (3, "optimizer"), (3, "gradients")):
        folder = tmp_path / f"ck-{world}-{mode}"
        shutil.copytree(tmp_path / "ck", folder)
        shutil.rmtree(folder / "step-8")
        other = run_world(world, [*flags, "--shard", mode, "--checkpoint-dir", str(folder)],
                          tmp_path / f"other-{world}-{mode}")
        assert_close_run(other["losses"], other["weights"][0], whole["losses"][4:],
                         whole["weights"][0])
    records = [r for r in read_metrics(tmp_path / "same" / "metrics.jsonl") if "step" in r]
    assert records[0]["step"] == 4


def _node_worker(rank: int, world_size: int, port: int, argv: list[str], out_dir: str) -> None:
    """A rank whose working directory is its own "node"'s: a relative --checkpoint-dir then
    names a folder that only this rank sees, as a node's local disk would."""
    import os

    os.makedirs(os.path.join(out_dir, f"node{rank}"), exist_ok=True)
    os.chdir(os.path.join(out_dir, f"node{rank}"))
    _rank_worker(rank, world_size, port, argv, out_dir)


def test_a_checkpoint_folder_the_ranks_do_not_share_gets_whole_checkpoints(tmp_path):
    x, y = byte_rows()
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    flags = ["--data", str(tmp_path / "d.safetensors"), *GPT_FLAGS, "--optimizer", "adamw",
             "--batch-size", "6", "--shard", "parameters", "--device", "cpu",
             "--log-every", "0"]

    def on_nodes(steps: int) -> None:
        start_ranks(_node_worker, (2, free_port(), [*flags, "--steps", str(steps),
                                                    "--checkpoint-dir", "ck"], str(tmp_path)),
                    nprocs=2)

    on_nodes(2)
    # rank 1 could not see rank 0's folder: the shards were gathered onto rank 0
    step_2 = tmp_path / "node0" / "ck" / "step-2"
    assert sorted(p.name for p in step_2.iterdir()) == [
        "losses.safetensors", "optimizer.safetensors", "state.json", "weights.safetensors"]
    assert not (tmp_path / "node1" / "ck").exists()
    # a sharded checkpoint cannot be read there: one line, on every rank
    run_world(2, [*flags, "--steps", "2", "--checkpoint-dir", str(tmp_path / "sharded")],
              tmp_path / "first")
    shutil.rmtree(tmp_path / "node0" / "ck")
    shutil.copytree(tmp_path / "sharded", tmp_path / "node0" / "ck")
    with pytest.raises(mp.ProcessRaisedException, match="is sharded .each rank wrote its own "
                       "part. and not every rank sees the folder rank 0 does"):
        on_nodes(4)


def test_save_writes_the_whole_weights_of_a_sharded_run(tmp_path):
    x, y = regression()
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    run = run_world(2, ["--data", str(tmp_path / "d.safetensors"), "--hidden", "16",
                        "--batch-size", "8", "--steps", "4", "--shard", "parameters",
                        "--lr", "1e-2", "--save", str(tmp_path / "w.safetensors")],
                    tmp_path / "run")
    saved = load_file(tmp_path / "w.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "0.weight": (16, 6), "0.bias": (16,), "2.weight": (2, 16), "2.bias": (2,)}
    assert all(torch.equal(saved[k], v) for k, v in run["weights"][0].items())


def embedding_only(*, d_in, d_out):
    """A model of token ids without blocks."""
    return torch.nn.Sequential(torch.nn.Embedding(d_out, 8), torch.nn.Linear(8, d_out))


@pytest.mark.parametrize("flags, words", [
    (["--shard", "parameters", "--shard-blocks", "Nothing", "--model",
      "distnn.models.gpt:build"], "--shard-blocks: got Nothing, which names no module of the "
                                  "model; allowed: class names of its modules (Block"),
    (["--shard", "optimizer", "--shard-blocks", "Block"], "--shard-blocks: got 'Block' with "
                                                          "--shard optimizer"),
    (["--shard", "parameters", "--cuda-graph"], "--cuda-graph: got it with --shard parameters"),
    (["--shard", "zero"], "--shard: got 'zero'; allowed: none, optimizer, gradients, "
                          "parameters"),
    (["--activation-checkpointing", "--model", "tests.test_sharding:embedding_only"],
     "--activation-checkpointing: the model has no nn.ModuleList of blocks"),
])
def test_bad_shard_flags_are_one_line_and_exit_2(tmp_path, no_launcher, capsys, flags, words):
    x, y = byte_rows(rows=4)
    save_file({"x": x, "y": y}, tmp_path / "t.safetensors")
    assert main(["--data", str(tmp_path / "t.safetensors"), "--d-out", "256", "--loss",
                 "cross-entropy", "--steps", "1", *flags]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def test_an_optimizer_that_cannot_be_sharded_is_refused(no_launcher):
    import distnn

    model = mlp()
    two_groups = torch.optim.AdamW([{"params": model[0].parameters()},
                                    {"params": model[2].parameters(), "lr": 1e-4}], lr=1e-3)
    x, y = regression(rows=8)
    with pytest.raises(UsageError, match="--shard optimizer: the AdamW given has 2 parameter "
                                         "groups, which torch's ZeroRedundancyOptimizer"):
        distnn.fit(model, train=(x, y), optimizer=two_groups, shard="optimizer", steps=1,
                   quiet=True, device="cpu")
    scheduler = torch.optim.lr_scheduler.StepLR(two_groups, 2)
    with pytest.raises(UsageError, match="got scheduler= and shard='parameters'"):
        distnn.fit(model, train=(x, y), optimizer=two_groups, scheduler=scheduler,
                   shard="parameters", steps=1, quiet=True, device="cpu")


def _group_worker(rank: int, world_size: int, port: int, out_dir: str, sharding: bool,
                  shards: tuple[str, ...]) -> None:
    """distnn.fit(shard=...) for each of ``shards`` in turn, inside one
    distnn.setup(sharding=...): writes the refusal's line, or whether anything still holds the
    process group once the runs and the group are over."""
    import gc
    import os
    import weakref

    import torch.distributed as dist

    import distnn

    as_rank(rank, world_size, port)
    x, y = byte_rows()
    said = os.path.join(out_dir, f"rank{rank}.txt")
    with distnn.setup(device="cpu", sharding=sharding) as rt:
        group = weakref.ref(dist.group.WORLD)
        torch.manual_seed(0)
        try:
            for shard in shards:
                distnn.fit(build(d_in=CONTEXT, d_out=VOCAB, d_model=16), train=(x, y),
                           loss="cross-entropy", optimizer="adamw", shard=shard, steps=2,
                           batch_size=6, runtime=rt, log_every=0, quiet=True)
        except UsageError as error:
            with open(said, "w") as file:
                file.write(str(error))
            return
    gc.collect()
    with open(said, "w") as file:
        file.write(f"held: {group() is not None}")


def test_a_group_made_before_torch_s_sharding_modules_is_refused_and_one_after_is_let_go(
        tmp_path):
    # a group made first would be bound by their default arguments as they are imported,
    # held past its end, and the process could abort as it exits (SIGABRT, after a good run)
    start_ranks(_group_worker, (2, free_port(), str(tmp_path), False, ("parameters",)),
                nprocs=2)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(
            "--shard parameters: the process group was made by distnn.setup(sharding=False)")
    # spawned afresh (the fork server has imported them already): setup() imports them
    # before it makes the group, so ZeroRedundancyOptimizer lets go of it; and it empties
    # DTensor's caches of FSDP2's ops, whose entries hold the group through the device mesh
    mp.start_processes(_group_worker, nprocs=2, start_method="spawn",
                       args=(2, free_port(), str(tmp_path), True, ("optimizer", "parameters")))
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "held: False"
