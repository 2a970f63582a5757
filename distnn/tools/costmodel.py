"""A cost model of one distnn step on p ranks: alpha-beta collectives, buckets, compute.

Units: seconds and bytes inside the formulas (``alpha`` in s per message, ``beta`` in s per
byte); the predictions are reported in milliseconds. Every function here is pure.

The collectives, for a buffer of ``n`` bytes on ``p`` ranks (Thakur, Rabenseifner and Gropp,
"Optimization of Collective Communication Operations in MPICH", IJHPCA 2005):

- ring all-reduce (a reduce-scatter then an all-gather, each p-1 rounds of n/p bytes):
  ``2 (p-1) alpha + 2 (p-1)/p n beta``;
- binary tree, NOT pipelined (a reduce up the tree then a broadcast down, each
  ceil(log2 p) rounds of the whole buffer): ``2 ceil(log2 p) (alpha + n beta)``;
- hierarchical over nodes of ``g`` ranks (m = p/g nodes): a reduce-scatter inside each node
  ``(g-1) alpha_i + (g-1)/g n beta_i``, then g ring all-reduces of n/g bytes across the nodes,
  one per local rank, in parallel on the node's ``inter_links`` network links
  ``2 (m-1) alpha_e + 2 (m-1)/m (n/g) beta_e * g/links``, then an all-gather inside each node
  (the same cost as the reduce-scatter). With p <= g it is a ring inside one node;
- distnn's sum through rank 0 (where gradsync.sums_via_root says so: gloo, one small
  bucket, a few ranks): the p-1 peers each send the whole buffer to rank 0 and get the sum
  back. Rank 0's link takes the messages one after the other, so they are counted SERIALISED:
  ``2 (p-1) (alpha + n beta)`` (the adds on rank 0 are folded into beta by the calibration).

A step: forward F, backward B and the update make the compute time C (B = 2/3 of C by
default, the usual 1:2 ratio of forward to backward matmul work). With one rank distnn makes
no collective. Otherwise the gradients go in buckets of ``bucket_mb`` (one collective per
step for a model smaller than that), filled in the order backward produces them (last layer
first). Backward's time is spread over the layers in proportion to their parameters, so
bucket k is ready at ``r_k = F + B * (parameters up to the end of bucket k) / (all)``. The
buckets' all-reduces run one after another in index order: bucket k starts at
``s_k = max(r_k, e_{k-1})`` and ends at ``e_k = s_k + T(n_k)``. The step ends at
``max(F + B, e_last) + update``, and the exposed communication is that minus the compute.
The last bucket is ready only when backward ends, so its all-reduce is always exposed.
A shaped link's token bucket (tc tbf; ``burst_bytes`` > 0, default 0 = none): a link whose
bucket holds ``b`` bytes when a message of ``n`` bytes starts sends ``min(n, b)`` of them at the
link's own line speed (``burst_beta_s`` s/byte) and the rest at the shaped rate ``1/beta``:
``alpha + max(0, n - b) beta + min(n, b) burst_beta_s``, with
``b = min(burst_bytes, idle / beta)`` (the bucket refills at the rate while the link is idle).
Refill assumption: each direction of a link takes its step's bytes as ONE burst-limited
transfer (back-to-back messages on it draw on one bucket), and it is idle for the rest of the
step: the compute, plus, for the sum through rank 0, the other direction's messages (each
costed with a full bucket, their shortest, so the refill is never overstated); the overhead is
left out (the same reason). The ring's two directions run at once, so its idle time is the
compute alone. Only the first collective of a step gets the bucket (later buckets follow on
the link without idle time counted); measured fits and the tree are not changed by it.
Where the cluster lists a measured per-step overhead for p ranks (``step_overhead_fit``: the
packing, the update, the wait for the slowest rank and for gloo's threads), it is added, one
rank included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from distnn.distributed import gradsync

BYTES_PER_PARAM = 4  # fp32 gradients
MIB = 2**20


def shaped_bytes_s(n_bytes: float, beta: float, bucket_bytes: float = 0.0,
                   burst_beta: float = 0.0) -> float:
    """Seconds to send ``n_bytes`` through a token bucket holding ``bucket_bytes``:
    ``max(0, n - b) beta + min(n, b) burst_beta`` (``n beta`` with no bucket)."""
    burst = min(n_bytes, max(0.0, bucket_bytes))
    return (n_bytes - burst) * beta + burst * burst_beta


def bucket_available(burst_bytes: float, idle_s: float, beta: float) -> float:
    """Bytes in a tbf bucket of ``burst_bytes`` after ``idle_s`` of refill at the rate ``1/beta``:
    ``min(burst, idle / beta)``; 0 without a bucket."""
    if burst_bytes <= 0 or idle_s <= 0:
        return 0.0
    return burst_bytes if beta <= 0 else min(burst_bytes, idle_s / beta)


def ring_allreduce_s(n_bytes: float, p: int, alpha: float, beta: float,
                     bucket_bytes: float = 0.0, burst_beta: float = 0.0) -> float:
    """Ring all-reduce: ``2 (p-1) alpha + 2 (p-1)/p n beta`` seconds; 0 for one rank. With a
    bucket of ``bucket_bytes``, each link's ``2 (p-1)/p n`` bytes go through it
    (:func:`shaped_bytes_s`)."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + shaped_bytes_s(2 * (p - 1) / p * n_bytes, beta,
                                                bucket_bytes, burst_beta)


