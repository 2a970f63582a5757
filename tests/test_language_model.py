"""A language model trained as the field trains one: next-token cross-entropy on byte
tokens [N, T] against scores [N, T, V], some targets ignored (-100), the mean over the
counted targets of the global batch, AdamW, cosine decay after a warmup, clipping at 1.0.

On 1 and 4 real gloo ranks (a last batch smaller than the world, micro-batches) and through
distnn.fit with a dict dataset and a collate_fn read by a DataLoader worker, the run equals
one process training with plain torch (``F.cross_entropy(..., reduction='mean',
ignore_index=-100)`` over the whole batch, ``LambdaLR``, ``clip_grad_norm_``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distnn.errors import UsageError
from distnn.models.gpt import build
from distnn.train import main
from tests.conftest import as_rank, free_port, read_metrics, run_world, start_ranks
from tests.reference import assert_close_run
from tests.test_recipe import rate_factor

CONTEXT, VOCAB, D_MODEL = 64, 256, 64
ROWS, BATCH, STEPS = 21, 6, 50  # 4 batches an epoch, the last of 3 rows
RECIPE = {"lr": 3e-3, "warmup": 5, "min_lr": 3e-4, "clip": 1.0}
WORDS = [b"the", b"ranks", b"sum", b"their", b"gradients", b"and", b"every", b"replica",
         b"stays", b"the", b"same", b"as", b"one", b"process"]


def byte_rows(rows=ROWS, seed=3):
    """Byte tokens of a text of words: x [rows, T] and next-token labels y, the first five
    positions of each row and about a tenth of the rest ignored (-100)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (rows * CONTEXT,), generator=generator).tolist()
    text = b" ".join(WORDS[i] for i in picks)[:rows * (CONTEXT + 1)]
    ids = torch.tensor(list(text), dtype=torch.int64).view(rows, CONTEXT + 1)
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    y[:, :5] = -100
    y[torch.rand(y.shape, generator=generator) < 0.1] = -100
    return x, y


def plain_torch(x, y, *, steps=STEPS, batch_size=BATCH, lr, warmup, min_lr, clip, seed=0,
                device="cpu", bf16=False):
    """One process, plain torch, the documented batch order (randperm seeded with seed +
    epoch, the last batch kept): each step's mean loss, rate and gradient norm, and the
    weights (on the CPU). ``bf16``: the forward and loss under bf16 autocast."""
    torch.manual_seed(seed)
    model = build(d_in=CONTEXT, d_out=VOCAB, d_model=D_MODEL).to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: rate_factor(
        "cosine", s, lr=lr, total=steps, warmup=warmup, min_lr=min_lr))
    per_epoch = -(-len(x) // batch_size)
    losses, rates, norms = [], [], []
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        batch = order[k * batch_size:(k + 1) * batch_size]
        batch = batch.to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            scores = model(x[batch])
            loss = F.cross_entropy(scores.reshape(-1, VOCAB), y[batch].reshape(-1),
                                   reduction="mean", ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
        losses.append(loss.item())
    return losses, rates, norms, {k: v.detach().to("cpu", copy=True)
                                  for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    return plain_torch(*byte_rows(), **RECIPE)


def recipe_flags(path):
    return ["--data", str(path), "--model", "distnn.models.gpt:build", "--model-args",
            f'{{"d_model": {D_MODEL}}}', "--d-out", str(VOCAB), "--loss", "cross-entropy",
            "--loss-reduction", "mean", "--optimizer", "adamw", "--lr", str(RECIPE["lr"]),
            "--lr-schedule", "cosine", "--warmup-steps", str(RECIPE["warmup"]), "--min-lr",
            str(RECIPE["min_lr"]), "--clip-grad-norm", str(RECIPE["clip"]), "--batch-size",
            str(BATCH), "--steps", str(STEPS)]


@pytest.mark.parametrize("world, flags", [(1, []), (4, ["--micro-batches", "2"])])
def test_the_language_model_recipe_on_any_world_size_equals_plain_torch(
        tmp_path, reference, world, flags):
    x, y = byte_rows()
    save_file({"x": x, "y": y}, tmp_path / "tokens.safetensors")
    run = run_world(world, [*recipe_flags(tmp_path / "tokens.safetensors"), *flags],
                    tmp_path / "run")
    losses, rates, norms, weights = reference
    assert_close_run(run["losses"], run["weights"][0], losses, weights)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "event" not in r]
    assert [r["lr"] for r in records] == pytest.approx(rates, rel=1e-12)
    assert [r["grad_norm"] for r in records] == pytest.approx(norms, rel=1e-4)
    assert any(norm > RECIPE["clip"] for norm in norms)  # the clipping did something
    for other in run["weights"][1:]:  # every replica identical
        assert all(torch.equal(other[name], t) for name, t in run["weights"][0].items())


class TokenDicts(torch.utils.data.Dataset):
    """Items as a tokenised text dataset holds them: dicts of lists of ids."""

    def __init__(self, x, y):
        self.x, self.y = x.tolist(), y.tolist()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i], "text": "not a tensor"}


