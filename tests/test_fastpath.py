"""Buckets, micro-batches and precision change speed or memory, not the result; and the
step's operator count, which on a GPU is its kernel launches."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distnn.distributed.gradsync import FlatGradSync, plan_buckets, sums_via_root
from distnn.train import main
from tests.conftest import bin_path, read_losses, run_cli, run_world
from tests.reference import assert_matches_reference, reference_run


@pytest.mark.parametrize("sizes, capacity, want", [
    ([10, 1000, 100, 100000], 26214, [(0, 4)]),  # the last tensor fills the bucket
    ([10, 1000, 100, 100000], 1000, [(0, 2), (2, 4)]),  # each bias with its weight
    ([5, 5, 5], 10, [(0, 2), (2, 3)]),
    ([50, 5], 10, [(0, 1), (1, 2)]),  # too big for a bucket: closes it, not split
    ([1, 2, 3], 100, [(0, 3)]),
    ([], 10, []),
])
def test_plan_buckets(sizes, capacity, want):
    assert plan_buckets(sizes, capacity) == want


# The reference model's gradients in two buckets (checked just below): 1110 and 100000 floats
# (1136 and 100000 with the gaps that start each parameter on a multiple of 16 floats).
TWO_BUCKETS_MB = 0.004


def test_a_small_model_is_one_bucket_and_a_tiny_bucket_size_splits_it():
    model = torch.nn.Sequential(torch.nn.Linear(1000, 100), torch.nn.ReLU(),
                                torch.nn.Linear(100, 10))
    assert FlatGradSync(model, distributed=False).buckets == 1
    split = FlatGradSync(model, distributed=False, extra_slots=2, bucket_mb=TWO_BUCKETS_MB)
    assert split.buckets == 2
    # b2 at 0, W2 at 16, b1 at 1024, W1 at 1136; the last bucket holds the extras
    assert split.bucket_ranges == [(0, 1136), (1136, 101138)]


def test_buckets_overlapped_with_backward_give_the_same_bits(tmp_path):
    one = run_world(2, ["--steps", "100"], tmp_path / "one")
    two = run_world(2, ["--steps", "100", "--bucket-mb", str(TWO_BUCKETS_MB)], tmp_path / "two")
    assert one["losses"] == two["losses"]  # two ranks: a + b in any layout is the same sum
    for name, tensor in one["weights"][0].items():
        assert torch.equal(tensor, two["weights"][0][name]), name
        assert torch.equal(tensor, two["weights"][1][name]), name


def test_micro_batches_on_three_ranks_match_the_reference(tmp_path):
    # 64 rows on 3 ranks (22, 21, 21) in 4 pieces each, 2 buckets
    result = run_world(3, ["--micro-batches", "4", "--bucket-mb", str(TWO_BUCKETS_MB)],
                       tmp_path)
    assert_matches_reference(result["losses"], result["weights"][0])


def test_more_micro_batches_than_rows_is_still_right(tmp_path, no_launcher):
    assert main(["--batch-size", "3", "--micro-batches", "5", "--steps", "50", "--metrics",
                 str(tmp_path / "m.jsonl"), "--save", str(tmp_path / "w.safetensors")]) == 0
    from safetensors.torch import load_file

    assert_matches_reference(read_losses(tmp_path / "m.jsonl"),
                             load_file(tmp_path / "w.safetensors"), batch_size=3, steps=50)


def test_bf16_trains_as_a_plain_autocast_loop(tmp_path, no_launcher):
    assert main(["--precision", "bf16", "--steps", "100", "--log-every", "1",
                 "--metrics", str(tmp_path / "m.jsonl")]) == 0
    losses = read_losses(tmp_path / "m.jsonl")
    autocast, _ = reference_run(steps=100, bf16=True)
    fp32, _ = reference_run(steps=100)
    # the first steps are the loop's (measured: bitwise) and not fp32's (measured 1.7e-4);
    # then the update's single rounding (docs/performance.md) makes the runs drift apart:
    # measured 0.24% by step 100
    assert max_relative(losses[:10], autocast[:10]) < 1e-5 < max_relative(losses[:10],
                                                                          fp32[:10])
    assert max_relative(losses, autocast) < 1e-2
    assert losses[-1] < losses[0] / 100


def max_relative(got, want):
    return max(abs(mine - theirs) / abs(theirs) for mine, theirs in zip(got, want, strict=True))


def test_tf32_on_the_cpu_is_refused(capsys, no_launcher):
    assert main(["--precision", "tf32", "--device", "cpu", "--steps", "1"]) == 2
    assert "--precision: got 'tf32' but this rank computes on the CPU" in capsys.readouterr().err


CPU_REFUSAL = ("distnn: error: --cuda-graph: this rank computes on the CPU, and a CUDA graph "
               "captures CUDA kernels; allowed: --cuda-graph on a CUDA device")


def test_cuda_graph_on_the_cpu_is_refused(capsys, no_launcher):
    assert main(["--cuda-graph", "--device", "cpu", "--steps", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [CPU_REFUSAL]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --cuda-graph runs (test_gpu)")
def test_cuda_graph_on_a_machine_without_cuda_is_refused(capsys, no_launcher):
    assert main(["--cuda-graph", "--steps", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [CPU_REFUSAL]


def test_cuda_graph_on_cpu_ranks_is_refused_on_every_rank():
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train",
                      "--device", "cpu", "--cuda-graph"], timeout=60)
    assert result.returncode != 0
    lines = sorted(line for line in result.stderr.splitlines() if line.startswith("distnn:"))
    assert lines == [CPU_REFUSAL.replace("distnn: error:", f"distnn: rank {r}: error:")
                     for r in range(2)], result.stderr[-2000:]


def test_compiled_forward_matches_the_reference_and_reports_its_compile_time(tmp_path,
                                                                            no_launcher):
    metrics, weights = tmp_path / "m.jsonl", tmp_path / "w.safetensors"
    # Two uneven pieces: two shapes to compile.
    started = time.perf_counter()
    assert main(["--compile", "--micro-batches", "2", "--batch-size", "9", "--steps", "100",
                 "--metrics", str(metrics), "--save", str(weights)]) == 0
    elapsed = time.perf_counter() - started
    from safetensors.torch import load_file

    from tests.conftest import read_metrics

    assert_matches_reference(read_losses(metrics), load_file(weights), batch_size=9,
                             steps=100)
    summary = read_metrics(metrics)[-1]
    # the compile is timed apart from the step loop (wall_s): the two spans, one after the
    # other, fit in the call (the steps alone can outlast a compile reused from earlier
    # runs in this process, on a loaded machine)
    assert 0 < summary["compile_s"] and summary["compile_s"] + summary["wall_s"] < elapsed


@pytest.mark.parametrize("changes, want", [
    ({}, True),
    ({"max_mb": 0.0}, False),
    ({"max_mb": 0.1}, False),  # 404 KB is too big for it
    ({"world_size": 1}, False),  # nothing to sum
    ({"world_size": 9}, False),  # too many peers for rank 0 to receive from
    ({"world_size": 8}, True),
    ({"buckets": 2}, False),  # buckets overlap with backward: ring all-reduces
    ({"device": torch.device("cuda", 0)}, False),
])
def test_summing_through_rank_0_is_chosen_only_for_one_small_cpu_bucket(changes, want):
    # The reference model's gradients and the two extra slots: 101112 floats, 404 KB.
    args = {"buckets": 1, "world_size": 4, "device": torch.device("cpu"),
            "nbytes": 101112 * 4, "max_mb": 1.0}
    assert sums_via_root(**{**args, **changes}) is want


class OpCounter(TorchDispatchMode):
    """Counts the operators that compute (views are left out): on a GPU, each is a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(run: Callable[[int], None]) -> Counter:
    """The operators one step of ``run(steps)`` adds: (a 16-step run - an 8-step run) / 8."""
    counts = []
    for steps in (8, 16):
        counter = OpCounter()
        with counter:
            run(steps)
        counts.append(counter.counts)
    return Counter({name: n / 8 for name, n in (counts[1] - counts[0]).items()})


