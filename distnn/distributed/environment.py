"""Where this process sits in the job: pure functions of the environment, no side effects.

torchrun and ``accelerate launch`` (which runs torchrun underneath) describe the job through
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. With none of them
set this is a single process and needs no process group. torchrun's elastic agent also sets
TORCHELASTIC_RUN_ID and TORCHELASTIC_RESTART_COUNT: then the process's parent is that agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from distnn.errors import UsageError

_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher described it."""

    launcher: str  # "torchrun", "accelerate", "env" (RANK etc. set by other means) or "none"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: which attempt of an elastic job
    prefer_cpu: bool = False  # accelerate launch --cpu
    rendezvous: bool = False  # the launcher gave RANK, WORLD_SIZE and MASTER_ADDR/PORT
    agent: bool = False  # started by torchrun's elastic agent: the parent process to watch
    # the job's key-value store is the agent's (TORCHELASTIC_USE_AGENT_STORE), which outlives
    # every rank; otherwise rank 0's process holds it
    agent_store: bool = False

    @property
    def needs_process_group(self) -> bool:
        """True whenever a launcher set up a rendezvous, even at world size 1 (NCCL works there)."""
        return self.rendezvous

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one rank that prints and writes files."""
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None:
        if default is None:
            raise UsageError(f"environment: {name} is not set but RANK/WORLD_SIZE are; "
                             "launch with torchrun or accelerate launch, or unset RANK and "
                             "WORLD_SIZE to run one process")
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment: {name}={text!r}; allowed: an integer") from None


def started_by_agent(environ: Mapping[str, str]) -> bool:
    """True when torchrun's elastic agent started this process, so its parent is the agent.

    The agent sets TORCHELASTIC_RUN_ID and TORCHELASTIC_RESTART_COUNT beside RANK and
    WORLD_SIZE for every worker it starts (``accelerate launch`` runs the same agent). A
    plain ``python -m distnn.train``, or ranks given RANK etc. by other means, have no agent.
    """
    return all(name in environ for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                                            "TORCHELASTIC_RESTART_COUNT"))


def detect_launch(environ: Mapping[str, str]) -> LaunchEnv:
    """Reads the launcher's variables from ``environ`` (pass ``os.environ``).

    Raises UsageError when the variables are inconsistent (for example RANK >= WORLD_SIZE).
    """
    prefer_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE
    accelerate = any(name.startswith("ACCELERATE_") for name in environ)
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        # `accelerate launch --cpu` starts one plain process and sets no RANK.
        return LaunchEnv(launcher="accelerate" if accelerate else "none", rank=0, local_rank=0,
                         world_size=1, local_world_size=1, prefer_cpu=prefer_cpu)

    rank = _int_var(environ, "RANK")
    world_size = _int_var(environ, "WORLD_SIZE")
    local_rank = _int_var(environ, "LOCAL_RANK", default=rank)
    local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE", default=world_size)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(name):
            raise UsageError(f"environment: {name} is not set but RANK/WORLD_SIZE are; "
                             "launch with torchrun or accelerate launch")
    port = environ["MASTER_PORT"]
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise UsageError(f"environment: MASTER_PORT={port!r}; allowed: a port number from 0 "
                         "to 65535")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"environment: RANK={rank}, WORLD_SIZE={world_size}; "
                         "allowed: WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    if not 1 <= local_world_size <= world_size or not 0 <= local_rank < local_world_size:
        raise UsageError(f"environment: LOCAL_RANK={local_rank}, "
                         f"LOCAL_WORLD_SIZE={local_world_size}, WORLD_SIZE={world_size}; allowed: "
                         "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE")
    if accelerate:
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in environ:
        launcher = "torchrun"
    else:
        launcher = "env"
    return LaunchEnv(launcher=launcher, rank=rank, local_rank=local_rank, world_size=world_size,
                     local_world_size=local_world_size,
                     restart_count=_int_var(environ, "TORCHELASTIC_RESTART_COUNT", default=0),
                     prefer_cpu=prefer_cpu, rendezvous=True, agent=started_by_agent(environ),
                     agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def single_process_notice(launch: LaunchEnv) -> str | None:
    """One line for rank 0 when ``accelerate launch --cpu`` left this run at world size 1.

    ``accelerate launch --cpu --num_processes N`` starts ONE process (several CPU processes
    need MPI there) and sets ACCELERATE_USE_CPU but nothing carrying N, so the run cannot tell
    whether N ranks were asked for. Under ACCELERATE_USE_CPU at world size 1 it says so, and
    how to start N CPU ranks; None otherwise.
    """
    if not (launch.prefer_cpu and launch.world_size == 1):
        return None
    return ("world size 1: accelerate launch --cpu (ACCELERATE_USE_CPU) starts a single "
            "process, whatever --num_processes says; accelerate launch --multi_gpu "
            "--num_processes N starts N ranks, on the CPU over gloo where there is no GPU "
            "(elsewhere add --device cpu)")


@dataclass(frozen=True)
class Placement:
    """Which device this rank computes on and which backend its collectives use."""

    device: str  # "cpu" or "cuda:K"
    backend: str  # "gloo" or "nccl"
    notice: str | None = None  # one line for rank 0 when "auto" made a choice worth knowing


def resolve_placement(*, device: str, backend: str, launch: LaunchEnv,
                      cuda_devices: int) -> Placement:
    """Turns the --device/--backend flags into a device and backend for this rank.

    ``cuda_devices`` is torch.cuda.device_count() (0 without CUDA). Rank r uses
    ``cuda:LOCAL_RANK``. NCCL refuses two ranks on one GPU, so "auto" picks NCCL only when
    every local rank has a GPU of its own, and an explicit ``--backend nccl`` without that
    is a UsageError. Explicit ``--device cuda`` with more local ranks than GPUs shares the
    GPUs round-robin over gloo.
    """
    ranks, gpus = launch.local_world_size, cuda_devices
    if device == "cuda" and gpus == 0:
        raise UsageError("--device: got 'cuda' but CUDA is not available on this machine; "
                         "allowed here: auto, cpu")
    if backend == "nccl":
        if gpus == 0:
            raise UsageError("--backend: got 'nccl' but CUDA is not available on this machine; "
                             "allowed here: auto, gloo")
        if device == "cpu":
            raise UsageError("--backend: got 'nccl' with --device cpu; NCCL needs CUDA "
                             "tensors; allowed with --device cpu: auto, gloo")
        if ranks > gpus:
            raise UsageError(f"--backend: got 'nccl' with {ranks} local ranks but {gpus} GPU(s); "
                             "NCCL needs one GPU per rank: start at most "
                             f"{gpus} ranks per node, or use --backend gloo to share GPUs")

    notice = None
    if device == "auto":
        if launch.prefer_cpu or gpus == 0:
            device = "cpu"
        elif ranks > gpus and backend != "gloo":
            device = "cpu"
            notice = (f"device auto: {ranks} local ranks but {gpus} GPU(s), so the ranks run on "
                      "the CPU; pass --device cuda --backend gloo to share the GPUs")
        else:
            device = "cuda"
    if device == "cuda":
        device = f"cuda:{launch.local_rank % gpus}"
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") and ranks <= gpus else "gloo"
    return Placement(device=device, backend=backend, notice=notice)
