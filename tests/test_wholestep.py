"""--compile: the whole step compiled (forward, loss, backward, update) trains as the
reference does, one process or several, with the reference program's update or torch.optim, in fp32
(within the reference's tolerances, bitwise run to run) and bf16; and every shape a run
meets is compiled before its timed steps."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from distnn.step import wholestep
from distnn.train import main
from tests.conftest import read_losses, read_metrics, run_world
from tests.reference import (
    assert_close_run,
    assert_matches_reference,
    minibatch_reference,
    reference_run,
)


def _run(tmp_path, name, *flags):
    metrics, weights = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.safetensors"
    assert main([*flags, "--log-every", "1", "--metrics", str(metrics),
                 "--save", str(weights)]) == 0
    return read_losses(metrics), load_file(weights), read_metrics(metrics)[-1]


def test_one_process_matches_the_reference_and_repeats_its_bits(tmp_path, no_launcher):
    losses, weights, summary = _run(tmp_path, "a", "--compile")
    # the fidelity tolerance: relative 1e-5 over the first 100 losses, 1e-5 on the
    # final weights after the tutorial's 500 steps
    assert_matches_reference(losses, weights, rtol_first_100=1e-5, weight_atol=1e-5)
    assert summary["compile_s"] > 0
    again, again_weights, _ = _run(tmp_path, "b", "--compile")
    assert again == losses
    assert all(torch.equal(again_weights[k], weights[k]) for k in weights)


def test_two_ranks_split_at_the_all_reduce_and_match_the_reference(tmp_path):
    result = run_world(2, ["--compile", "--steps", "100"], tmp_path)
    assert_matches_reference(result["losses"], result["weights"][0], steps=100)
    assert all(torch.equal(result["weights"][1][k], v) for k, v in result["weights"][0].items())


def test_adamw_in_mini_batches_with_empty_shards_on_three_ranks(tmp_path):
    # 7 rows in batches of 3: the last batch (1 row) leaves two ranks empty-handed
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 6, generator=generator), torch.randn(7, 3, generator=generator)
    data = tmp_path / "d.safetensors"
    save_file({"x": x, "y": y}, data)
    result = run_world(3, ["--compile", "--data", str(data), "--hidden", "8", "--batch-size",
                           "3", "--epochs", "3", "--optimizer", "adamw", "--lr", "1e-2"],
                       tmp_path / "run")
    losses, weights, _ = minibatch_reference(x=x, y=y, hidden=(8,), batch_size=3, epochs=3,
                                             optimizer="adamw", lr=1e-2)
    assert_close_run(result["losses"], result["weights"][0], losses, weights)


class _Compiled(list):
    """The graph counts at each warm_up's end; ``shapes``: the last one's rows per step."""

    shapes: list[int]


def _graphs_at_warm_up(monkeypatch) -> list[int]:
    """Makes every WholeStep.warm_up note how many frames torch had compiled when it ended
    (compare with ``counters["stats"]["unique_graphs"]`` after the run: equal if nothing
    was compiled during the steps)."""
    warm_up, compiled = wholestep.WholeStep.warm_up, _Compiled()

    def counting(self, steps, *args, **kwargs):
        warm_up(self, steps, *args, **kwargs)
        compiled.append(counters["stats"]["unique_graphs"])
        compiled.shapes = sorted(sum(len(x) for x, _ in pieces) for pieces in steps)

    monkeypatch.setattr(wholestep.WholeStep, "warm_up", counting)
    return compiled


@pytest.mark.parametrize("resume_at", [0, 2])
def test_every_shape_is_compiled_before_the_timed_steps(tmp_path, no_launcher, monkeypatch,
                                                        resume_at):
    """A data file that leaves a smaller last batch (10 rows in batches of 4, 4 and 2): both
    shapes are compiled in warm_up, also when a resumed run starts on the small one; nothing
    is compiled during the steps."""
    compiled = _graphs_at_warm_up(monkeypatch)
    generator = torch.Generator().manual_seed(6)
    x, y = torch.randn(10, 5, generator=generator), torch.randn(10, 2, generator=generator)
    data = tmp_path / "d.safetensors"
    save_file({"x": x, "y": y}, data)
    flags = ["--compile", "--data", str(data), "--hidden", "4", "--batch-size", "4", "--lr",
             "1e-2", "--checkpoint-dir", str(tmp_path / "ck")]
    if resume_at:  # the run resumed starts on the 2-row batch
        assert main([*flags, "--steps", str(resume_at), "--quiet"]) == 0
    counters.clear()
    compiled.clear()
    losses, weights, _ = _run(tmp_path, "run", *flags, "--epochs", "2")
    assert compiled == [counters["stats"]["unique_graphs"]]  # nothing compiled after warm_up
    assert compiled.shapes == [2, 4]  # warm_up was given both shapes (with the stance, a
    # shape it missed would run eagerly, and compile nothing either)
    want_losses, want_weights, _ = minibatch_reference(x=x, y=y, hidden=(4,), batch_size=4,
                                                       epochs=2, lr=1e-2)
    assert_close_run(losses, weights, want_losses[resume_at:], want_weights)


def test_bf16_keeps_the_eager_bf16_steps_numbers(tmp_path, no_launcher, monkeypatch):
    """The forward reads bf16 copies of the weights that the update refreshes, and the
    fixed batch cast to bf16 once: the losses stay those of eager autocast (bf16 rounding
    apart) and near the fp32 reference, and the steps compile nothing more."""
    frames, read = _graphs_at_warm_up(monkeypatch), set()
    call = wholestep.WholeStep.__call__
    monkeypatch.setattr(wholestep.WholeStep, "__call__", lambda self, pieces, vote: (
        read.add(pieces[0][0].dtype), call(self, pieces, vote))[1])
    counters.clear()
    compiled, _, _ = _run(tmp_path, "c", "--compile", "--precision", "bf16", "--steps", "100")
    assert frames == [counters["stats"]["unique_graphs"]] and read == {torch.bfloat16}
    eager, _, _ = _run(tmp_path, "e", "--precision", "bf16", "--steps", "100")
    autocast, _ = reference_run(steps=100, bf16=True)  # a plain autocast loop
    fp32, _ = reference_run(steps=100)
    for got, same, loop, full in zip(compiled, eager, autocast, fp32, strict=True):
        assert got == pytest.approx(loop, rel=1e-5)  # measured 1.9e-7 (docs/performance.md)
        assert got == pytest.approx(same, rel=BF16_VS_EAGER)
        assert got == pytest.approx(full, rel=0.05)
    assert max(abs(got - full) / full for got, full in zip(compiled, fp32, strict=True)) > 1e-4


BF16_VS_EAGER = 0.01  # measured 0.0024 over these 100 steps (docs/performance.md, "--compile")


def test_a_gradient_buffer_without_the_two_slots_is_refused():
    from distnn.distributed.gradsync import FlatGradSync

    model = torch.nn.Linear(3, 2)
    sync = FlatGradSync(model, distributed=False, extra_slots=1)
    with pytest.raises(ValueError, match="2 extra slots"):
        wholestep.WholeStep(model, torch.nn.MSELoss(reduction="sum"), sync, lr=0.1,
                            bf16=False, optimizer=None)


def test_batch_norm_trains_as_a_plain_torch_loop_does(no_launcher):
    """The model's buffers go into the compiled step and are updated there: the running
    statistics and the weights are those of a plain loop (torch.optim, no distnn)."""
    import copy

    import distnn

    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 6, generator=generator), torch.randn(32, 3, generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    result = distnn.fit(model, train=(x, y), batch_size=8, epochs=2, no_shuffle=True,
                        optimizer="momentum", lr=1e-2, compile=True, log_every=0, quiet=True)
    optimizer = torch.optim.SGD(reference.parameters(), lr=1e-2, momentum=0.9)
    loss_fn = torch.nn.MSELoss(reduction="sum")
    for _ in range(2):
        for first in range(0, 32, 8):
            optimizer.zero_grad()
            loss_fn(reference(x[first:first + 8]), y[first:first + 8]).backward()
            optimizer.step()
    for name, want in reference.state_dict().items():
        got = result.model.state_dict()[name]
        assert torch.allclose(got.float(), want.float(), atol=1e-5), name


class Aliased(torch.nn.Module):
    """One layer reachable under two names, which the compiled whole step cannot take."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.head = self.body

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_a_model_the_whole_step_cannot_compile_runs_eagerly_with_a_warning(no_launcher,
                                                                           caplog):
    import distnn

    x, y = torch.randn(16, 8), torch.randn(16, 8)
    results = []
    for compile_step in (False, True):
        torch.manual_seed(1)
        results.append(distnn.fit(Aliased(), train=(x, y), batch_size=8, steps=4, lr=1e-3,
                                  compile=compile_step, log_every=0, quiet=True))
    warned = [r.message for r in caplog.records if "could not be compiled" in r.message]
    assert len(warned) == 1 and warned[0].endswith("; running it eagerly"), warned
    for name, tensor in results[0].model.state_dict().items():
        assert torch.equal(results[1].model.state_dict()[name], tensor), name


