"""CUDA: the GPU result equals the CPU reference; NCCL at world 1; ranks sharing a GPU over gloo.

Skipped without CUDA; `make test-gpu` (DISTNN_REQUIRE_GPU=1) turns the skip into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from distnn.train import main
from tests.conftest import as_rank, bin_path, read_losses, read_metrics, run_cli
from tests.reference import assert_matches_reference, reference_run

if not torch.cuda.is_available():
    if os.environ.get("DISTNN_REQUIRE_GPU") == "1":
        raise RuntimeError("DISTNN_REQUIRE_GPU=1 but CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

pytestmark = pytest.mark.gpu
STEPS = 200


def outputs(tmp_path) -> list[str]:
    return ["--steps", str(STEPS), "--metrics", str(tmp_path / "m.jsonl"),
            "--save", str(tmp_path / "w.safetensors")]


def check(tmp_path, *, world_size: int, device: str, backend: str) -> None:
    summary = read_metrics(tmp_path / "m.jsonl")[-1]
    assert (summary["world_size"], summary["device"], summary["backend"]) == (
        world_size, device, backend)
    assert_matches_reference(read_losses(tmp_path / "m.jsonl"),
                             load_file(tmp_path / "w.safetensors"), steps=STEPS)


def test_one_process_on_cuda_matches_the_cpu_reference(tmp_path, no_launcher):
    assert main(["--device", "cuda", *outputs(tmp_path)]) == 0
    check(tmp_path, world_size=1, device="cuda:0", backend="none")


def test_nccl_world_one_under_torchrun(tmp_path):
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=1", "-m", "distnn.train",
                      "--backend", "nccl", *outputs(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    check(tmp_path, world_size=1, device="cuda:0", backend="nccl")


def test_two_ranks_share_one_gpu_over_gloo(tmp_path):
    ranks = torch.cuda.device_count() + 1  # at least two ranks on one GPU
    result = run_cli([bin_path("torchrun"), f"--nproc_per_node={ranks}", "-m", "distnn.train",
                      "--device", "cuda", "--backend", "gloo", *outputs(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    check(tmp_path, world_size=ranks, device="cuda:0", backend="gloo")


def test_nccl_with_more_ranks_than_gpus_is_refused_on_every_rank():
    ranks = torch.cuda.device_count() + 1
    result = run_cli([bin_path("torchrun"), f"--nproc_per_node={ranks}", "-m", "distnn.train",
                      "--backend", "nccl"], timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("distnn:")]
    assert len(lines) == ranks and all("use --backend gloo" in line for line in lines)


def run_one(tmp_path, name: str, flags: list[str], *, torchrun: bool = False):
    """One run on the GPU: (losses, final weights, summary)."""
    out = tmp_path / name
    out.mkdir()
    args = ["--device", "cuda", *outputs(out), *flags]
    if torchrun:
        result = run_cli([bin_path("torchrun"), "--nproc_per_node=1", "-m", "distnn.train",
                          "--backend", "nccl", *args])
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert main(args) == 0
    return (read_losses(out / "m.jsonl"), load_file(out / "w.safetensors"),
            read_metrics(out / "m.jsonl")[-1])


def assert_same_bits(eager, graph) -> None:
    assert graph[0] == eager[0]
    for name, tensor in eager[1].items():
        assert torch.equal(graph[1][name], tensor), name


@pytest.mark.parametrize("flags", [[], ["--micro-batches", "3"]])
def test_cuda_graph_under_torchrun_gives_the_bits_of_the_eager_step(tmp_path, flags):
    eager = run_one(tmp_path, "eager", flags, torchrun=True)
    graph = run_one(tmp_path, "graph", ["--cuda-graph", *flags], torchrun=True)
    assert_same_bits(eager, graph)
    assert_matches_reference(graph[0], graph[1], steps=STEPS)
    assert graph[2]["compile_s"] > 0  # the capture, outside the step timings


def _library_run(device: torch.device, *, graphed: bool) -> dict:
    """STEPS steps through the library API, eager or captured; the losses and weights."""
    from distnn import FlatGradSync
    from distnn.config import TrainConfig
    from distnn.data.shards import reference_setup
    from distnn.step.cudagraph import capture_step

    x, y, model = reference_setup(TrainConfig().resolved())
    x, y, model = x.to(device), y.to(device), model.to(device)
    sync = FlatGradSync(model, distributed=True, bucket_mb=0.004)
    assert sync.buckets == 2  # the first one's all-reduce is started by a backward hook
    loss_fn = torch.nn.MSELoss(reduction="sum")

    def step() -> torch.Tensor:
        sync.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        summed = sync.all_reduce(loss)
        sync.sgd_step(1e-4)
        return summed

    run = step
    if graphed:
        replay, summed = capture_step(step, restore=[sync.flat_params])

        def run() -> torch.Tensor:
            replay()
            return summed

    losses = torch.zeros(STEPS, device=device)
    for index in range(STEPS):
        losses[index] = run()[0]
    return {"losses": losses.tolist(),
            "weights": {k: v.cpu() for k, v in model.state_dict().items()}}


def _captured_sum_of_ones(size: int):
    """A step captured over a batch that only the step itself refers to, once this returns."""
    from distnn.step.cudagraph import capture_step

    x = torch.ones(size, device="cuda")
    out = torch.zeros((), device="cuda")

    def step() -> torch.Tensor:
        torch.sum(x, dim=0, out=out)
        return out

    return capture_step(step, restore=[])


def test_a_replay_keeps_the_memory_its_step_reads_alive():
    """A graph reads the addresses it was captured on: had the batch been freed when the
    caller let go of it, the NaNs allocated next would take its memory and the sum."""
    size = 1 << 20
    replay, out = _captured_sum_of_ones(size)
    junk = [torch.full((size,), float("nan"), device="cuda") for _ in range(8)]
    replay()
    assert out.item() == size and len(junk) == 8


def test_the_floor_replays_train_after_the_caller_lets_go_of_its_model():
    """bench_loops.captured_floor returns only its replay and loss: its model and batch must
    live on (they once did not, and the floor's losses ran to inf under the bench's
    allocations)."""
    from distnn.config import TrainConfig
    from distnn.tools.bench_loops import captured_floor

    replay, loss = captured_floor(TrainConfig().resolved(), torch.device("cuda"),
                                  compiled=False)
    junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(8)]
    losses = []
    for _ in range(STEPS):
        replay()
        losses.append(loss.item())
    assert len(junk) == 8
    want = reference_run(steps=STEPS)[0]
    for got, expected in zip(losses[:100], want[:100], strict=True):
        assert got == pytest.approx(expected, rel=1e-5)  # the reference's fidelity tolerance


def _nccl_capture_worker(rank: int, port: int, out_path: str) -> None:
    # The trainer makes no collective in a group of one rank; this drives the library
    # directly so that NCCL all-reduces are inside the captured graph, as with several GPUs.
    as_rank(0, 1, port)
    from distnn import setup

    with setup(device="cuda", backend="nccl") as rt:
        results = {graphed: _library_run(rt.device, graphed=graphed) for graphed in (False, True)}
    torch.save(results, out_path)


def test_nccl_all_reduce_captured_in_the_graph_gives_the_eager_bits(tmp_path):
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    out_path = str(tmp_path / "results.pt")
    mp.start_processes(_nccl_capture_worker, args=(free_port(), out_path), nprocs=1,
                       start_method="spawn")
    results = torch.load(out_path)
    eager, graph = results[False], results[True]
    assert_same_bits((eager["losses"], eager["weights"]), (graph["losses"], graph["weights"]))
    assert_matches_reference(graph["losses"], graph["weights"], steps=STEPS)


def test_cuda_graph_in_one_process_with_bf16_gives_the_bits_of_the_eager_step(tmp_path,
                                                                               no_launcher):
    eager = run_one(tmp_path, "eager", ["--precision", "bf16"])
    graph = run_one(tmp_path, "graph", ["--precision", "bf16", "--cuda-graph"])
    assert_same_bits(eager, graph)


def test_the_whole_step_compiled_and_captured_matches_the_reference_bit_for_bit_again(
        tmp_path, no_launcher):
    first = run_one(tmp_path, "first", ["--cuda-graph", "--compile"])
    assert_matches_reference(first[0], first[1], steps=STEPS)
    assert first[2]["compile_s"] > 0
    compiled = run_one(tmp_path, "compiled", ["--compile"])  # the same kernels, not captured
    assert_matches_reference(compiled[0], compiled[1], steps=STEPS)
    assert_same_bits(first, run_one(tmp_path, "again", ["--cuda-graph", "--compile"]))


@pytest.mark.parametrize("flags", [{"compile": True}, {"compile": True, "cuda_graph": True}])
def test_the_step_clock_starts_once_the_gpu_has_done_the_compile_and_capture(flags,
                                                                             monkeypatch):
    # A compile's warm-up steps were still queued on the GPU when the clock started: with 10
    # timed steps of the compute workload, --compile read 30.0 ms/step against 27.4 captured
    # (H100, 2026-11-27). The steps must start on an idle GPU.
    from distnn.config import TrainConfig
    from distnn.distributed.runtime import setup
    from distnn.trainer import Trainer

    idle_at_start = []
    run_steps = Trainer._run_steps

    def observed(self, *args):
        idle_at_start.append(torch.cuda.current_stream().query())
        return run_steps(self, *args)

    monkeypatch.setattr(Trainer, "_run_steps", observed)
    config = TrainConfig(batch_size=4096, d_in=2048, hidden=(2048,), d_out=2048, lr=1e-9,
                         steps=2, log_every=0, quiet=True, verify_every=0, **flags)
    with setup(device="cuda") as rt:
        result = Trainer(config, rt).train()
    assert result.compiled and idle_at_start == [True]


def test_bf16_whole_step_compiled_keeps_the_eager_bf16_numbers(tmp_path, no_launcher, caplog):
    """The bf16 weight copies the compiled update refreshes, and the fusions (the loss with
    rows summed first, Linear+ReLU in one cuBLASLt call): the eager bf16 step's losses,
    within the tolerance measured on the CPU (tests/test_wholestep.py), from a step that
    did compile (no fallback to the eager step)."""
    from tests.test_wholestep import BF16_VS_EAGER

    eager = run_one(tmp_path, "eager", ["--precision", "bf16"])
    compiled = run_one(tmp_path, "compiled", ["--precision", "bf16", "--compile",
                                              "--cuda-graph"])
    assert not [r for r in caplog.records if "could not be compiled" in r.message]
    for got, want in zip(compiled[0][:100], eager[0][:100], strict=True):
        assert got == pytest.approx(want, rel=BF16_VS_EAGER)


TF32_VS_EAGER = 1e-3  # relative, each of the first 100 losses; measured 4.1e-4 (H100, 2026-11-27)


def test_the_compiled_tf32_step_in_its_default_layout_keeps_the_eager_tf32_numbers(
        tmp_path, no_launcher):
    """The compiled TF32 step computes the weight gradients in the forward's layout (two
    transposed copies; wgrad.default): the same TF32 products summed by other kernels."""
    eager = run_one(tmp_path, "eager", ["--precision", "tf32"])
    compiled = run_one(tmp_path, "compiled", ["--precision", "tf32", "--compile",
                                              "--cuda-graph"])
    worst = max(abs(got - want) / abs(want)
                for got, want in zip(compiled[0][:100], eager[0][:100], strict=True))
    assert worst <= TF32_VS_EAGER, f"worst relative difference {worst:.3g}"


def test_cuda_graph_over_gloo_is_refused_on_every_rank():
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train",
                      "--device", "cuda", "--backend", "gloo", "--cuda-graph"], timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("distnn:")]
    assert len(lines) == 2 and all("--cuda-graph: the backend is gloo" in line
                                   for line in lines), lines


def test_a_stuck_gpu_fails_the_wait_after_the_timeout_and_every_later_wait_at_once():
    import time

    from distnn.distributed.process_group import DeviceStalled, DeviceWatch

    watch = DeviceWatch(torch.device("cuda", 0), timeout_s=0.2)
    watch.wait()  # nothing queued: returns
    torch.cuda._sleep(3 * 10**9)  # a kernel that spins for about 1.5-2 s
    started = time.monotonic()
    with pytest.raises(DeviceStalled, match="did not finish within 0.2 s"):
        watch.wait()
    assert time.monotonic() - started < 1.0
    with pytest.raises(DeviceStalled):
        watch.wait()  # the device is known to be stuck: no second wait
    torch.cuda.synchronize()


def test_a_gpu_stuck_under_cuda_graph_ends_the_run_in_one_line_after_the_timeout(tmp_path):
    # As when a peer hangs alive: the collectives inside the graph are out of NCCL's
    # watchdog's sight, and the GPU waits in them. Here a spinning kernel stands in for them.
    import time

    from tests.conftest import clean_env

    env = clean_env(DISTNN_FAULT_STEP="20", DISTNN_FAULT_RANK="0", DISTNN_FAULT_KIND="stall")
    started = time.monotonic()
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=1", "-m", "distnn.train",
                      "--backend", "nccl", "--cuda-graph", "--steps", "60", "--timeout-s", "1",
                      "--metrics", str(tmp_path / "m.jsonl")], env=env, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    lines = [line for line in result.stderr.splitlines() if line.startswith("distnn: error")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert ("waiting for this rank's GPU failed: the steps queued on it did not finish within "
            "1 s") in lines[0] and "--timeout-s 1" in lines[0], lines
    read_metrics(tmp_path / "m.jsonl")  # closed on the way out: every line in it is whole


def test_a_tf32_run_leaves_the_fp32_runs_after_it_in_fp32(tmp_path, no_launcher):
    # TF32 is a process-wide switch; the benchmark's fp32 rows once ran in TF32 because a
    # tf32 run before them in the same process had left it on.
    alone = run_one(tmp_path, "alone", [])
    run_one(tmp_path, "tf32", ["--precision", "tf32"])
    after = run_one(tmp_path, "after", [])
    assert_same_bits(alone, after)
    assert not torch.backends.cuda.matmul.allow_tf32


def test_the_profile_of_a_captured_step_counts_its_kernels_and_gpu_time(no_launcher):
    from distnn.config import TrainConfig
    from distnn.distributed.runtime import setup
    from distnn.tools.profile import profile_steps

    with setup(device="cuda") as rt:
        eager = profile_steps(TrainConfig(steps=50), rt)
        graph = profile_steps(TrainConfig(steps=50, cuda_graph=True), rt)
    # The same kernels run in both (the graph replays the eager step's), about twenty.
    assert 10 <= graph.work_per_step <= 40, graph
    assert abs(graph.work_per_step - eager.work_per_step) <= 2, (eager, graph)
    assert 0 < graph.busy_us <= graph.wall_us * 1.05, graph


def test_the_profile_of_the_floor_counts_its_kernels_beside_the_captured_step(no_launcher):
    from distnn.config import TrainConfig
    from distnn.distributed.runtime import setup
    from distnn.tools.profile import main as profile_main
    from distnn.tools.profile import profile_floor

    with setup(device="cuda") as rt:
        floor = profile_floor(TrainConfig(steps=50), rt)
    assert 10 <= floor.work_per_step <= 40, floor
    assert 0 < floor.busy_us <= floor.wall_us * 1.05, floor
    assert profile_main(["--floor", "--precision", "bf16", "--steps", "5"]) == 2


def test_mini_batches_from_a_file_on_cuda_match_torch_optim_on_the_cpu(tmp_path, no_launcher):
    """Rows read one step ahead into pinned memory, copied to the GPU, AdamW on CUDA; and the
    same under --cuda-graph with torch's sgd (every batch the same size): the CPU reference."""
    from safetensors.torch import save_file

    from tests.reference import assert_close_run, minibatch_reference

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 12, generator=generator), torch.randn(96, 3, generator=generator)
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    for name, flags, reference in (
            ("adamw", ["--optimizer", "adamw", "--lr", "1e-2"], {"optimizer": "adamw",
                                                                  "lr": 1e-2}),
            ("graph", ["--cuda-graph", "--lr", "1e-3"], {"lr": 1e-3})):
        out = tmp_path / name
        out.mkdir()
        assert main(["--device", "cuda", "--data", str(tmp_path / "d.safetensors"),
                     "--batch-size", "16", "--epochs", "4", "--hidden", "8",
                     "--metrics", str(out / "m.jsonl"), "--save", str(out / "w.safetensors"),
                     *flags]) == 0
        losses, weights, _ = minibatch_reference(x=x, y=y, batch_size=16, epochs=4,
                                                 hidden=(8,), **reference)
        assert_close_run(read_losses(out / "m.jsonl"), load_file(out / "w.safetensors"),
                         losses, weights)


