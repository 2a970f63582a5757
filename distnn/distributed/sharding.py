"""--shard: each rank keeps 1/N of the optimizer state, of the gradients, of the parameters
(ZeRO's stages 1 to 3), on torch's own machinery, with the gradients summed as distnn sums
them.

- ``optimizer``: the parameters stay whole on every rank and their gradients are summed by
  FlatGradSync as without sharding; torch's ``ZeroRedundancyOptimizer`` gives each rank the
  optimizer state of about 1/N of the parameters (whole tensors), steps them, and sends each
  updated parameter from its owner to every rank. Every parameter follows the update one
  process makes, so the replicas stay identical and the replica guard still applies.
- ``gradients`` and ``parameters``: FSDP2 (``fully_shard``) on each block, then on the model.
  A parameter is a DTensor: each rank holds 1/N of it (dim 0) and its gradient's 1/N and
  optimizer state; a block's whole parameters are gathered for its forward and backward and
  its gradients reduce-scattered after. ``parameters`` frees a block's gathered parameters
  after its forward (``reshard_after_forward``); ``gradients`` keeps them until the backward.
  FSDP2 divides the gradients by the world size by default: here the divide factor is 1 and
  the reductions are plain sums, so a rank's gradient shard is the shard of the global batch's
  gradient, as the replicas' is (``tests/test_sharding.py``).

The blocks: each module inside an ``nn.ModuleList`` of the model (transformer blocks, as
torchtitan wraps them), or the classes named by --shard-blocks; without any, the model is
one unit.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from distnn.distributed.gradsync import FlatGradSync
from distnn.distributed.process_group import collective
from distnn.errors import UsageError

log = logging.getLogger("distnn")


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor. FSDP2 and DTensor are imported only by the runs that
    shard (importing them costs every process 0.7 s on a CPU); before that import no DTensor
    can exist, so this looks for their module without importing it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def find_blocks(model: nn.Module, names: Sequence[str] = ()) -> list[nn.Module]:
    """The modules sharded as units before the model itself: those of the classes ``names``
    (--shard-blocks), else each module in an ``nn.ModuleList`` of the model; inner ones
    first. Raises UsageError for a name that no module of the model has."""
    if names:
        found = [module for module in model.modules()
                 if type(module).__name__ in names and module is not model]
        missing = sorted(set(names) - {type(module).__name__ for module in found})
        if missing:
            classes = sorted({type(m).__name__ for m in model.modules() if m is not model})
            raise UsageError(f"--shard-blocks: got {', '.join(missing)}, which names no module "
                             f"of the model; allowed: class names of its modules "
                             f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})")
    else:
        found = [block for module in model.modules() if isinstance(module, nn.ModuleList)
                 for block in module]
    return found[::-1]  # modules() lists outer modules first; FSDP wraps inner ones first


class ShardedSync:
    """The gradient sync of an FSDP2 run (--shard gradients or parameters), with the
    interface the step and the update use of a FlatGradSync: ``zero_grad``, ``no_sync``,
    ``all_reduce`` (of the loss and the stop vote: the gradients are reduce-scattered by the
    backward itself), ``summed_grads`` (this rank's shards), ``grad_norm`` (over all shards),
    ``sgd_step``, and what the guard and the checkpoints read."""

    distributed = True
    sharded = True

    def __init__(self, model: nn.Module, *, device: torch.device, mode: str,
                 blocks: Sequence[nn.Module]) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.model = model
        self.device = device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        reshard = mode == "parameters"
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # the sum, not FSDP's mean
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._extras = torch.zeros(2, device=device)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate the whole gradients locally; the next backward
        outside reduce-scatters their sum (micro-batches)."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def all_reduce(self, *extras: torch.Tensor | float | None) -> torch.Tensor:
        """Sums the extra slots (the rank's loss, its stop vote) over the ranks."""
        values = [torch.as_tensor(0.0 if value is None else value, device=self.device)
                  .detach().reshape(()).to(self._extras.dtype) for value in extras]
        values += [self._extras.new_zeros(())] * (len(self._extras) - len(values))
        torch.stack(values, out=self._extras)
        with collective("the loss sum"):
            dist.all_reduce(self._extras, op=dist.ReduceOp.SUM)
        return self._extras

    def summed_grads(self) -> list[torch.Tensor]:
        """This rank's shards of the summed gradients."""
        return [p.grad.to_local() for p in self.params if p.grad is not None]

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global L2 norm of gradients sharded across the ranks (``grads``: this rank's
        shards): the square root of the ranks' summed squares."""
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for grad in grads:
            squares += torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2
        with collective("the gradient norm"):
            dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        return squares.sqrt()

    @torch.no_grad()
    def sgd_step(self, lr: float) -> None:
        """The reference program's ``p -= lr * grad`` on this rank's shards."""
        stepped = [p for p in self.params if p.grad is not None]
        torch._foreach_add_([p.to_local() for p in stepped],
                            [p.grad.to_local() for p in stepped], alpha=-lr)

    # -- the guard and the checkpoints ----------------------------------------------------

    def weights_finite(self) -> bool:
        """Whether every rank's shards are finite (one small all-reduce: every rank gets
        the same answer)."""
        bad = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            local = p.to_local() if is_dtensor(p) else p
            if not local.isfinite().all():
                bad += 1
        with collective("the weights' check"):
            dist.all_reduce(bad, op=dist.ReduceOp.SUM)
        return not bool(bad)

    def replicated(self) -> torch.Tensor | None:
        """What a sharded model holds on every rank alike, its floating-point buffers, as
        one tensor for the replica guard; None without any. (The shards differ by design:
        there are no replicas of them to compare.)"""
        buffers = [b.detach().reshape(-1).float() for b in self.model.buffers()
                   if b.is_floating_point()]
        return torch.cat(buffers) if buffers else None

    @property
    def fault_target(self) -> torch.Tensor:
        """This rank's first weights (what the fault drills change or allocate beside)."""
        return self.params[0].to_local().reshape(-1)

    def full_state(self, state: dict[str, torch.Tensor], *, main: bool
                   ) -> dict[str, torch.Tensor] | None:
        """``state`` (a state dict of DTensors and tensors) whole, on the CPU, on rank 0
        (``main``; None elsewhere): each DTensor gathered in turn (every rank takes part),
        so at most one whole tensor more than its shards is on a rank at a time."""
        whole = {}
        for name, value in state.items():
            full = value.full_tensor() if is_dtensor(value) else value
            if main:
                whole[name] = full.detach().to("cpu", copy=True).contiguous()
            del full
        return whole if main else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole optimizer state (distnn.job.optimizers.state_tensors' format) as this rank's
    shards of each parameter's (a tensor of a sharded parameter's shape becomes a DTensor
    placed as the parameter is; a step count stays as it is)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for key, value in tensors.items():
        index, _, _ = key.partition(".")
        param = params[int(index)]
        if is_dtensor(param) and tuple(value.shape) == tuple(param.shape):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device), param.device_mesh,
                                      param.placements)
        sharded[key] = value
    return sharded


