"""The training recipe: --loss-reduction mean, --lr-schedule with warmup, --clip-grad-norm.

On 1 to 3 real gloo ranks (a last batch smaller than the world, micro-batches) the run
equals one process training with plain torch: ``reduction='mean'``, ``LambdaLR`` with the
documented rate, ``clip_grad_norm_``; a run killed mid-warmup resumes to the same bits.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from distnn.step.update import Update
from distnn.train import main
from tests.conftest import REPO, clean_env, read_metrics, run_cli, run_world
from tests.reference import assert_close_run


def rate_factor(kind, s, *, lr, total, warmup, min_lr):
    """The rate of update s over lr, written from the docs' definition."""
    if s < warmup:
        return (s + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (s - warmup) / (total - warmup)
    if kind == "linear":
        return (lr - (lr - min_lr) * progress) / lr
    return (min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2) / lr


def plain_torch(x, y, *, loss, optimizer, lr, batch_size, epochs, schedule, warmup, min_lr,
                clip, hidden=(16,), seed=0):
    """One process, plain torch, the documented batch order (randperm seeded with seed +
    epoch): returns each step's mean loss, its rate and its gradient norm, and the weights."""
    torch.manual_seed(seed)
    classes = not y.is_floating_point()
    d_out = int(y.max()) + 1 if classes else y.shape[1]
    layers, width = [], x.shape[1]
    for size in hidden:
        layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
        width = size
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, d_out))
    loss_fn = (torch.nn.CrossEntropyLoss(reduction="mean") if loss == "cross-entropy"
               else torch.nn.MSELoss(reduction="mean"))
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=lr))
    per_epoch = -(-len(x) // batch_size)
    total = epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: rate_factor(
        schedule, s, lr=lr, total=total, warmup=warmup, min_lr=min_lr))
    losses, rates, norms = [], [], []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for k in range(per_epoch):
            batch = order[k * batch_size:(k + 1) * batch_size]
            value = loss_fn(model(x[batch]), y[batch])
            opt.zero_grad()
            value.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
            losses.append(value.item())
    return losses, rates, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def data(kind, rows=37, d_in=6, seed=4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=generator)
    if kind == "classes":
        return x, torch.randint(0, 3, (rows,), generator=generator)
    return x, torch.randn(rows, 2, generator=generator)


@pytest.mark.parametrize("world, kind, flags, setting", [
    # 37 rows in batches of 12: the last batch of 1 row leaves 2 of 3 ranks empty
    (3, "classes", ["--micro-batches", "2"],
     {"loss": "cross-entropy", "optimizer": "adamw", "lr": 1e-2, "schedule": "cosine",
      "warmup": 4, "min_lr": 1e-3, "clip": 1.0}),
    (2, "regression", [],
     {"loss": "mse", "optimizer": "sgd", "lr": 5e-2, "schedule": "linear", "warmup": 3,
      "min_lr": 0.0, "clip": 0.5}),
    (1, "classes", [],
     {"loss": "cross-entropy", "optimizer": "adamw", "lr": 1e-2, "schedule": "cosine",
      "warmup": 4, "min_lr": 1e-3, "clip": 1.0}),
])
def test_the_recipe_on_any_world_size_equals_plain_torch(tmp_path, world, kind, flags,
                                                          setting):
    x, y = data(kind)
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    epochs, batch_size = 4, 12
    run = run_world(world, [
        "--data", str(tmp_path / "d.safetensors"), "--batch-size", str(batch_size),
        "--epochs", str(epochs), "--hidden", "16", "--loss", setting["loss"],
        "--optimizer", setting["optimizer"], "--lr", str(setting["lr"]),
        "--loss-reduction", "mean", "--lr-schedule", setting["schedule"],
        "--warmup-steps", str(setting["warmup"]), "--min-lr", str(setting["min_lr"]),
        "--clip-grad-norm", str(setting["clip"]), *flags], tmp_path / "run")
    losses, rates, norms, weights = plain_torch(x, y, batch_size=batch_size, epochs=epochs,
                                                **setting)
    assert_close_run(run["losses"], run["weights"][0], losses, weights)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "event" not in r]
    assert [r["lr"] for r in records] == pytest.approx(rates, rel=1e-12)
    assert [r["grad_norm"] for r in records] == pytest.approx(norms, rel=1e-4)
    assert any(norm > setting["clip"] for norm in norms)  # the clipping did something
    for other in run["weights"][1:]:  # every replica identical
        assert all(torch.equal(other[name], tensor) for name, tensor in
                   run["weights"][0].items())