def test_out_of_memory_on_the_gpu_in_a_step_is_one_line_and_exit_5():
    """torch.OutOfMemoryError from a real CUDA allocation in a step (the oom drill)."""
    import sys

    from tests.conftest import clean_env

    env = clean_env(DISTNN_FAULT_STEP="3", DISTNN_FAULT_RANK="0", DISTNN_FAULT_KIND="oom")
    result = run_cli([sys.executable, "-m", "distnn.train", "--device", "cuda", "--steps",
                      "10", "--log-every", "0"], env=env)
    lines = [line for line in result.stderr.splitlines() if line.startswith("distnn:")]
    assert result.returncode == 5, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(
        "distnn: error: out of memory on cuda:0: torch could not allocate "), lines


def test_the_language_model_recipe_on_cuda_matches_plain_torch(tmp_path, no_launcher):
    """The GPT recipe (byte tokens, mean cross-entropy with ignored targets, AdamW, cosine
    after a warm-up, clipping) on the GPU: in fp32 within the guarantee of the CPU plain-torch
    reference; under --precision bf16 within a tolerance of plain torch's bf16 autocast loop
    on the same GPU (measured: each difference is written to $DISTNN_GPU_OUT/lm-bf16.json
    when that is set, and printed)."""
    import json

    from safetensors.torch import save_file

    from tests.reference import assert_close_run
    from tests.test_language_model import RECIPE, byte_rows, plain_torch, recipe_flags

    x, y = byte_rows()
    save_file({"x": x, "y": y}, tmp_path / "tokens.safetensors")
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        out.mkdir()
        assert main([*recipe_flags(tmp_path / "tokens.safetensors"), "--device", "cuda",
                     "--precision", precision, "--log-every", "1",
                     "--metrics", str(out / "m.jsonl"), "--save",
                     str(out / "w.safetensors")]) == 0
        runs[precision] = (read_losses(out / "m.jsonl"), load_file(out / "w.safetensors"))
    losses, _, _, weights = plain_torch(x, y, **RECIPE)
    assert_close_run(*runs["fp32"], losses, weights)
    bf16_losses, _, _, bf16_weights = plain_torch(x, y, **RECIPE, device="cuda", bf16=True)
    got, want = (torch.tensor(v, dtype=torch.float64) for v in (runs["bf16"][0], bf16_losses))
    measured = {
        "loss_rel_vs_plain_bf16": ((got - want).abs() / want.abs()).max().item(),
        "loss_rel_vs_fp32_reference": ((got - torch.tensor(losses, dtype=torch.float64)).abs()
                                       / want.abs()).max().item(),
        "weight_abs_vs_plain_bf16": max((runs["bf16"][1][name].float() - tensor).abs().max()
                                        .item() for name, tensor in bf16_weights.items()),
    }
    print(f"bf16 language-model recipe on {torch.cuda.get_device_name()}: {measured}")
    if os.environ.get("DISTNN_GPU_OUT"):
        with open(os.path.join(os.environ["DISTNN_GPU_OUT"], "lm-bf16.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), **measured}, f, indent=1)
    # bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 3.9e-3); two bf16 runs whose
    # sums round in other orders part by a few of those over 50 steps of AdamW
    assert measured["loss_rel_vs_plain_bf16"] <= 2e-2, measured
    assert measured["loss_rel_vs_fp32_reference"] <= 5e-2, measured