def test_a_step_that_falls_back_to_eager_takes_the_eager_steps_default_layout(no_launcher,
                                                                              monkeypatch):
    # The compiled step's default layout (wgrad.default: TF32 on a GPU) is for the compiled
    # step; the eager step it falls back to takes the eager default, unless one was named.
    import distnn
    from distnn.step import wgrad

    monkeypatch.setattr(wgrad, "default", lambda *, precision, compiled, device: (
        "(x.T @ g).T" if compiled else wgrad.AUTOGRAD))
    entered = []
    layout = wgrad.layout
    monkeypatch.setattr(wgrad, "layout", lambda name: entered.append(name) or layout(name))
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    distnn.fit(Aliased(), train=(x, y), batch_size=8, steps=2, lr=1e-3, compile=True,
               log_every=0, quiet=True)
    assert entered == [wgrad.AUTOGRAD] * 2, entered  # the two eager steps' one piece each


class Counting(torch.nn.Module):
    """A model whose forward changes its Python state (torch compiles it again every step,
    as it specialises on the number) and computes the same function at every call."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.layer(x) * (2 if self.calls > 0 else 3)


def test_a_model_torch_would_compile_again_every_step_runs_those_steps_eagerly(no_launcher):
    """Past torch's limit of recompiles (8) a compiled step would fail the run; the steps
    after warm-up run what torch would compile again eagerly: the run ends, as the eager
    run does."""
    import distnn

    generator = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    results = []
    for compile_step in (False, True):
        torch.manual_seed(2)
        results.append(distnn.fit(Counting(), train=(x, y), batch_size=8, steps=12, lr=1e-3,
                                  compile=compile_step, log_every=0, quiet=True))
    eager, compiled = (r.model.state_dict() for r in results)
    for name, tensor in eager.items():
        assert torch.allclose(compiled[name], tensor, rtol=1e-5, atol=1e-6), name


class Scaled(torch.nn.Module):
    """Two Linear layers (autocast runs them in bf16) and a scale autocast leaves in fp32."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)
        self.scale = torch.nn.Parameter(torch.full((8,), 1.2345678))

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x))) * self.scale