def tree_allreduce_s(n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """Binary-tree reduce then broadcast, not pipelined: ``2 ceil(log2 p) (alpha + n beta)``."""
    if p <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * (alpha + n_bytes * beta)


def via_root_s(n_bytes: float, p: int, alpha: float, beta: float,
               bucket_bytes: float = 0.0, burst_beta: float = 0.0) -> float:
    """distnn's sum through rank 0, rank 0's messages serialised: ``2 (p-1) (alpha + n beta)``.
    With a bucket of ``bucket_bytes`` in each direction of rank 0's link, each direction's
    ``(p-1) n`` bytes go through it: ``2 ((p-1) alpha + shaped_bytes_s((p-1) n))``."""
    if p <= 1:
        return 0.0
    return 2 * ((p - 1) * alpha + shaped_bytes_s((p - 1) * n_bytes, beta, bucket_bytes,
                                                 burst_beta))


@dataclass(frozen=True)
class Cluster:
    """Where the ranks run. Latencies ``*_alpha_s`` in seconds per message, inverse bandwidths
    ``*_beta_s`` in seconds per byte, as seen by one rank (per direction).

    ``allreduce_fit`` / ``via_root_fit``: measured ``{world_size: [a_s, b_s_per_byte]}`` with
    ``T(n) = a + b n`` for that world size (from :mod:`distnn.tools.calibrate`); where a world size
    is listed, its fit is used instead of the formula. ``cores``: ranks share that many cores
    (this machine), so with p > cores each rank's compute is slowed by p / cores; None: every
    rank has a device of its own. ``compute_contention`` (with ``cores``): a rank's compute
    with 2 or more ranks on the machine, all computing at once, over the same compute in one
    process alone (gloo's threads and the other ranks share the cores, the caches and the
    memory bandwidth); it multiplies the compute of every p >= 2 (together with p / cores).
    The calibration leaves it at 1: the overhead below takes in what it would.
    ``flop_per_s`` and ``step_floor_ms`` give a step's compute when it is not measured or
    given: ``floor + 6 * params * batch / flop_per_s``.

    ``step_overhead_fit``: measured ``{world_size: [a_s, b_s_per_byte]}``, the time distnn's
    step takes beyond what the rest of this model predicts for it, for a gradient buffer of n
    bytes: packing the buffer, the loss and vote slots, the update, the wait for the slowest
    rank and for gloo's threads to be scheduled on cores busy with the others' compute
    (:func:`distnn.tools.calibrate.measure_overhead`, on models other than those checked).
    Added to the step of that world size, where listed, one rank included.

    ``burst_bytes``: the token bucket of each direction of a shaped link (tc tbf's ``burst``,
    as configured; 0: no bucket) on the inter-node links and on the sum through rank 0;
    ``burst_beta_s``: seconds per byte for bytes sent out of the bucket (the link's line
    speed, unshaped). See the module docstring for the formula and the refill assumption.
    """

    name: str
    gpus_per_node: int
    intra_alpha_s: float
    intra_beta_s: float
    inter_alpha_s: float
    inter_beta_s: float
    inter_links: int | None = None  # network links per node (None: one per GPU)
    algorithm: str = "ring"  # "ring", "tree" (not pipelined) or "auto" (ring or pipelined tree)
    backend: str = "nccl"  # "gloo": distnn sums small buffers through rank 0
    cores: int | None = None
    compute_contention: float = 1.0
    flop_per_s: float | None = None
    step_floor_ms: float = 0.0
    allreduce_fit: dict[str, list[float]] = field(default_factory=dict)
    via_root_fit: dict[str, list[float]] = field(default_factory=dict)
    step_overhead_fit: dict[str, list[float]] = field(default_factory=dict)
    burst_bytes: float = 0.0
    burst_beta_s: float = 0.0
    source: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Cluster:
        """A cluster from its JSON description; raises ValueError naming a field that is
        unknown, missing, or not a value the model can use."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown cluster fields {sorted(unknown)}")
        for name, value in data.items():
            if value is None and name in _OPTIONAL:
                continue
            if name in _COUNTS and (not _is_number(value) or value != int(value) or value < 1):
                raise ValueError(f"{name} is {value!r}; allowed: an integer >= 1")
            if name in _FITTED and not _is_number(value):
                raise ValueError(f"{name} is {value!r}; allowed: a finite number")
            positive = name == "flop_per_s"  # (a rate of 0 would make every step endless)
            if name in _AMOUNTS and (not _is_number(value) or value < 0
                                     or (positive and value == 0)):
                raise ValueError(f"{name} is {value!r}; allowed: a finite number "
                                 f"{'> 0' if positive else '>= 0'}")
        if data.get("algorithm", "ring") not in ("ring", "tree", "auto"):
            raise ValueError(f"algorithm is {data['algorithm']!r}; allowed: ring, tree, auto")
        if data.get("backend", "nccl") not in ("nccl", "gloo"):
            raise ValueError(f"backend is {data['backend']!r}; allowed: nccl, gloo")
        return cls(**data)


_COUNTS = ("gpus_per_node", "inter_links", "cores")
_OPTIONAL = ("inter_links", "cores", "flop_per_s")  # None: see the fields' comments
# (the links' latencies and inverse bandwidths only need be finite: calibrate fits them to
# timings, and a fit of a fast link may come out a hair below zero)
_FITTED = ("intra_alpha_s", "intra_beta_s", "inter_alpha_s", "inter_beta_s")
_AMOUNTS = ("compute_contention", "flop_per_s", "step_floor_ms", "burst_bytes", "burst_beta_s")


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def pipelined_tree_allreduce_s(n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """Pipelined (double binary) tree, as NCCL runs it: ``2 ceil(log2 p) alpha + 2 n beta``."""
    if p <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * alpha + 2 * n_bytes * beta


def _level_s(n_bytes: float, p: int, alpha: float, beta: float, algorithm: str) -> float:
    if algorithm == "auto":  # the faster of ring and pipelined tree, as NCCL chooses
        return min(ring_allreduce_s(n_bytes, p, alpha, beta),
                   pipelined_tree_allreduce_s(n_bytes, p, alpha, beta))
    return (tree_allreduce_s if algorithm == "tree" else ring_allreduce_s)(n_bytes, p, alpha, beta)


def hierarchical_allreduce_s(n_bytes: float, p: int, cluster: Cluster,
                             idle_s: float = 0.0) -> float:
    """All-reduce over nodes of ``gpus_per_node``: intra reduce-scatter, g inter all-reduces of
    n/g bytes sharing the node's links, intra all-gather (see the module docstring). With
    ``cluster.burst_bytes``, the ring across nodes draws on the links' buckets, refilled
    during ``idle_s`` (each of the g local ranks gets ``links/g`` of them)."""
    g = max(1, min(cluster.gpus_per_node, p))
    if p <= 1:
        return 0.0
    if p <= cluster.gpus_per_node:
        return _level_s(n_bytes, p, cluster.intra_alpha_s, cluster.intra_beta_s,
                        cluster.algorithm)
    nodes = math.ceil(p / g)
    links = cluster.inter_links or g
    scatter = (g - 1) * cluster.intra_alpha_s + (g - 1) / g * n_bytes * cluster.intra_beta_s
    beta_e = cluster.inter_beta_s * g / links
    bucket = bucket_available(cluster.burst_bytes * links / g, idle_s, beta_e)
    if bucket > 0 and cluster.algorithm == "ring":
        across = ring_allreduce_s(n_bytes / g, nodes, cluster.inter_alpha_s, beta_e, bucket,
                                  cluster.burst_beta_s * g / links)
    else:
        across = _level_s(n_bytes / g, nodes, cluster.inter_alpha_s, beta_e, cluster.algorithm)
    return 2 * scatter + across


def _fitted(fit: dict[str, list[float]], p: int, n_bytes: float) -> float | None:
    if str(p) in fit:
        a, b = fit[str(p)]
        return a + b * n_bytes
    return None


def sums_via_root(n_bytes: float, p: int, buckets: int, cluster: Cluster) -> bool:
    """Whether distnn sums a buffer of ``n_bytes`` in ``buckets`` buckets on ``p`` ranks of
    ``cluster`` through rank 0: distnn's own rule (gradsync.sums_via_root, with the Trainer's
    gradsync.VIA_ROOT_MAX_MB on gloo), a gloo cluster's ranks holding CPU tensors."""
    device = torch.device("cpu" if cluster.backend == "gloo" else "cuda")
    return gradsync.sums_via_root(buckets=buckets, world_size=p, device=device, nbytes=n_bytes,
                                  max_mb=gradsync.VIA_ROOT_MAX_MB)