def collate_ids(items):
    """A collate_fn of the user's: lists of ids to tensors, the text left out."""
    return {"input_ids": torch.tensor([item["input_ids"] for item in items]),
            "labels": torch.tensor([item["labels"] for item in items])}


def _fit_rank(rank, world, port, out):
    as_rank(rank, world, port)
    torch.set_num_threads(1)
    import distnn

    torch.manual_seed(0)
    model = build(d_in=CONTEXT, d_out=VOCAB, d_model=D_MODEL)
    x, y = byte_rows()
    val = TokenDicts(*byte_rows(rows=5, seed=9))
    result = distnn.fit(model, train=TokenDicts(x, y), val=val, loss="cross-entropy",
                        optimizer="adamw", collate_fn=collate_ids, num_workers=1,
                        loss_reduction="mean", lr=RECIPE["lr"], lr_schedule="cosine",
                        warmup_steps=RECIPE["warmup"], min_lr=RECIPE["min_lr"],
                        clip_grad_norm=RECIPE["clip"], batch_size=BATCH, steps=STEPS,
                        val_every=STEPS, log_every=0, quiet=True, device="cpu")
    if rank == 0:
        torch.save({"losses": result.losses, "val": result.val,
                    "weights": result.model.state_dict()}, out)


def test_fit_trains_a_dict_dataset_through_a_collate_fn_and_a_worker_as_plain_torch(
        tmp_path, reference):
    out = tmp_path / "run.pt"
    start_ranks(_fit_rank, (2, free_port(), str(out)), nprocs=2)
    run = torch.load(out)
    losses, _, _, weights = reference
    assert_close_run(run["losses"], run["weights"], losses, weights)
    # validation: the counted targets, their mean loss, its perplexity and accuracy, as
    # plain torch computes them with the trained weights
    model = build(d_in=CONTEXT, d_out=VOCAB, d_model=D_MODEL)
    model.load_state_dict(run["weights"])
    vx, vy = byte_rows(rows=5, seed=9)
    with torch.no_grad():
        scores = model(vx)
    counted = vy != -100
    mean = F.cross_entropy(scores.reshape(-1, VOCAB), vy.reshape(-1), ignore_index=-100)
    (result,) = run["val"]
    assert result["samples"] == 5 and result["targets"] == int(counted.sum())
    assert result["loss_per_target"] == pytest.approx(mean.item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(mean.item()), rel=1e-5)
    correct = ((scores.argmax(-1) == vy) & counted).sum().item()
    assert result["accuracy"] == pytest.approx(correct / counted.sum().item())