def test_a_run_killed_mid_warmup_and_again_mid_decay_resumes_to_the_same_bits(tmp_path):
    x, y = data("classes")
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    flags = ["--data", str(tmp_path / "d.safetensors"), "--batch-size", "8", "--epochs", "3",
             "--hidden", "16", "--loss", "cross-entropy", "--optimizer", "adamw", "--lr",
             "1e-2", "--loss-reduction", "mean", "--lr-schedule", "cosine", "--warmup-steps",
             "6", "--clip-grad-norm", "0.5", "--checkpoint-every", "2", "--log-every", "1",
             "--quiet"]

    def train(name, **env):
        return run_cli([sys.executable, "-m", "distnn.train", *flags, "--checkpoint-dir",
                        str(tmp_path / name), "--metrics", str(tmp_path / f"{name}.jsonl"),
                        "--save", str(tmp_path / f"{name}.safetensors")],
                       env=clean_env(**env))

    assert train("whole").returncode == 0
    killed = train("cut", DISTNN_FAULT_STEP="5")  # after step-4 was written, mid-warmup
    assert killed.returncode == 1 and (tmp_path / "cut" / "step-4").is_dir()
    killed = train("cut", DISTNN_FAULT_STEP="9")  # resumed at 4; killed mid-decay, after 8
    assert killed.returncode == 1 and (tmp_path / "cut" / "step-8").is_dir()
    assert train("cut").returncode == 0
    whole = read_metrics(tmp_path / "whole.jsonl")
    cut = read_metrics(tmp_path / "cut.jsonl")
    assert [(r.get("loss"), r.get("lr"), r.get("grad_norm")) for r in cut if "event" not in r] \
        == [(r.get("loss"), r.get("lr"), r.get("grad_norm")) for r in whole if "event" not in r]
    want, got = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "cut.safetensors")
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())