def gradient_sum_s(n_bytes: float, p: int, cluster: Cluster, *, buckets: int = 1,
                   idle_s: float = 0.0) -> float:
    """Seconds for distnn to sum one bucket of ``n_bytes`` on ``p`` ranks of ``cluster``:
    through rank 0 where distnn does that, else an all-reduce; a measured fit for that world
    size when the cluster has one, else the formulas. ``idle_s``: the step's time outside
    communication (its compute) during which a shaped link's bucket refills
    (``cluster.burst_bytes``; nothing changes without one)."""
    if p <= 1:
        return 0.0
    if sums_via_root(n_bytes, p, buckets, cluster):
        fitted = _fitted(cluster.via_root_fit, p, n_bytes)
        if fitted is not None:
            return fitted
        alpha, beta = cluster.intra_alpha_s, cluster.intra_beta_s
        if cluster.burst_bytes <= 0:
            return via_root_s(n_bytes, p, alpha, beta)
        # a direction is idle for the compute and the other direction's messages, those
        # costed with a full bucket (their shortest), so the refill is never overstated
        other = (p - 1) * alpha + shaped_bytes_s((p - 1) * n_bytes, beta, cluster.burst_bytes,
                                                 cluster.burst_beta_s)
        bucket = bucket_available(cluster.burst_bytes, idle_s + other, beta)
        return via_root_s(n_bytes, p, alpha, beta, bucket, cluster.burst_beta_s)
    fitted = _fitted(cluster.allreduce_fit, p, n_bytes)
    return fitted if fitted is not None else hierarchical_allreduce_s(n_bytes, p, cluster,
                                                                      idle_s)