def test_a_batch_of_ignored_labels_only_under_a_mean_is_one_line_and_exit_2(
        tmp_path, no_launcher, capsys):
    x, y = byte_rows(rows=8)
    y[2:4] = -100  # unshuffled batches of 2: the second holds no target
    save_file({"x": x, "y": y}, tmp_path / "t.safetensors")
    flags = recipe_flags(tmp_path / "t.safetensors")
    flags[flags.index("--batch-size") + 1] = "2"
    assert main([*flags, "--no-shuffle", "--steps", "4", "--warmup-steps", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "the global batch of step 2 holds no target" in lines[0], lines


@pytest.mark.parametrize("change, words", [
    ({"d_out": "100"}, "holds the class label 1"),  # the vocabulary given is too small
    ({"labels": -7}, "holds the negative class label -7 in y"),
    ({"labels": "all ignored"}, "holds no class label other than the ignored -100"),
])
def test_labels_the_vocabulary_cannot_score_are_one_line_and_exit_2(
        tmp_path, no_launcher, capsys, change, words):
    x, y = byte_rows(rows=4)
    if change.get("labels") == -7:
        y[1, 9] = -7
    elif "labels" in change:
        y[:] = -100
    save_file({"x": x, "y": y}, tmp_path / "t.safetensors")
    flags = recipe_flags(tmp_path / "t.safetensors")
    if "d_out" in change:
        flags[flags.index("--d-out") + 1] = change["d_out"]
    assert main([*flags, "--steps", "2", "--warmup-steps", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def test_a_model_with_too_few_scores_for_the_labels_is_refused_before_a_step(
        tmp_path, no_launcher, capsys):
    x, y = byte_rows(rows=4)
    save_file({"x": x, "y": y}, tmp_path / "t.safetensors")
    flags = recipe_flags(tmp_path / "t.safetensors")
    flags[flags.index("--model-args") + 1] = '{"d_model": 16}'
    flags[flags.index("--model") + 1] = "tests.test_language_model:small_vocabulary"
    assert main([*flags, "--steps", "2", "--warmup-steps", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "the model gives 100 scores a position but the data holds " \
        "the class label" in lines[0], lines


def small_vocabulary(*, d_in, d_out, d_model):
    """A GPT with a vocabulary of 100 whatever the labels ask for."""
    return build(d_in=d_in, d_out=100, d_model=d_model)


class Unscored(torch.nn.Module):
    """A model that returns a set of its scores: nothing distnn's loss can read."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return {"scores": self.linear(x)}


def test_an_output_without_scores_is_one_line(no_launcher):
    import distnn

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(UsageError, match=r"the model returned a dict with keys \['scores'\], "
                                         "which holds no scores distnn's loss can find"):
        distnn.fit(Unscored(), train=(x, y), loss="cross-entropy", steps=1, quiet=True,
                   device="cpu")


def tiny_gpt2():
    """A Hugging Face GPT2LMHeadModel from a small config (no download), without dropout:
    its forward returns an object holding .logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32,
                                     n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _hf_rank(rank, world, port, out):
    as_rank(rank, world, port)
    torch.set_num_threads(1)
    import distnn

    x, y = byte_rows()
    result = distnn.fit(tiny_gpt2(), train=(x, y), val=(x[:4], y[:4]), loss="cross-entropy",
                        optimizer="adamw", loss_reduction="mean", lr=3e-3, batch_size=BATCH,
                        steps=8, log_every=0, quiet=True, device="cpu")
    if rank == 0:
        torch.save({"losses": result.losses, "val": result.val,
                    "weights": result.model.state_dict()}, out)


def test_a_transformers_model_trains_on_the_built_in_loss_as_plain_torch(tmp_path):
    model = tiny_gpt2()  # skips without transformers (the test extra installs it)
    x, y = byte_rows()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for step in range(8):
        epoch, k = divmod(step, -(-ROWS // BATCH))
        order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(epoch))
        batch = order[k * BATCH:(k + 1) * BATCH]
        loss = F.cross_entropy(model(x[batch]).logits.reshape(-1, VOCAB),
                               y[batch].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out = tmp_path / "run.pt"
    start_ranks(_hf_rank, (2, free_port(), str(out)), nprocs=2)
    run = torch.load(out)
    assert_close_run(run["losses"], run["weights"], losses,
                     {k: v.detach() for k, v in model.state_dict().items()})
    with torch.no_grad():
        mean = F.cross_entropy(model(x[:4]).logits.reshape(-1, VOCAB), y[:4].reshape(-1))
    assert run["val"][-1]["step"] == 8  # at the end of each epoch, and of the run
    assert run["val"][-1]["loss_per_target"] == pytest.approx(mean.item(), rel=1e-5)


def sum_of_cross_entropies(scores, labels):
    return F.cross_entropy(scores.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")


def classes_second(scores, labels):
    """torch's own convention, scores [N, V, T] against labels [N, T]."""
    return F.cross_entropy(scores, labels, reduction="sum")


class ClassesSecond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt = build(d_in=CONTEXT, d_out=VOCAB, d_model=16)

    def forward(self, ids):
        return self.gpt(ids).transpose(1, 2)


@pytest.mark.parametrize("model, loss, scored", [
    (lambda: build(d_in=CONTEXT, d_out=VOCAB, d_model=16), sum_of_cross_entropies, True),
    (ClassesSecond, classes_second, False),  # no accuracy can be read: none is reported
])
def test_validation_with_a_loss_of_your_own_on_tokens_reports_what_it_can(
        no_launcher, model, loss, scored):
    import distnn

    x, y = byte_rows(rows=8)
    result = distnn.fit(model(), train=(x, y), val=(x[:3], y[:3]), loss=loss,
                        optimizer="adamw", batch_size=4, epochs=2, quiet=True, device="cpu")
    assert [r["step"] for r in result.val] == [2, 4]
    assert result.val[-1]["targets"] == int((y[:3] != -100).sum())
    assert ("accuracy" in result.val[-1]) == scored and "perplexity" not in result.val[-1]
