"""Bad input for what a run trains (data targets, --loss, --model, the length, the order):
one line, exit code 2, before any training; on every rank."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from distnn.errors import UsageError
from distnn.train import main
from tests.conftest import bin_path, run_cli


def write(path, x, y):
    save_file({"x": x, "y": y}, path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    x = torch.randn(6, 3)
    return {
        "floats": write(tmp_path / "floats.safetensors", x, torch.randn(6, 2)),
        "labels": write(tmp_path / "labels.safetensors", x, torch.tensor([0, 1, 2, 1, 0, 2])),
        "negative": write(tmp_path / "negative.safetensors", x,
                          torch.tensor([0, 1, -1, 1, 0, 2])),
        "wide": write(tmp_path / "wide.safetensors", torch.randn(4, 5), torch.randn(4, 2)),
        "labels2d": write(tmp_path / "labels2d.safetensors", x, torch.zeros(6, 2).long()),
    }


BAD = [
    (["--data", "{floats}", "--loss", "cross-entropy"],
     "--data: '{floats}' holds targets y of shape [2] a row and dtype float32 under --loss "
     "cross-entropy; allowed: integer class labels (y [N], or one a position: [N, T])"),
    (["--data", "{labels}"], "holds integer targets y (class labels?) under --loss mse; "
                             "allowed: floating-point targets with --loss mse"),
    (["--data", "{negative}", "--loss", "cross-entropy"], "holds the negative class label -1 in y"),
    (["--data", "{labels}", "--loss", "cross-entropy", "--d-out", "2"],
     "holds the class label 2, but --d-out is 2; allowed: labels 0 to 1"),
    # labels one a position need scores one a position: [N, 2, classes]
    (["--data", "{labels2d}", "--loss", "cross-entropy"], "the model's scores for 2 rows have "
                                                          "shape [2, 1] but their labels have "
                                                          "[2, 2]"),
    (["--loss", "cross-entropy"], "--loss: got 'cross-entropy' without --data"),
    (["--data", "{floats}", "--val-data", "{wide}"],
     "--val-data: '{wide}' holds inputs of shape [5] a row; allowed: [3], as the training "
     "data's"),
    (["--data", "{floats}", "--val-data", "{labels}"], "--val-data: '{labels}' holds integer"),
    (["--steps", "5", "--epochs", "2"], "--steps and --epochs: got both; allowed: one of them"),
    (["--hidden", "8", "--model", "tests.user_models:small_mlp"],
     "--hidden and --model: got both"),
    (["--model", "no_such_module_here:build"], "--model: cannot import 'no_such_module_here' "
                                               "(ModuleNotFoundError"),
    (["--model", "tests.user_models:missing"], "--model: 'tests.user_models' has no function "
                                               "'missing'"),
    (["--model", "tests.user_models:not_a_module"], "returned a str; allowed: a function that "
                                                    "returns an nn.Module"),
    (["--model", "tests.user_models:raises"], "raised RuntimeError: the user's bug"),
    (["--model", "tests.user_models:lazy"], "the model has lazy parameters"),
    (["--data", "{floats}", "--model", "tests.user_models:on_the_meta_device"],
     "the model's parameters are on the meta device"),
    (["--model", "tests.user_models:frozen"], "the model has no trainable parameters"),
    (["--model", "tests.user_models:flat_output", "--d-out", "1"],
     "the model's output for 2 rows has shape [2] but their targets have [2, 1], and the mse "
     "loss would broadcast the two into a wrong sum; allowed: a model whose output has the "
     "targets' shape"),
    (["--model", "nocolon"], "--model: got 'nocolon'; allowed: MODULE:FUNCTION"),
    (["--data", "{floats}", "--batch-size", "7", "--drop-last"],
     "--drop-last: --batch-size 7 is more than the data's 6 rows"),
    (["--optimizer", "lbfgs"], "--optimizer: got 'lbfgs'; allowed: sgd, momentum, adamw"),
    (["--momentum", "1.5"], "--momentum: got 1.5; allowed: a number in [0, 1)"),
    (["--val-every", "-2"], "--val-every: got -2; allowed: an integer >= 0"),
]


@pytest.mark.parametrize("argv, words", BAD)
def test_bad_job_input_is_one_line_and_exit_code_2(argv, words, files, capsys, no_launcher):
    assert main([arg.format(**files) for arg in argv] + ["--device", "cpu"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("distnn: error: ") and words.format(**files) in lines[0], lines[0]


def test_the_output_check_leaves_the_model_and_the_generators_as_they_were():
    from distnn.config import parse_config
    from distnn.job.checks import check_model_output, output_shape
    from distnn.job.spec import Job

    class Noisy(torch.nn.Module):  # draws random numbers and counts its calls, in any mode
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x):
            self.calls += 1
            return x + 0 * torch.randn_like(x)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Dropout(0.5), Noisy(), torch.nn.Linear(4, 2))
    model[2].eval()  # a model left partly in eval mode stays so
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    job = Job(config=parse_config([]), model=model,
              loss_fn=torch.nn.MSELoss(reduction="sum"), optimizer=None,
              fixed=(torch.randn(5, 3), torch.randn(5, 2)))
    state = torch.get_rng_state()
    check_model_output(job)
    assert calls == [torch.Size([2, 2])]  # it ran, on two rows
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True]
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    # a forward that changes a weight in place: Embedding(max_norm) renormalises its rows
    embedding = torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0),
                                    torch.nn.Flatten(1), torch.nn.Linear(4, 2))
    weight = embedding[0].weight.detach().clone()
    assert output_shape(embedding, torch.tensor([[3], [7]])) == torch.Size([2, 2])
    assert torch.equal(embedding[0].weight, weight)


def test_the_output_check_leaves_a_shape_it_cannot_know_to_the_first_step(capfd):
    from distnn.job.checks import output_shape
    from tests.user_models import routed

    torch.manual_seed(0)  # routed: which expert runs depends on the values
    assert output_shape(routed(3, 2), torch.randn(2, 3)) is None
    assert output_shape(torch.nn.Linear(5, 2), torch.randn(2, 3)) is None  # fails: 3 != 5
    assert output_shape(torch.nn.Linear(3, 2), torch.randn(2, 3)) == torch.Size([2, 2])
    assert capfd.readouterr().err == ""  # torch's fake tensors log each failed op; not here


def test_the_mlp_s_output_is_known_without_running_it_and_a_model_of_flags_is_looked_at():
    from distnn.config import parse_config
    from distnn.job.checks import check_model_output
    from distnn.job.spec import job_from_flags

    job = job_from_flags(parse_config(["--d-in", "6", "--hidden", "4", "--d-out", "3"]),
                         world_size=1, rank=0)
    assert job.output_width == 3

    def never(x):
        raise AssertionError("the MLP was run")

    job.model.forward = never
    check_model_output(job)  # [rows, 3] against the targets' [rows, 3]
    job.output_width = 5  # as if the MLP gave 5 scores a row: the mse check refuses it
    with pytest.raises(UsageError, match=re.escape("has shape [2, 5] but their targets "
                                                   "have [2, 3]")):
        check_model_output(job)
    model_job = job_from_flags(parse_config(["--model", "tests.user_models:small_mlp",
                                             "--d-in", "6", "--d-out", "3"]),
                               world_size=1, rank=0)
    assert model_job.output_width is None


def test_batch_norm_in_training_mode_is_refused_on_several_ranks_only():
    from distnn.config import parse_config
    from distnn.job.spec import Job
    from distnn.run.startup import check_job
    from tests.user_models import batch_norm

    model = batch_norm(3, 2)
    job = Job(config=parse_config([]), model=model,
              loss_fn=torch.nn.MSELoss(reduction="sum"), optimizer=None,
              fixed=(torch.randn(4, 3), torch.randn(4, 2)))
    check_job(job, ranks=1)
    with pytest.raises(UsageError, match=re.escape(
            "the model has BatchNorm1d layers using batch statistics, which normalise over "
            "each rank's or micro-batch's rows rather than the batch")):
        check_job(job, ranks=2)
    pieces = Job(config=parse_config(["--micro-batches", "2"]), model=model,
                 loss_fn=job.loss_fn, optimizer=None, fixed=job.fixed)
    with pytest.raises(UsageError, match="using batch statistics"):
        check_job(pieces, ranks=1)
    model[1].eval()  # running statistics fixed: the same on every rank
    check_job(job, ranks=2)
    check_job(pieces, ranks=1)


def test_dropout_in_training_mode_is_named_in_a_warning(capsys, no_launcher):
    assert main(["--model", "tests.user_models:with_dropout", "--steps", "2", "--d-in", "5",
                 "--d-out", "2", "--device", "cpu", "--log-every", "0"]) == 0
    assert ("distnn: warning: the model has Dropout layers in training mode: their random "
            "masks are outside distnn's guarantee") in capsys.readouterr().err


def test_a_model_of_another_dtype_that_casts_its_input_trains(capsys, no_launcher):
    assert main(["--model", "tests.user_models:casts_its_input", "--steps", "3", "--d-in",
                 "5", "--d-out", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("summary: ")


def test_a_model_that_fails_to_build_stops_every_rank(files):
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train",
                      "--model", "tests.user_models:raises", "--steps", "2"], timeout=90)
    lines = sorted(line for line in result.stderr.splitlines() if line.startswith("distnn:"))
    assert result.returncode != 0 and len(lines) == 2, result.stderr[-2000:]
    for rank, line in enumerate(lines):
        assert line.startswith(f"distnn: rank {rank}: error: --model: ")
        assert "raised RuntimeError: the user's bug" in line
