"""Summing gradients across ranks through one flat buffer, and the SGD update over it.

Each parameter's ``.data`` becomes a view into one contiguous buffer, so the update is one
fused operation over it. Backward produces each gradient as a tensor of its own, which one
``torch.cat`` packs into a flat gradient buffer just before the all-reduce; from then on
``p.grad`` is a view into the buffer, summed in place. The gradient buffer has extra slots at
the end for small per-step values that must be summed too (the rank's loss, a stop vote):
the same ``cat`` packs them, so they travel in the same collective as the gradients.

Why pack rather than let backward accumulate into views of the buffer (as DDP's
``gradient_as_bucket_view`` does): accumulating needs the buffer zeroed first and then one
add per parameter, five kernels for the reference net where the ``cat`` is one (on a GPU
each kernel is a launch, and a small model's step is bound by its launches:
docs/benchmarks.md#measurements-behind-the-codes-choices), and it reads and writes the
buffer more often. The cost is memory: a bucket's gradients exist twice between its last
gradient and its ``cat``, after which backward's tensors are freed (for a large model, one
bucket at a time, so about one bucket more than the gradients).

For a large model the gradient buffer is split into buckets (``bucket_mb``). Backward
produces gradients from the last layer to the first, so the buffers hold the parameters in
that reverse order: a bucket's all-reduce starts, asynchronously, once backward has
finished its gradients (packed by a ``cat`` of its own), and overlaps with the rest of
backward. The last bucket (which holds the extra slots) starts in
:meth:`FlatGradSync.all_reduce`. A model that fits in one bucket uses one all-reduce per
step.

The buckets' all-reduces start in one fixed order, bucket index order, on every rank (as
DDP's do): collectives are matched by the order in which ranks call them, so if a rank
whose forward skips a layer (rank-dependent control flow) started its buckets as they
became ready, two buckets of equal size would be summed with each other, silently. A bucket
ready before an earlier one therefore waits until that one has started; the buckets still
waiting when :meth:`FlatGradSync.all_reduce` is called (one with a parameter the rank did
not use never becomes ready) start there, in order. With the usual layer order backward
makes the buckets ready in index order anyway, so no overlap is lost; with rank-dependent
control flow, a bucket behind one that is not ready yet waits for it, or for
``all_reduce()``.

A small model on gloo (CPU tensors) is latency-bound, and gloo's ring all-reduce of a few
hundred KB is slow: 2(W-1) rounds of chunks, each a wake-up of gloo's threads. With
``via_root_max_mb``, a gradient buffer that small, on at most ``VIA_ROOT_MAX_RANKS`` ranks,
is summed through rank 0 instead: every other rank sends its buffer to rank 0 (one
point-to-point message each, received concurrently), rank 0 adds them in rank order and
sends the sum back: several times faster for the reference model's 404 KB at 2 and 4
ranks on a 2-core machine
(docs/benchmarks.md#reference-workload-n64-1000---100---10-docsresultsbench-cpu-referencemd).
Every rank then holds rank 0's bits, so the replicas stay identical.

Each parameter starts at a multiple of ``ALIGN`` elements in the buffers, with zeros in
the few slots between (they get zero gradients, so they stay zero). A multi-tensor GPU
kernel vectorises its loads only when every tensor it is given starts on 16 bytes, and
packed end to end a parameter can start anywhere: then the whole update takes the slow,
unvectorised path, while aligned it runs as fast as over separately allocated parameters,
as measured on a GPU:
docs/benchmarks.md#the-ninth-session-the-aligned-buffers-measured-a-replays-memory-the-bf16-fusions.

Why SUM and no division: the loss is a sum over samples, so the full batch's gradient is
the sum of the shards' gradients for any partition of the batch, empty shards included.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from distnn.config import DEFAULT_BUCKET_MB
from distnn.distributed.process_group import collective

# Each parameter's first element in the flat buffers: a multiple of this many elements, so
# 64 bytes in fp32 and 32 in a bf16 copy, at least the 16 that vectorised loads need.
ALIGN = 16
VIA_ROOT_MAX_RANKS = 8  # rank 0 receives one buffer from each peer: keep that small
# gloo's gradient buffers up to this size are summed through rank 0 (the Trainer's setting)
VIA_ROOT_MAX_MB = 1.0
FINITE_CHUNK = 1 << 20  # elements the finite check takes at a time: 7 MB of temporaries


def all_finite(values: torch.Tensor) -> bool:
    """Whether every element of ``values`` is finite, taken FINITE_CHUNK elements at a
    time: torch's ``isfinite`` on a CPU makes an absolute-value copy and three boolean
    tensors, 7 bytes an fp32 element, which on the whole weights set the peak of a run's
    end (one host synchronisation on a GPU)."""
    return bool(torch.stack([chunk.isfinite().all()
                             for chunk in values.reshape(-1).split(FINITE_CHUNK)]).all())


def plan_buckets(sizes: Sequence[int], capacity: int) -> list[tuple[int, int]]:
    """Groups consecutive tensors of ``sizes`` elements into buckets of about ``capacity``.

    Returns [first, stop) index ranges into ``sizes``, in order. A bucket closes as soon as
    it holds ``capacity`` elements or more, so only the last one can hold fewer: a small
    tensor before a large one (a bias before its weight) goes in with it rather than alone,
    which would cost a collective of its own. No tensor is split.
    """
    if capacity < 1:
        raise ValueError(f"plan_buckets: capacity must be >= 1, got {capacity}")
    buckets, first, filled = [], 0, 0
    for index, size in enumerate(sizes):
        filled += size
        if filled >= capacity:
            buckets.append((first, index + 1))
            first, filled = index + 1, 0
    if first < len(sizes):
        buckets.append((first, len(sizes)))
    return buckets


def sums_via_root(*, buckets: int, world_size: int, device: torch.device, nbytes: int,
                  max_mb: float) -> bool:
    """Whether a gradient buffer is summed through rank 0 rather than by a ring all-reduce:
    one bucket of CPU tensors, at most ``max_mb`` MiB, on 2 to VIA_ROOT_MAX_RANKS ranks."""
    return (buckets == 1 and device.type == "cpu" and 1 < world_size <= VIA_ROOT_MAX_RANKS
            and nbytes <= max_mb * 2**20)


class FlatGradSync:
    """Keeps ``module``'s parameters and gradients in flat buffers and sums them across ranks.

    Build it after the module is on its device and before training. Per step:
    :meth:`zero_grad`, forward, ``backward()``, :meth:`all_reduce`, then :meth:`sgd_step` (or
    any optimizer: after :meth:`all_reduce`, ``p.grad`` are views into the summed buffer).
    Every rank must build it over the same model (the same parameters, so the same buckets).
    A parameter that gets no gradient on a rank (a layer its forward skipped) counts as zero
    there, and the buckets' all-reduces start in bucket index order on every rank, however
    the ranks' backward passes order the gradients: a bucket made ready early waits for the
    earlier ones (see the module's docstring for what overlap that costs).
    """

    def __init__(self, module: nn.Module, *, distributed: bool, extra_slots: int = 1,
                 bucket_mb: float = DEFAULT_BUCKET_MB, via_root_max_mb: float = 0.0) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("FlatGradSync: the module has no trainable parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError("FlatGradSync: all parameters must share one dtype and one device; "
                             f"got dtypes {sorted(map(str, dtypes))}, "
                             f"devices {sorted(map(str, devices))}")
        if extra_slots < 1:
            raise ValueError(f"FlatGradSync: extra_slots must be >= 1, got {extra_slots}")
        if not bucket_mb > 0:
            raise ValueError(f"FlatGradSync: bucket_mb must be > 0, got {bucket_mb}")
        self.distributed = distributed
        self.params = params[::-1]  # the order in which backward produces the gradients
        # Where each parameter starts (a multiple of ALIGN); numel: the parameters and the
        # gaps after each, so the extra slots start aligned too.
        self.offsets, offset = [], 0
        for p in self.params:
            self.offsets.append(offset)
            offset = -(-(offset + p.numel()) // ALIGN) * ALIGN
        self.numel = offset
        dtype, device = params[0].dtype, params[0].device
        self.flat_params = torch.zeros(self.numel, dtype=dtype, device=device)
        self.flat_grads = torch.zeros(self.numel + extra_slots, dtype=dtype, device=device)
        # Views made once: slicing in the step loop would cost a dispatch each time.
        self._grads = self.flat_grads[:self.numel]
        self._extras = self.flat_grads[self.numel:]
        self._zero_extras = torch.zeros_like(self._extras)  # what an unset extra slot packs
        self._grad_views = []
        for p, first in zip(self.params, self.offsets, strict=True):
            view = self.flat_params[first:first + p.numel()].view_as(p)
            with torch.no_grad():
                view.copy_(p)
            p.data = view
            p.grad = None
            self._grad_views.append(self.flat_grads[first:first + p.numel()].view_as(p))

        capacity = max(1, int(bucket_mb * 2**20) // params[0].element_size())
        starts = [*self.offsets, self.numel]
        # each parameter with the gap after it, as its bucket will hold it
        groups = plan_buckets([stop - start for start, stop in itertools.pairwise(starts)],
                              capacity)
        # Bucket b covers flat_grads[start:stop], its parameters and their gaps; the last one
        # also covers the extra slots.
        self.bucket_ranges = [(starts[first], starts[stop]) for first, stop in groups]
        self.bucket_ranges[-1] = (self.bucket_ranges[-1][0], self.numel + extra_slots)
        self._bucket_params = [self.params[first:stop] for first, stop in groups]
        self._bucket_views = [self._grad_views[first:stop] for first, stop in groups]
        # The zeros each bucket's parameters are followed by in its buffer, in their order
        # (None: no gap), as views made once
        gap_zeros = torch.zeros(ALIGN, dtype=dtype, device=device)
        gaps = [starts[index + 1] - starts[index] - p.numel()
                for index, p in enumerate(self.params)]
        self._bucket_gaps = [[gap_zeros[:gaps[index]] if gaps[index] else None
                              for index in range(first, stop)] for first, stop in groups]
        self._bucket_buffers = [self.flat_grads[start:stop] for start, stop in self.bucket_ranges]
        self._extra_pieces: list[torch.Tensor] = []  # the last bucket's, set by all_reduce
        self._pending = [len(ps) for ps in self._bucket_params]  # gradients still awaited
        self._next = 0  # the first bucket not started: they start in index order only
        self._reduced = False  # all_reduce ran since the last zero_grad
        self._handles: dict[int, dist.Work] = {}
        self._syncing = True
        world = dist.get_world_size() if distributed else 1
        self.via_root = sums_via_root(
            buckets=len(groups), world_size=world, device=self.flat_grads.device,
            nbytes=self.flat_grads.numel() * self.flat_grads.element_size(),
            max_mb=via_root_max_mb)
        # Rank 0 receives each peer's buffer into one of these.
        self._inbox = ([torch.empty_like(self.flat_grads) for _ in range(world - 1)]
                       if self.via_root and dist.get_rank() == 0 else [])
        if distributed and len(groups) > 1:
            # The hooks hold this object weakly: a parameter keeps its hooks where the garbage
            # collector cannot see them, so a strong reference would keep both buffers alive
            # for as long as the model lives, and for good once it is dropped.
            owner = weakref.ref(self)

            def grad_ready(bucket: int) -> None:
                sync = owner()
                if sync is not None:
                    sync._grad_ready(bucket)

            for bucket, (first, stop) in enumerate(groups[:-1]):
                for p in self.params[first:stop]:
                    p.register_post_accumulate_grad_hook(
                        lambda _, bucket=bucket: grad_ready(bucket))

    @property
    def grads(self) -> torch.Tensor:
        """The gradient part of the buffer (1-dim, the parameters' layout in ``flat_params``)."""
        return self._grads

    sharded = False

    def weights_finite(self) -> bool:
        """Whether this rank's weights are all finite (the same answer on every rank when
        the replicas are identical)."""
        return all_finite(self.flat_params)

    def replicated(self) -> torch.Tensor:
        """What every rank holds alike, for the replica guard: the flat weights."""
        return self.flat_params

    @property
    def fault_target(self) -> torch.Tensor:
        """The flat weights (what the fault drills change or allocate beside)."""
        return self.flat_params

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The L2 norm of ``grads`` (whole on every rank), as clip_grad_norm_ computes it:
        the norm of the per-tensor norms."""
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in grads]))

    def summed_grads(self) -> list[torch.Tensor]:
        """The summed gradients after a step's sum, as the tensors that hold them: the
        flat gradient buffer, or (not distributed: nothing was packed) each ``p.grad``."""
        if self.distributed:
            return [self._grads]
        return [p.grad for p in self.params if p.grad is not None]

    @property
    def buckets(self) -> int:
        """How many parts the gradient buffer is summed in (each an all-reduce)."""
        return len(self.bucket_ranges)

    def broadcast_parameters(self, src: int = 0) -> None:
        """Makes every rank's parameters equal to rank ``src``'s (one collective)."""
        if self.distributed:
            with collective("broadcasting the parameters"):
                dist.broadcast(self.flat_params, src=src)

    def zero_grad(self) -> None:
        """Starts a step: every ``p.grad`` to None, so backward creates them afresh."""
        for p in self.params:
            p.grad = None
        self._pending = [len(ps) for ps in self._bucket_params]
        self._next = 0
        self._reduced = False
        self._handles.clear()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate locally (gradient accumulation).

        Use it for every micro-batch but the last of a step; the last one's backward, outside,
        starts the buckets' all-reduces as usual.
        """
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = True

    def _grad_ready(self, bucket: int) -> None:
        if not self._syncing:
            return
        self._pending[bucket] -= 1
        # Only in index order: every rank must call the all-reduces in the same order, and a
        # rank-dependent forward can make a later bucket ready first. Started here: this one
        # if all before it have been, then those after it that were ready and waiting. The
        # last bucket (the extras) waits for all_reduce().
        if self._pending[bucket] == 0 and bucket == self._next:
            last = len(self._pending) - 1
            while self._next < last and self._pending[self._next] == 0:
                self._start(self._next)
                self._next += 1

    def _pack(self, bucket: int) -> None:
        """Copies the bucket's gradients (and, for the last, the extras) into its buffer."""
        pieces = []
        for p, gap in zip(self._bucket_params[bucket], self._bucket_gaps[bucket], strict=True):
            pieces.append((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1))
            if gap is not None:
                pieces.append(gap)
        if bucket == len(self._bucket_params) - 1:
            pieces += self._extra_pieces
        torch.cat(pieces, out=self._bucket_buffers[bucket])

    def _start(self, bucket: int) -> None:
        self._pack(bucket)
        if bucket < len(self._bucket_params) - 1:
            # Backward's own tensors of this bucket are copied: let them go now, each p.grad a
            # view into the buffer (summed in place by the all-reduce), so a large model holds
            # its gradients about once during backward, not twice (the last bucket's go in
            # _summed).
            for p, view in zip(self._bucket_params[bucket], self._bucket_views[bucket],
                               strict=True):
                p.grad = view
        with collective("the gradient all-reduce"):
            self._handles[bucket] = dist.all_reduce(self._bucket_buffers[bucket],
                                                    op=dist.ReduceOp.SUM, async_op=True)

    def all_reduce(self, *extras: torch.Tensor | float | None) -> torch.Tensor:
        """Sums the gradients and ``extras`` over all ranks; returns the summed extra slots.

        Call after ``backward()``. ``extras`` (1-element tensors, floats, or None for zero; at
        most ``extra_slots``; the first is usually the rank's loss) go into the slots after
        the gradients, the slots not given are zero. Starts, in index order, the buckets
        backward has not started, then waits for all; then every ``p.grad`` is a view into the
        summed buffer (not distributed: ``p.grad`` are left as backward made them, already the
        sum). The returned 1-dim tensor (all ``extra_slots``) is a view into the buffer,
        overwritten by the next step: copy what you keep. No host synchronisation on a GPU.
        """
        if self._reduced:
            raise RuntimeError("FlatGradSync.all_reduce: called again without zero_grad() "
                               "since the last one; call zero_grad() at the start of every step")
        self._reduced = True
        if len(extras) > len(self._zero_extras):
            raise ValueError(f"FlatGradSync.all_reduce: {len(extras)} extras given, but there "
                             f"are {len(self._zero_extras)} extra slots")
        self._extra_pieces = [self._extra_piece(slot, value) for slot, value in
                              enumerate(extras)] + [self._zero_extras[len(extras):]]
        if self.via_root:
            self._pack(0)
            with collective("the gradient sum (through rank 0)"):
                self._sum_via_root()
        elif self.distributed:
            for bucket in range(self._next, self.buckets):  # the rest, in index order
                self._start(bucket)
            self._next = self.buckets
            with collective("the gradient all-reduce"):
                for bucket in range(self.buckets):
                    self._handles[bucket].wait()
            self._handles.clear()
        else:  # one rank: the gradients are the sum already, only the extras are packed
            torch.cat(self._extra_pieces, out=self._extras)
            return self._extras
        return self._summed()

    def sum_packed(self) -> torch.Tensor:
        """Sums the gradient buffer as the caller filled it (the gradients, then the extra
        slots, in the buffer's layout: a compiled step writes it whole, see wholestep);
        returns the summed extra slots, as :meth:`all_reduce` does.

        The buckets are summed in index order, all after the caller's backward (nothing was
        started during it); then every ``p.grad`` is a view into the summed buffer (alone:
        into the buffer as filled).
        """
        if self.via_root:
            with collective("the gradient sum (through rank 0)"):
                self._sum_via_root()
        elif self.distributed:
            with collective("the gradient all-reduce"):
                handles = [dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True)
                           for buffer in self._bucket_buffers]
                for handle in handles:
                    handle.wait()
        return self._summed()

    def _summed(self) -> torch.Tensor:
        """After a sum: every ``p.grad`` a view into the buffer; returns the extra slots."""
        for p, view in zip(self.params, self._grad_views, strict=True):
            p.grad = view
        return self._extras

    def _extra_piece(self, slot: int, value: torch.Tensor | float | None) -> torch.Tensor:
        """One extra slot's value as a 1-element tensor on the buffer's device and dtype."""
        if value is None:
            return self._zero_extras[slot:slot + 1]
        if isinstance(value, torch.Tensor):  # only the calls needed: each costs microseconds
            if value.dim() != 1:
                value = value.detach().reshape(1)
            elif value.requires_grad:
                value = value.detach()
            return value if value.dtype == self.flat_grads.dtype else value.to(
                self.flat_grads.dtype)
        return torch.full((1,), value, dtype=self.flat_grads.dtype,
                          device=self.flat_grads.device)

    def _sum_via_root(self) -> None:
        """The gradient buffer summed over all ranks by rank 0, which sends the sum back."""
        if dist.get_rank() != 0:
            dist.send(self.flat_grads, dst=0)
            dist.recv(self.flat_grads, src=0)
            return
        receives = [dist.irecv(inbox, src=peer) for peer, inbox in enumerate(self._inbox, 1)]
        for receive in receives:
            receive.wait()
        for inbox in self._inbox:  # in rank order: the same bits on every run
            self.flat_grads.add_(inbox)
        sends = [dist.isend(self.flat_grads, dst=peer) for peer in range(1, len(receives) + 1)]
        for send in sends:
            send.wait()

    @torch.no_grad()
    def sgd_step(self, lr: float) -> None:
        """``p -= lr * p.grad`` for every parameter: one operation over the flat buffers, or
        (not distributed: no buffer was packed) one multi-tensor operation over the
        parameters."""
        if self.distributed:
            self.flat_params.add_(self._grads, alpha=-lr)
            return
        with_grads = [p for p in self.params if p.grad is not None]
        torch._foreach_add_(with_grads, [p.grad for p in with_grads], alpha=-lr)