@pytest.mark.parametrize("flags, words", [
    (["--warmup-steps", "30", "--steps", "20"],
     "--warmup-steps: got 30, beyond the run's 20 steps; allowed: 0 to 20"),
    (["--min-lr", "1", "--lr", "0.1", "--lr-schedule", "linear"],
     "--min-lr: got 1.0, above the learning rate 0.1; allowed: a rate from 0 to it"),
    (["--min-lr", "1e-3", "--lr", "1e-4"],  # the constant schedule, as docs/flags.md says
     "--min-lr: got 0.001, above the learning rate 0.0001; allowed: a rate from 0 to it"),
    (["--val-every", "5"], "--val-every 5: no validation data; allowed: it with --val-data"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm: got -1.0; allowed:"),
    (["--clip-grad-norm", "nan"], "--clip-grad-norm: got nan; allowed:"),
])
def test_a_bad_recipe_is_one_line_and_exit_2(flags, words, no_launcher, capsys):
    assert main([*flags, "--steps", "20"] if "--steps" not in flags else flags) == 2
    assert words in capsys.readouterr().err


def test_a_non_finite_gradient_norm_stops_the_run_with_exit_3(tmp_path, no_launcher, capsys):
    assert main(["--steps", "20", "--lr", "1e30", "--clip-grad-norm", "1", "--verify-every",
                 "5", "--log-every", "0"]) == 3
    assert "non-finite" in capsys.readouterr().err


def test_weights_made_non_finite_by_an_update_of_a_finite_loss_are_named_so(no_launcher,
                                                                            capsys):
    # step 0's loss is finite; its update at this rate overflows the weights
    assert main(["--steps", "5", "--lr", "1e38", "--verify-every", "1", "--log-every",
                 "0"]) == 3
    assert capsys.readouterr().err.splitlines() == [
        "distnn: error: non-finite weights after step 0 (its loss 628.283935546875 was "
        "finite); stopping: no checkpoint was written; try a smaller --lr"]


def test_the_docs_define_the_rate_as_the_tests_do():
    text = (REPO / "docs" / "data-and-models.md").read_text()
    assert "lr * (s + 1) / W" in text and "(1 + cos(pi * (s - W) / (S - W))) / 2" in text


def test_a_resume_that_changes_the_schedule_s_length_warns(tmp_path, no_launcher, caplog):
    flags = ["--steps", "4", "--hidden", "8", "--d-in", "6", "--lr-schedule", "cosine",
             "--checkpoint-dir", str(tmp_path / "ck"), "--log-every", "0", "--quiet"]
    assert main(flags) == 0
    assert main([*flags, "--steps", "8"]) == 0
    assert "--steps 4 (now 8)" in caplog.text


def test_fit_with_an_optimizer_of_its_own_schedules_from_that_optimizer_s_rate(tmp_path,
                                                                              no_launcher):
    import distnn

    x, y = data("classes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    distnn.fit(model, train=(x, y), loss="cross-entropy", optimizer=optimizer, batch_size=10,
               steps=8, lr_schedule="cosine", min_lr=1e-3, metrics=str(tmp_path / "m.jsonl"),
               quiet=True)
    rates = [r["lr"] for r in read_metrics(tmp_path / "m.jsonl") if "event" not in r]
    want = [rate_factor("cosine", s, lr=1e-2, total=8, warmup=0, min_lr=1e-3) * 1e-2
            for s in range(8)]
    assert rates == pytest.approx(want, rel=1e-12) and rates[0] == 1e-2


def _fit_with_step_lr(tmp_path, steps, name, checkpoint_dir=None):
    import distnn

    x, y = data("classes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    extra = {"checkpoint_dir": str(checkpoint_dir)} if checkpoint_dir else {}
    result = distnn.fit(model, train=(x, y), loss="cross-entropy", optimizer=optimizer,
                        scheduler=scheduler, batch_size=10, steps=steps, quiet=True,
                        metrics=str(tmp_path / f"{name}.jsonl"), **extra)
    return result, read_metrics(tmp_path / f"{name}.jsonl")


def test_fit_steps_a_scheduler_of_its_own_and_resumes_it(tmp_path, no_launcher):
    """StepLR (halving every 3 updates) on fit's optimizer: the rates torch's own loop
    uses, recorded per step; a run resumed from step 4 ends as the uninterrupted one."""
    whole, records = _fit_with_step_lr(tmp_path, 10, "whole")
    assert [r["lr"] for r in records if "event" not in r] == pytest.approx(
        [0.1 * 0.5 ** (s // 3) for s in range(10)], rel=1e-12)
    _fit_with_step_lr(tmp_path, 4, "first", checkpoint_dir=tmp_path / "ck")
    resumed, records = _fit_with_step_lr(tmp_path, 10, "resumed", checkpoint_dir=tmp_path / "ck")
    assert [r["lr"] for r in records if "event" not in r] == pytest.approx(
        [0.1 * 0.5 ** (s // 3) for s in range(4, 10)], rel=1e-12)
    assert resumed.losses[-6:] == whole.losses[-6:]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_a_scheduler_of_another_optimizer_or_with_a_schedule_is_refused(no_launcher):
    import distnn
    from distnn.errors import UsageError

    x, y = data("classes")
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), 3)
    with pytest.raises(UsageError, match="built on another optimizer than the one given"):
        distnn.fit(model, train=(x, y), loss="cross-entropy", optimizer=optimizer,
                   scheduler=other, steps=2)
    mine = torch.optim.lr_scheduler.StepLR(optimizer, 3)
    with pytest.raises(UsageError, match="got scheduler= with optimizer='sgd', a name of "):
        distnn.fit(model, train=(x, y), loss="cross-entropy", scheduler=mine, steps=2)
    with pytest.raises(UsageError, match="got scheduler= and lr_schedule='cosine'"):
        distnn.fit(model, train=(x, y), loss="cross-entropy", optimizer=optimizer,
                   scheduler=mine, steps=2, lr_schedule="cosine")


def test_only_the_rank_that_says_a_scheduler_s_rates_keeps_them():
    # kept until said, a rate a step: on a rank that never says them (not rank 0), a long
    # run's memory would grow by one entry every step
    weight = torch.nn.Parameter(torch.ones(2))
    for says in (True, False):
        optimizer = torch.optim.SGD([weight], lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)
        update = Update(optimizer=optimizer, lr=0.1, scheduler=scheduler, says_rates=says)
        for _ in range(5):
            weight.grad = torch.ones(2)
            update(None, torch.zeros(()))
        said = [update.rate_of(index) for index in range(5)]
        assert said == ([0.1, 0.1, 0.05, 0.05, 0.025] if says else [None] * 5)
        assert [update.rate_of(index) for index in range(5)] == [None] * 5  # said once