def check_shardable(optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter],
                    mode: str) -> None:
    """Raises UsageError for an optimizer that ``mode`` cannot shard: one that has stepped
    (its state would be lost), that steps tensors other than the model's trainable
    ``params``, or (``optimizer``: ZeroRedundancyOptimizer) that has several groups."""
    if optimizer is None or mode == "none":
        return
    kind = type(optimizer).__name__
    if optimizer.state:
        raise UsageError(f"--shard {mode}: the {kind} given has stepped already (it holds "
                         "state); allowed: an optimizer that has not stepped")
    own = {id(p) for p in params}
    if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
        raise UsageError(f"--shard {mode}: the {kind} given steps tensors that are not the "
                         "model's trainable parameters; allowed: an optimizer built on "
                         "model.parameters()")
    if mode == "optimizer" and len(optimizer.param_groups) > 1:
        raise UsageError(f"--shard optimizer: the {kind} given has "
                         f"{len(optimizer.param_groups)} parameter groups, which torch's "
                         "ZeroRedundancyOptimizer does not take; allowed: one group, or "
                         "--shard gradients or parameters")


def sharded_optimizer(optimizer: torch.optim.Optimizer | None,
                      mode: str) -> torch.optim.Optimizer | None:
    """The run's optimizer of a replicated model (checked by :func:`check_shardable`): under
    ``optimizer`` a ZeroRedundancyOptimizer of the same class and settings, else
    ``optimizer`` itself. (Under ``gradients``/``parameters`` it is rebuilt on the shards:
    :func:`optimizer_recipe`, :func:`rebuild_optimizer`.)"""
    if optimizer is None or mode != "optimizer":
        return optimizer
    kind = type(optimizer)
    # (its module is imported before the group by process_group's sharding=: this binds it)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    accepted = inspect.signature(kind).parameters
    settings = {k: v for k, v in optimizer.param_groups[0].items()
                if k != "params" and k in accepted}
    try:
        return ZeroRedundancyOptimizer(optimizer.param_groups[0]["params"],
                                       optimizer_class=kind, **settings)
    except TypeError as error:
        raise UsageError(f"--shard optimizer: the {kind.__name__} given cannot be rebuilt "
                         f"from its settings ({error}); allowed: a torch.optim "
                         "optimizer") from None