def test_bf16_gradients_are_the_eager_autocast_steps_in_fp32():
    """The Linear layers read the bf16 copies, the scale its fp32 value, and the pieces'
    gradients add up in fp32: eager autocast's gradients (one piece or four)."""
    torch.manual_seed(1)
    assert_eager_autocast_gradients(Scaled(), in_features=32, out_features=8)


def assert_eager_autocast_gradients(model: torch.nn.Module, *, in_features: int,
                                    out_features: int, **step_options) -> wholestep.WholeStep:
    """The compiled bf16 step of ``model`` (the sum MSE loss) gives eager autocast's loss and
    fp32 gradients, for one piece and four; returns the step."""
    import copy

    from distnn.distributed.gradsync import FlatGradSync

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, in_features, generator=generator)
    y = torch.randn(256, out_features, generator=generator)
    eager = copy.deepcopy(model)
    loss_fn = torch.nn.MSELoss(reduction="sum")
    sync = FlatGradSync(model, distributed=False, extra_slots=2)
    # a torch.optim optimizer with lr 0: the step leaves p.grad (the summed gradients) and
    # the weights as they were
    step = wholestep.WholeStep(model, loss_fn, sync, lr=0.0, bf16=True, **step_options,
                               optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    for count in (1, 4):
        pieces = list(zip(x.chunk(count), y.chunk(count), strict=True))
        loss, _ = step(pieces, torch.zeros(1))
        eager.zero_grad()
        want = 0.0
        for piece_x, piece_y in pieces:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                piece_loss = loss_fn(eager(piece_x), piece_y)
            piece_loss.backward()
            want += piece_loss.item()
        assert loss.item() == pytest.approx(want, rel=1e-6)
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            assert p.grad.dtype == torch.float32
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-5), (count, name)
    return step