def step_overhead_s(n_bytes: float, p: int, cluster: Cluster) -> float:
    """The measured per-step overhead for a gradient buffer of ``n_bytes`` on ``p`` ranks
    (``a + b n`` from ``cluster.step_overhead_fit``, not below 0); 0 where none is listed
    (one rank included: a calibration lists it, the step's own work beyond its compute)."""
    fitted = _fitted(cluster.step_overhead_fit, p, n_bytes)
    return max(0.0, fitted) if fitted is not None else 0.0


def bucket_sizes(layer_params: Sequence[int], bucket_mb: float) -> list[tuple[int, int]]:
    """Buckets as (parameters, parameters up to and including this bucket), in the order
    backward fills them: ``layer_params`` is given in backward order (last layer first).
    distnn's own grouping (gradsync.plan_buckets) with the capacity FlatGradSync gives it."""
    capacity = max(1, int(bucket_mb * MIB) // BYTES_PER_PARAM)
    buckets, done = [], 0
    for first, stop in gradsync.plan_buckets(layer_params, capacity):
        size = sum(layer_params[first:stop])
        done += size
        buckets.append((size, done))
    return buckets


def step_s(*, compute_s: float, layer_params: Sequence[int], p: int, cluster: Cluster,
           bucket_mb: float = 25.0, backward_fraction: float = 2 / 3) -> tuple[float, float]:
    """(step seconds, exposed communication seconds) for one step of ``compute_s`` on a rank.

    The buckets' all-reduces start when their layers' backward is done and the previous
    bucket's all-reduce is done; what runs past the end of backward is exposed."""
    if p <= 1:
        return compute_s, 0.0
    buckets = bucket_sizes(layer_params, bucket_mb)
    total = sum(layer_params)
    forward_s = compute_s * (1 - backward_fraction)
    backward_s = compute_s * backward_fraction
    end = 0.0
    for k, (params, done) in enumerate(buckets):
        ready = forward_s + backward_s * done / total
        end = max(ready, end) + gradient_sum_s(params * BYTES_PER_PARAM, p, cluster,
                                               buckets=len(buckets),
                                               idle_s=compute_s if k == 0 else 0.0)
    exposed = max(0.0, end - compute_s)
    return compute_s + exposed, exposed


@dataclass(frozen=True)
class Compute:
    """One rank's step compute (forward, backward, update) for a shard of b samples:
    ``fixed_ms + per_sample_ms * b`` on a device of its own."""

    fixed_ms: float
    per_sample_ms: float

    def ms(self, batch: int) -> float:
        return self.fixed_ms + self.per_sample_ms * batch


def predict(*, layer_params: Sequence[int], batch: int, compute: Compute, cluster: Cluster,
            worlds: Sequence[int], scaling: str = "strong", bucket_mb: float = 25.0,
            backward_fraction: float = 2 / 3) -> list[dict]:
    """One dict per world size: world_size, global_batch, per_rank_batch, compute_ms,
    comm_ms (exposed), step_ms, samples_per_s, speedup and efficiency.

    ``scaling="strong"``: ``batch`` is the global batch, split over the ranks (the largest
    shard, ceil(batch/p), sets the pace); ``"weak"``: ``batch`` per rank. On a cluster with
    ``cores``, p > cores ranks share them and each rank's compute takes p/cores longer, and
    with p >= 2 ranks each rank's compute is ``compute_contention`` times its time alone.
    ``overhead_ms``: the cluster's measured per-step overhead (:func:`step_overhead_s`),
    included in ``step_ms``. Efficiency: strong ``T(1) / (p T(p))``; weak ``T(1) / T(p)``
    (samples/s over p times one rank's).
    """
    if scaling not in ("strong", "weak"):
        raise ValueError(f"scaling must be strong or weak, got {scaling!r}")
    rows = []
    base_step = None
    for p in worlds:
        shard = math.ceil(batch / p) if scaling == "strong" else batch
        global_batch = batch if scaling == "strong" else batch * p
        compute_ms = compute.ms(shard)
        if cluster.cores and p > 1:
            compute_ms *= cluster.compute_contention * max(1.0, p / cluster.cores)
        step, exposed = step_s(compute_s=compute_ms / 1e3, layer_params=layer_params, p=p,
                               cluster=cluster, bucket_mb=bucket_mb,
                               backward_fraction=backward_fraction)
        overhead = step_overhead_s(sum(layer_params) * BYTES_PER_PARAM, p, cluster)
        step += overhead
        rows.append({"world_size": p, "scaling": scaling, "global_batch": global_batch,
                     "per_rank_batch": shard, "compute_ms": compute_ms,
                     "comm_ms": exposed * 1e3, "overhead_ms": overhead * 1e3,
                     "step_ms": step * 1e3,
                     "samples_per_s": global_batch / step})
    # one rank, whole batch (strong) or its batch (weak), no collective; its overhead if listed
    base_step = compute.ms(batch) / 1e3 + step_overhead_s(sum(layer_params) * BYTES_PER_PARAM,
                                                          1, cluster)
    for row in rows:
        p = row["world_size"]
        row["speedup"] = (base_step / row["step_ms"] * 1e3 if scaling == "strong"
                          else p * base_step / row["step_ms"] * 1e3)
        row["efficiency"] = row["speedup"] / p
    return rows


def mlp_layer_params(d_in: int, hidden: Sequence[int], d_out: int) -> list[int]:
    """Parameters per linear layer (weight and bias) of distnn's MLP, in backward order."""
    widths = [d_in, *hidden, d_out]
    return [widths[i] * widths[i + 1] + widths[i + 1] for i in range(len(widths) - 1)][::-1]


def uniform_layer_params(params: int, layers: int = 100) -> list[int]:
    """``params`` spread evenly over ``layers`` layers (a model given by its size alone)."""
    each, rest = divmod(params, layers)
    return [each + (1 if i < rest else 0) for i in range(layers) if each or i < rest]


def mlp_flop(d_in: int, hidden: Sequence[int], d_out: int, batch: int) -> float:
    """Forward plus backward FLOP of the MLP for ``batch`` samples: 6 per weight per sample,
    less the first layer's input gradient (never computed): 4 for the first layer."""
    widths = [d_in, *hidden, d_out]
    layers = [widths[i] * widths[i + 1] for i in range(len(widths) - 1)]
    return batch * (4 * layers[0] + 6 * sum(layers[1:]))


# Presets: sources and reasoning in docs/scaling.md.
PRESETS: dict[str, Cluster] = {
    "nvlink-ib400": Cluster(
        name="nvlink-ib400", gpus_per_node=8,
        intra_alpha_s=3.4e-6, intra_beta_s=1 / 380e9,  # NVLink4 (H100 SXM): 380 GB/s measured
        inter_alpha_s=5.0e-6, inter_beta_s=1 / 45e9,  # 400 Gb/s NDR = 50 GB/s, ~90% usable
        inter_links=8, algorithm="auto", backend="nccl", flop_per_s=6.0e14, step_floor_ms=0.07,
        source="docs/scaling.md#presets"),
    "horovod-roce25": Cluster(
        name="horovod-roce25", gpus_per_node=4,
        intra_alpha_s=10e-6, intra_beta_s=1 / 10e9,  # PCIe 3.0 x16 P100 server
        inter_alpha_s=30e-6, inter_beta_s=1 / 2.8e9,  # 25 Gbit/s RoCE, one NIC per server
        inter_links=1, backend="nccl", source="docs/scaling.md#published"),
}