OptimizerRecipe = tuple[type, list[dict]]  # the class, its groups with parameter positions


def optimizer_recipe(optimizer: torch.optim.Optimizer | None, before: list[nn.Parameter]
                     ) -> OptimizerRecipe | None:
    """What rebuilds ``optimizer`` on other parameters: its class and its groups' settings,
    each group's parameters by their position in ``before``. Holds no parameter, so the
    whole ones can go while FSDP2 shards the model (``optimizer`` dropped)."""
    if optimizer is None:
        return None
    position = {id(p): index for index, p in enumerate(before)}
    return type(optimizer), [{**{k: v for k, v in group.items() if k != "params"},
                              "params": [position[id(p)] for p in group["params"]]}
                             for group in optimizer.param_groups]


def rebuild_optimizer(recipe: OptimizerRecipe | None, after: list[nn.Parameter],
                      mode: str) -> torch.optim.Optimizer | None:
    """The optimizer of ``recipe`` (:func:`optimizer_recipe`) on ``after``, the sharded
    parameters in the order of the ones it was made on."""
    if recipe is None:
        return None
    kind, groups = recipe
    try:
        return kind([{**group, "params": [after[index] for index in group["params"]]}
                     for group in groups])
    except TypeError as error:
        raise UsageError(f"--shard {mode}: the {kind.__name__} given cannot be rebuilt on the "
                         f"sharded parameters ({error}); allowed: a torch.optim optimizer "
                         "whose settings are its parameter groups'") from None


def is_zero(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` is a ZeroRedundancyOptimizer (--shard optimizer)."""
    zero = sys.modules.get("torch.distributed.optim")
    return zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer)


def consolidated_state(optimizer: torch.optim.Optimizer) -> None:
    """Gathers a ZeroRedundancyOptimizer's state on rank 0 (every rank takes part), so that
    its ``state_dict()`` there holds all of it."""
    with collective("gathering the optimizer state"):
        optimizer.consolidate_state_dict(to=0)


def load_zero_state(optimizer: torch.optim.Optimizer,
                    state: dict[int, dict[str, torch.Tensor]]) -> None:
    """Whole optimizer state (by parameter index) into a ZeroRedundancyOptimizer: every
    rank keeps its own parameters' part."""
    groups, first = [], 0
    for group in optimizer.param_groups:
        count = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(first, first + count))})
        first += count
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# What sums a run's gradients and holds its weights: flat and replicated, or sharded.
GradSync = FlatGradSync | ShardedSync