def test_a_fixed_input_only_a_linear_layer_reads_is_cast_to_bf16_once():
    """WholeStep.inputs casts the input of an nn.Sequential that starts with nn.Linear, as
    autocast would in every step: the loss and gradients are the same bits. Anything else
    (fp32, another first layer, a model of its own) is left as it is."""
    from distnn.distributed.gradsync import FlatGradSync

    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 32, generator=generator), torch.randn(64, 8, generator=generator)
    loss_fn = torch.nn.MSELoss(reduction="sum")

    def whole_step(model, bf16=True):
        sync = FlatGradSync(model, distributed=False, extra_slots=2)
        return wholestep.WholeStep(model, loss_fn, sync, lr=0.0, bf16=bf16,
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.0))

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(32, 64)), torch.nn.ReLU(),
                                torch.nn.Linear(64, 8))
    step = whole_step(model)
    pieces = [(x, y)]
    [(ready_x, ready_y)] = step.inputs(pieces)
    assert ready_x.dtype == torch.bfloat16 and ready_y is y
    results = []
    for given in (pieces, [(ready_x, ready_y)]):
        loss, _ = step(given, torch.zeros(1))
        results.append((loss.clone(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (cast_loss, cast_grads) = results
    assert torch.equal(cast_loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(cast_grads, grads, strict=True))

    for other, bf16 in ((torch.nn.Sequential(torch.nn.Linear(32, 8)), False),
                        (torch.nn.Sequential(torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 8)),
                         True),
                        (Scaled(), True)):
        assert whole_step(other, bf16).inputs(pieces)[0][0] is x


def test_alone_the_step_is_one_compiled_graph_around_the_matmuls(no_launcher):
    """Under the profiler, the compiled step dispatches the five matmuls (inductor calls
    them as extern kernels) and nothing else: the bias, ReLU, the loss, their gradients,
    the update and the loss's write into the loss record all run in inductor's fused
    code."""
    from distnn.config import TrainConfig
    from distnn.distributed.runtime import setup
    from distnn.tools.profile import profile_steps

    with setup(device="cpu") as rt:
        compiled = profile_steps(TrainConfig(steps=40, compile=True, verify_every=0), rt)
    per_step = {name: calls for name, calls, _ in compiled.top if calls >= 0.5}
    assert per_step == {"aten::addmm": 2, "aten::mm": 3}, compiled


def test_the_losses_a_compiled_step_writes_itself_wrap_around_the_record(tmp_path,
                                                                         no_launcher):
    """The fused step writes each loss into the loss record's device window (4096 slots) at
    a slot it advances itself: past the window's end the losses are still each step's."""
    from distnn.run.lossrecord import WINDOW

    steps = WINDOW + 200
    losses, _, _ = _run(tmp_path, "long", "--compile", "--steps", str(steps), "--d-in", "20")
    want, _ = reference_run(steps=steps, d_in=20)  # about 0.05 at the window's end
    assert len(losses) == steps
    for step in (0, 1, WINDOW - 1, WINDOW, WINDOW + 1, steps - 1):
        assert losses[step] == pytest.approx(want[step], rel=1e-4), step


def test_a_run_with_another_learning_rate_in_the_same_process_compiles_nothing_new(
        tmp_path, no_launcher):
    """A sweep over --lr in one process (distnn.fit in a notebook, say) reuses the compiled
    step: the rate is read from a tensor, not built into the code (8 rates used to reach
    torch's recompile limit, and the step fell back to eager)."""
    _run(tmp_path, "first", "--compile", "--steps", "20", "--d-in", "20", "--lr", "1e-4")
    graphs = counters["stats"]["unique_graphs"]
    losses, weights, _ = _run(tmp_path, "other", "--compile", "--steps", "20", "--d-in", "20",
                              "--lr", "3e-4")
    assert counters["stats"]["unique_graphs"] == graphs > 0
    assert_matches_reference(losses, weights, steps=20, d_in=20, lr=3e-4)


def test_steps_of_one_model_share_compiled_code_and_other_models_have_their_own():
    """Dynamo counts compiled versions per code object, and past eight fails a fullgraph
    call: a process that compiled eight kinds of model (a notebook, this suite) could compile
    no ninth. Each kind of model gets its own copy of the step's code; a second step of the
    same kind shares it, so what was compiled for the first is reused."""
    from distnn.distributed.gradsync import FlatGradSync

    def code_of(width):
        model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(),
                                    torch.nn.Linear(width, 2))
        sync = FlatGradSync(model, distributed=False, extra_slots=2)
        step = wholestep.WholeStep(model, torch.nn.MSELoss(reduction="sum"), sync, lr=0.1,
                                   bf16=False,
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        return step._compiled_write_gradient.__wrapped__.__func__.__code__

    first, again, other = code_of(3), code_of(3), code_of(5)
    assert first is again and first is not other
    shared = wholestep.WholeStep._write_gradient.__code__
    assert first is not shared and other is not shared


def test_micro_batches_with_a_batch_of_one_row_record_every_loss(tmp_path, no_launcher):
    """9 rows in batches of 4, 4 and 1 with --micro-batches 2: the 1-row batch is one piece,
    which alone would be one compiled function writing its own loss, between steps whose
    losses the trainer records; every step's loss must land in its own place."""
    generator = torch.Generator().manual_seed(7)
    x, y = torch.randn(9, 5, generator=generator), torch.randn(9, 2, generator=generator)
    data = tmp_path / "d.safetensors"
    save_file({"x": x, "y": y}, data)
    losses, weights, _ = _run(tmp_path, "run", "--compile", "--micro-batches", "2", "--data",
                              str(data), "--hidden", "4", "--batch-size", "4", "--lr", "1e-2",
                              "--epochs", "2")
    want_losses, want_weights, _ = minibatch_reference(x=x, y=y, hidden=(4,), batch_size=4,
                                                       epochs=2, lr=1e-2)
    assert_close_run(losses, weights, want_losses, want_weights)
