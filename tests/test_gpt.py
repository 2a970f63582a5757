"""distnn.models.gpt and --model-args: the small GPT maps token ids [N, T] to next-token
scores [N, T, V] causally, trains through distnn.fit on 2 ranks as one process trains it with
plain torch, and --model-args reaches --model's function or is refused in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distnn.config import TrainConfig
from distnn.errors import UsageError
from distnn.job.model import config_model
from distnn.models.gpt import build
from distnn.train import main
from tests.conftest import as_rank, free_port, start_ranks
from tests.reference import assert_close_run

VOCAB, CONTEXT = 11, 8


def tokens(rows=24, seed=5):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, CONTEXT + 1), generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # next-token targets


def summed_cross_entropy(scores, labels):
    """Per-position cross-entropy, summed over every position of every row."""
    return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1),
                           reduction="sum")


def test_scores_a_position_from_it_and_the_positions_before_it_only():
    torch.manual_seed(0)
    model = build(d_in=CONTEXT, d_out=VOCAB, d_model=32, n_layers=2, n_heads=4).eval()
    x, _ = tokens(rows=3)
    scores = model(x)
    assert scores.shape == (3, CONTEXT, VOCAB) and len(model.blocks) == 2
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    with torch.no_grad():
        after = model(changed)
    assert torch.equal(after[:, :5], scores[:, :5].detach())  # the past does not see it
    assert not torch.allclose(after[:, 5:], scores[:, 5:].detach())


def test_model_args_reach_the_function_and_bad_ones_are_refused():
    config = TrainConfig(model="distnn.models.gpt:build", model_args='{"d_model": 16, '
                         '"n_layers": 3, "n_heads": 2}', d_in=CONTEXT, d_out=VOCAB)
    model = config_model(config)
    assert len(model.blocks) == 3 and model.tokens.embedding_dim == 16
    for args, words in (("[1, 2]", "a JSON list; allowed: a JSON object"),
                        ("{d_model: 1}", "not JSON"),
                        ('{"width": 8}', "does not take (d_in, d_out, width)")):
        with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
            config_model(TrainConfig(model="distnn.models.gpt:build", model_args=args,
                                     d_in=CONTEXT, d_out=VOCAB))
    with pytest.raises(UsageError, match="--model-args: got arguments without --model"):
        TrainConfig(model_args="{}")


def test_bad_model_args_on_the_command_line_are_one_line_and_exit_2(no_launcher, capsys):
    assert main(["--model", "distnn.models.gpt:build", "--model-args", "3", "--steps",
                 "1"]) == 2
    err = capsys.readouterr().err
    assert "--model-args: got '3', a JSON int" in err and "Traceback" not in err


def plain_torch(x, y, *, steps, batch_size, lr):
    torch.manual_seed(0)
    model = build(d_in=CONTEXT, d_out=VOCAB, d_model=32, n_layers=2, n_heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, per_epoch, step, epoch = [], len(x) // batch_size, 0, 0
    while step < steps:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for k in range(per_epoch):
            batch = order[k * batch_size:(k + 1) * batch_size]
            loss = summed_cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        epoch += 1
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank, world, port, out):
    as_rank(rank, world, port)
    torch.set_num_threads(1)
    import distnn

    torch.manual_seed(0)
    model = build(d_in=CONTEXT, d_out=VOCAB, d_model=32, n_layers=2, n_heads=4)
    x, y = tokens()
    result = distnn.fit(model, train=(x, y), loss=summed_cross_entropy,
                        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
                        batch_size=8, steps=9, log_every=0, quiet=True, device="cpu")
    if rank == 0:
        torch.save({"losses": result.losses, "weights": result.model.state_dict()}, out)


def test_the_gpt_trains_through_fit_on_two_ranks_as_one_process_does(tmp_path):
    out = tmp_path / "run.pt"
    start_ranks(_rank, (2, free_port(), str(out)), nprocs=2)
    run = torch.load(out)
    x, y = tokens()
    losses, weights = plain_torch(x, y, steps=9, batch_size=8, lr=3e-3)
    assert_close_run(run["losses"], run["weights"], losses, weights)
