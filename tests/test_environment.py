"""Launch detection and device/backend choice: pure functions of a dict and a GPU count."""

from __future__ import annotations

import pytest

from distnn.distributed.environment import (
    LaunchEnv,
    detect_launch,
    resolve_placement,
    single_process_notice,
    started_by_agent,
)
from distnn.errors import UsageError

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "job",
            "TORCHELASTIC_RESTART_COUNT": "2"}


def launch(local_rank=0, local_world_size=1, **kwargs) -> LaunchEnv:
    return LaunchEnv(launcher="torchrun", rank=local_rank, local_rank=local_rank,
                     world_size=local_world_size, local_world_size=local_world_size, **kwargs)


def test_no_launcher_is_one_process_without_a_group():
    env = detect_launch({"PATH": "/bin"})
    assert (env.launcher, env.rank, env.world_size) == ("none", 0, 1)
    assert not env.needs_process_group and env.is_main


def test_torchrun_multi_node_rank():
    env = detect_launch(TORCHRUN)
    assert env == LaunchEnv(launcher="torchrun", rank=3, local_rank=1, world_size=4,
                            local_world_size=2, restart_count=2, rendezvous=True, agent=True)
    assert env.needs_process_group and not env.is_main


@pytest.mark.parametrize("value, shared", [("True", True), ("False", False), (None, False)])
def test_the_store_outlives_the_ranks_only_when_it_is_the_agents(value, shared):
    # torchrun sets TORCHELASTIC_USE_AGENT_STORE=True unless its store is not shared
    # (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), when rank 0's process holds it
    environ = TORCHRUN if value is None else {**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": value}
    assert detect_launch(environ).agent_store is shared


def test_accelerate_launch_multi_process_is_recognised():
    env = detect_launch({**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"})
    assert env.launcher == "accelerate" and env.world_size == 4


def test_accelerate_cpu_starts_one_process_that_prefers_the_cpu():
    env = detect_launch({"ACCELERATE_USE_CPU": "True"})
    assert (env.launcher, env.world_size, env.prefer_cpu) == ("accelerate", 1, True)
    assert not env.needs_process_group


@pytest.mark.parametrize("environ, noticed", [
    ({"ACCELERATE_USE_CPU": "True"}, True),  # accelerate launch --cpu --num_processes N
    # (with --num_processes 2 accelerate also sets MASTER_ADDR/PORT, but no RANK)
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),
    ({"ACCELERATE_USE_CPU": "true"}, True),
    ({"ACCELERATE_USE_CPU": "False"}, False),  # accelerate launch without --cpu
    ({"PATH": "/bin"}, False),  # python -m distnn.train
    ({**TORCHRUN, "ACCELERATE_USE_CPU": "True"}, False),  # several ranks: nothing to say
    ({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
      "ACCELERATE_USE_CPU": "True"}, True),
])
def test_accelerate_cpu_at_world_size_1_gets_a_notice(environ, noticed):
    notice = single_process_notice(detect_launch(environ))
    if not noticed:
        assert notice is None
    else:
        assert "accelerate launch --cpu" in notice and "single process" in notice
        assert "accelerate launch --multi_gpu --num_processes N starts N ranks" in notice
        assert "gloo" in notice


def test_plain_environment_variables_without_torchrun():
    env = detect_launch({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env.launcher, env.local_rank, env.local_world_size) == ("env", 0, 2)
    assert not env.agent


@pytest.mark.parametrize("environ, agent", [
    (TORCHRUN, True),  # torchrun's elastic agent
    ({**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"}, True),  # accelerate launch runs it too
    ({"PATH": "/bin"}, False),  # python -m distnn.train from a shell
    ({"ACCELERATE_USE_CPU": "True"}, False),  # accelerate launch --cpu: one plain process
    ({k: v for k, v in TORCHRUN.items() if not k.startswith("TORCHELASTIC_")}, False),
    ({k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RESTART_COUNT"}, False),
    ({"TORCHELASTIC_RUN_ID": "x", "TORCHELASTIC_RESTART_COUNT": "0"}, False),  # no rank
])
def test_only_a_torchelastic_agent_is_a_launcher_to_watch(environ, agent):
    assert started_by_agent(environ) is agent
    assert detect_launch(environ).agent is agent


@pytest.mark.parametrize("environ, words", [
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({**TORCHRUN, "RANK": "4"}, "0 <= RANK < WORLD_SIZE"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK < LOCAL_WORLD_SIZE"),
    ({**TORCHRUN, "MASTER_PORT": ""}, "MASTER_PORT is not set"),
    # torch would raise its ValueError, with a traceback, as it joined
    ({**TORCHRUN, "MASTER_PORT": "abc"}, "MASTER_PORT='abc'; allowed: a port number from 0"),
    ({**TORCHRUN, "MASTER_PORT": "65536"}, "MASTER_PORT='65536'"),
    ({**TORCHRUN, "MASTER_PORT": "-1"}, "MASTER_PORT='-1'"),
])
def test_inconsistent_launch_variables_are_usage_errors(environ, words):
    with pytest.raises(UsageError) as info:
        detect_launch(environ)
    assert str(info.value).startswith("environment: ") and words in str(info.value)


def test_auto_without_cuda_is_cpu_and_gloo():
    placement = resolve_placement(device="auto", backend="auto", launch=launch(1, 4),
                                  cuda_devices=0)
    assert (placement.device, placement.backend, placement.notice) == ("cpu", "gloo", None)


def test_auto_with_a_gpu_per_rank_is_cuda_local_rank_and_nccl():
    placement = resolve_placement(device="auto", backend="auto", launch=launch(2, 4),
                                  cuda_devices=4)
    assert (placement.device, placement.backend) == ("cuda:2", "nccl")


def test_auto_with_fewer_gpus_than_ranks_falls_back_to_cpu_with_a_notice():
    placement = resolve_placement(device="auto", backend="auto", launch=launch(0, 4),
                                  cuda_devices=1)
    assert (placement.device, placement.backend) == ("cpu", "gloo")
    assert "--device cuda --backend gloo" in placement.notice


def test_explicit_cuda_shares_gpus_over_gloo():
    placement = resolve_placement(device="cuda", backend="auto", launch=launch(3, 4),
                                  cuda_devices=1)
    assert (placement.device, placement.backend) == ("cuda:0", "gloo")


def test_accelerate_cpu_overrides_auto_device():
    placement = resolve_placement(device="auto", backend="auto",
                                  launch=launch(0, 1, prefer_cpu=True), cuda_devices=8)
    assert (placement.device, placement.backend) == ("cpu", "gloo")


@pytest.mark.parametrize("device, backend, ranks, gpus, words", [
    ("cuda", "auto", 1, 0, "--device: got 'cuda' but CUDA is not available"),
    ("auto", "nccl", 1, 0, "--backend: got 'nccl' but CUDA is not available"),
    ("cpu", "nccl", 1, 1, "--backend: got 'nccl' with --device cpu"),
    ("auto", "nccl", 4, 1, "4 local ranks but 1 GPU(s)"),
    ("cuda", "nccl", 2, 1, "use --backend gloo"),
])
def test_impossible_device_backend_pairs_are_usage_errors(device, backend, ranks, gpus, words):
    with pytest.raises(UsageError) as info:
        resolve_placement(device=device, backend=backend, launch=launch(0, ranks),
                          cuda_devices=gpus)
    assert words in str(info.value)