def tutorial_without_sync(steps: int) -> None:
    """The tutorial's loop with its losses kept on the device and one multi-tensor update:
    the leanest eager step the tutorial's model allows."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1000), torch.randn(64, 10)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 100), torch.nn.ReLU(),
                                torch.nn.Linear(100, 10))
    params = list(model.parameters())
    loss_fn = torch.nn.MSELoss(reduction="sum")
    losses = torch.zeros(steps)
    for step in range(steps):
        loss = loss_fn(model(x), y)
        losses[step] = loss
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-1e-4)


def test_a_one_process_step_dispatches_the_operators_of_the_leanest_loop(capsys, no_launcher):
    def distnn_run(steps: int) -> None:
        assert main(["--steps", str(steps), "--device", "cpu", "--log-every", "0",
                     "--verify-every", "0", "--quiet"]) == 0

    mine, lean = ops_per_step(distnn_run), ops_per_step(tutorial_without_sync)
    assert lean["addmm"] == 2 and lean["_foreach_add_"] == 1, lean  # the counter sees the step
    # Nothing packed (a rank alone has nothing to sum), no stop votes read from the device.
    assert mine == lean, (mine, lean)


def test_a_run_sets_tf32_for_its_own_steps_and_puts_the_process_setting_back(
        monkeypatch, no_launcher, tmp_path):
    # TF32 is a process-wide switch: an fp32 run turns it off while it runs (a process that
    # had it on, or a tf32 run before it, must not change its numbers) and restores it.
    from distnn.trainer import Trainer

    seen = []
    run_steps = Trainer._run_steps

    def spy(self, *args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return run_steps(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_run_steps", spy)
    torch.backends.cuda.matmul.allow_tf32 = True  # (a property: monkeypatch cannot undo it)
    try:
        assert main(["--steps", "2", "--log-every", "0", "--metrics",
                     str(tmp_path / "m.jsonl")]) == 0
        assert seen == [False]
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_a_replay_holds_the_step_and_so_what_the_step_holds():
    """A CUDA graph reads the addresses it was captured on: the Replay that capture_step
    returns keeps the step, and with it the batch and copies the step refers to, alive."""
    import gc
    import weakref

    from distnn.step.cudagraph import Replay

    batch = torch.ones(4)
    watch = weakref.ref(batch)
    replay = Replay(graph=None, step=lambda held=batch: held.sum())  # type: ignore[arg-type]
    del batch
    gc.collect()
    assert watch() is not None
    del replay
    gc.collect()
    assert watch() is None


class _StandInGraph:
    """For the CPU, where nothing can be captured: a 'replay' runs the captured step again and
    copies its results into the tensors the capture returned, as a replay overwrites them."""

    def __init__(self, step, outputs):
        self.step, self.outputs = step, outputs

    def replay(self) -> None:
        for captured, new in zip(self.outputs, self.step(), strict=True):
            if captured is not None:
                captured.copy_(new)


@pytest.mark.parametrize("flags", [
    ["--steps", "30", "--precision", "bf16", "--compile"],  # a fixed batch, cast once
    ["--batch-size", "16", "--epochs", "2", "--hidden", "8"],  # rows read per step
])
def test_the_trainer_s_cuda_graph_wiring_with_a_stand_in_graph_on_the_cpu(
        tmp_path, no_launcher, monkeypatch, flags):
    """The trainer's --cuda-graph path around the capture (the weights put back after the
    warm-up, each step's rows copied into the tensors the step was captured on, the returned
    loss read after each replay), on the CPU with a stand-in for the graph: the losses of the
    same run without --cuda-graph. The stand-in runs the step's Python again, so it shows
    the wiring only: what a real graph adds (memory it reads being freed, values frozen at
    capture) is tests/test_gpu.py's, which captures for real."""
    from safetensors.torch import save_file

    from distnn.run import agreement
    from distnn.step import builder
    from distnn.step.cudagraph import Replay

    def capture(step, *, restore):
        saved = [tensor.detach().clone() for tensor in restore]
        step()  # a warm-up step, which trains
        outputs = tuple(None if t is None else t.clone() for t in step())
        with torch.no_grad():
            for tensor, value in zip(restore, saved, strict=True):
                tensor.copy_(value)
        return Replay(_StandInGraph(step, outputs), step), outputs

    monkeypatch.setattr(builder, "capture_step", capture)
    monkeypatch.setattr(agreement, "check_placement", lambda config, rt: None)
    generator = torch.Generator().manual_seed(0)
    save_file({"x": torch.randn(96, 12, generator=generator),
               "y": torch.randn(96, 3, generator=generator)}, tmp_path / "d.safetensors")
    data = [] if "--steps" in flags else ["--data", str(tmp_path / "d.safetensors")]
    runs = []
    for name, graph in (("eager", []), ("graph", ["--cuda-graph"])):
        metrics = tmp_path / f"{name}.jsonl"
        assert main([*flags, *data, *graph, "--metrics", str(metrics), "--quiet"]) == 0
        runs.append(read_losses(metrics))
    assert len(runs[1]) == (30 if data == [] else 96 // 16 * 2) and runs[1] == runs[0]


@pytest.mark.parametrize("flags, words", [
    ({"optimizer": "momentum"}, "--cuda-graph: got --optimizer momentum, whose torch.optim "
                                "step is not captured"),
    ({"batch_size": 4}, "--cuda-graph: the data's 10 rows leave a last batch smaller than "
                        "--batch-size 4"),
])
def test_what_a_cuda_graph_cannot_capture_is_refused(tmp_path, flags, words):
    """Checked before the device is (startup.check_job), so testable without a GPU."""
    from safetensors.torch import save_file

    from distnn.config import TrainConfig
    from distnn.errors import UsageError
    from distnn.job.spec import job_from_flags
    from distnn.run.startup import check_job

    save_file({"x": torch.randn(10, 3), "y": torch.randn(10, 2)}, tmp_path / "d.safetensors")
    config = TrainConfig(cuda_graph=True, data=str(tmp_path / "d.safetensors"), **flags)
    with pytest.raises(UsageError, match=re.escape(words)):
        check_job(job_from_flags(config, world_size=1, rank=0))
