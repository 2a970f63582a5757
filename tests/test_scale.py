"""The cost model (distnn/tools/costmodel.py), its calibration fit and `python -m distnn.scale`."""

import json
import random
import subprocess
import sys

import pytest

from distnn.tools import calibrate, costmodel, scale


def test_ring_tree_and_via_root_by_hand():
    # 2*3*1e-5 + 2*3/4*1e6*1e-9 = 6e-5 + 1.5e-3
    assert costmodel.ring_allreduce_s(1e6, 4, 1e-5, 1e-9) == pytest.approx(1.56e-3)
    # 2*log2(8)*(1e-5 + 1e6*1e-9) = 6 * 1.01e-3
    assert costmodel.tree_allreduce_s(1e6, 8, 1e-5, 1e-9) == pytest.approx(6.06e-3)
    # 2*(3-1)*(1e-5 + 1e-3)
    assert costmodel.via_root_s(1e6, 3, 1e-5, 1e-9) == pytest.approx(4.04e-3)
    for formula in (costmodel.ring_allreduce_s, costmodel.tree_allreduce_s,
                    costmodel.via_root_s):
        assert formula(1e6, 1, 1e-5, 1e-9) == 0.0


def test_hierarchical_by_hand():
    cluster = costmodel.Cluster(name="t", gpus_per_node=4, intra_alpha_s=1e-6,
                                intra_beta_s=1e-10, inter_alpha_s=1e-5, inter_beta_s=1e-9)
    # intra reduce-scatter: 3e-6 + 3/4*8e6*1e-10 = 6.03e-4, twice (with the all-gather);
    # across 2 nodes, 2e6 bytes per local rank, one link each: 2e-5 + 2e6*1e-9 = 2.02e-3
    assert costmodel.hierarchical_allreduce_s(8e6, 8, cluster) == pytest.approx(3.226e-3)
    # inside one node it is a ring
    assert costmodel.hierarchical_allreduce_s(8e6, 4, cluster) == pytest.approx(
        costmodel.ring_allreduce_s(8e6, 4, 1e-6, 1e-10))
    # 4 GPUs sharing one link: the inter-node bandwidth term is 4x
    shared = costmodel.Cluster(**{**cluster.to_json(), "inter_links": 1})
    assert costmodel.hierarchical_allreduce_s(8e6, 8, shared) == pytest.approx(
        2 * 6.03e-4 + 2e-5 + 8e-3)


def _fixed(seconds: float, backend: str = "nccl") -> costmodel.Cluster:
    return costmodel.Cluster(name="t", gpus_per_node=8, intra_alpha_s=0, intra_beta_s=0,
                             inter_alpha_s=0, inter_beta_s=0, backend=backend,
                             allreduce_fit={"2": [seconds, 0.0]})


def test_buckets_overlap_backward_by_hand():
    layers = [1_000_000, 1_000_000]  # 4 MB each: one bucket each with bucket_mb=3
    # compute 3 s: forward 1, backward 2; bucket 1 ready at 2, bucket 2 at 3
    step, exposed = costmodel.step_s(compute_s=3.0, layer_params=layers, p=2,
                                     cluster=_fixed(0.5), bucket_mb=3)
    assert (step, exposed) == pytest.approx((3.5, 0.5))  # only the last bucket shows
    step, exposed = costmodel.step_s(compute_s=3.0, layer_params=layers, p=2,
                                     cluster=_fixed(1.5), bucket_mb=3)
    assert (step, exposed) == pytest.approx((5.0, 2.0))  # bucket 2 waits for bucket 1
    # one bucket: nothing overlaps
    step, exposed = costmodel.step_s(compute_s=3.0, layer_params=layers, p=2,
                                     cluster=_fixed(1.5), bucket_mb=25)
    assert (step, exposed) == pytest.approx((4.5, 1.5))
    assert costmodel.step_s(compute_s=3.0, layer_params=layers, p=1,
                            cluster=_fixed(1.5)) == (3.0, 0.0)


def test_via_root_where_distnn_uses_it():
    cluster = costmodel.Cluster(name="g", gpus_per_node=1, intra_alpha_s=1e-5, intra_beta_s=1e-9,
                                inter_alpha_s=1e-5, inter_beta_s=1e-9, backend="gloo")
    small, big = 404_448, 4 * 2**20
    assert costmodel.gradient_sum_s(small, 4, cluster) == pytest.approx(
        costmodel.via_root_s(small, 4, 1e-5, 1e-9))
    for n, p in ((big, 4), (small, 16)):
        assert costmodel.gradient_sum_s(n, p, cluster) == pytest.approx(
            costmodel.ring_allreduce_s(n, p, 1e-5, 1e-9))


def test_predict_strong_and_weak():
    cluster = _fixed(0.001)
    compute = costmodel.Compute(fixed_ms=0.0, per_sample_ms=1.0)
    strong = costmodel.predict(layer_params=[100], batch=8, compute=compute, cluster=cluster,
                               worlds=[1, 2])
    assert [r["compute_ms"] for r in strong] == [8.0, 4.0]
    assert strong[1]["step_ms"] == pytest.approx(5.0)
    assert strong[1]["efficiency"] == pytest.approx(8 / (2 * 5))
    weak = costmodel.predict(layer_params=[100], batch=8, compute=compute, cluster=cluster,
                             worlds=[1, 2], scaling="weak")
    assert weak[1]["compute_ms"] == 8.0 and weak[1]["global_batch"] == 16
    assert weak[1]["efficiency"] == pytest.approx(8 / 9)
    shared = costmodel.Cluster(**{**cluster.to_json(), "cores": 2,
                                  "allreduce_fit": {"4": [0.0, 0.0]}})
    four = costmodel.predict(layer_params=[100], batch=8, compute=compute, cluster=shared,
                             worlds=[4])
    assert four[0]["compute_ms"] == pytest.approx(2.0 * 4 / 2)  # 4 ranks on 2 cores


def test_fit_recovers_known_alpha_and_beta():
    alpha, beta = 40e-6, 0.8e-9
    worlds, sizes, times = [], [], []
    noise = random.Random(0)
    for p in (2, 4, 8, 16):
        for n in calibrate.DEFAULT_SIZES:
            worlds.append(p)
            sizes.append(n)
            times.append(costmodel.ring_allreduce_s(n, p, alpha, beta))
    assert calibrate.fit_ring(worlds, sizes, times) == pytest.approx((alpha, beta), rel=1e-6)
    noisy = [t * (1 + noise.uniform(-0.03, 0.03)) for t in times]
    assert calibrate.fit_ring(worlds, sizes, noisy) == pytest.approx((alpha, beta), rel=0.05)
    line = [(n, 1e-4 + 2e-9 * n) for n in calibrate.DEFAULT_SIZES]
    assert calibrate.fit_line(*zip(*line, strict=True)) == pytest.approx((1e-4, 2e-9), rel=1e-6)
    root = [costmodel.via_root_s(n, p, alpha, beta) for p, n in zip(worlds, sizes, strict=True)]
    assert calibrate.fit_via_root(worlds, sizes, root) == pytest.approx((alpha, beta), rel=1e-6)
    rows = calibrate.medians([{"kind": "allreduce", "world_size": p, "bytes": n, "seconds": t}
                              for p, n, t in zip(worlds, sizes, times, strict=True)] * 3)
    described = calibrate.cluster_description(rows, name="x", cores=2)
    cluster = costmodel.Cluster.from_json(described)
    assert (cluster.intra_alpha_s, cluster.intra_beta_s) == pytest.approx((alpha, beta))
    a, b = cluster.allreduce_fit["4"]
    assert (a, b) == pytest.approx((6 * alpha, 1.5 * beta))


def test_command_table_and_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert scale.main(["--cluster", "nvlink-ib400", "--worlds", "1,2,8,1024",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "101,110 parameters" in text and "| 1024 |" in text and "efficiency" in text
    rows = json.loads(out.read_text())
    assert [r["world_size"] for r in rows] == [1, 2, 8, 1024]
    for row in rows:
        for key in ("world_size", "step_ms", "compute_ms", "comm_ms", "efficiency",
                    "samples_per_s"):
            assert key in row
        assert row["step_ms"] == pytest.approx(row["compute_ms"] + row["comm_ms"])
    assert rows[0]["efficiency"] == 1.0 and rows[-1]["efficiency"] < 0.01


def test_command_reads_a_cluster_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"cluster": costmodel.PRESETS["horovod-roce25"].to_json()}))
    assert scale.main(["--params", "1000000", "--compute-ms", "10", "--cluster", str(path),
                       "--worlds", "1,4", "--scaling", "weak"]) == 0
    assert "| 4 | 1000" not in capsys.readouterr().out  # weak: per-rank batch stays 64


BAD_INPUT = [
    (["--batch-size", "-4"], "--batch-size -4"),
    (["--cluster", "no-such-cluster"], "no-such-cluster"),
    (["--worlds", "1,-2"], "--worlds"),
    (["--scaling", "sideways"], "--scaling"),
    (["--cluster", "UNREADABLE"], "could not be read"),
    (["--bucket-mb", "nan"], "--bucket-mb nan is not allowed; allowed: a finite number > 0"),
    (["--compute-ms", "inf"], "--compute-ms inf is not allowed"),
    (["--fixed-ms", "1"], "--fixed-ms is a part of --compute-ms; allowed: --fixed-ms with"),
    (["--measure", "--compute-ms", "2"], "--measure and --compute-ms both give"),
    (["--compute-ms", "1", "--plot", "OUT/x.xyz"], "Format 'xyz' is not supported"),
    (["--json", "OUT/missing/x.json"], "--json: got"),
    (["calibrate", "--out", "OUT/missing/x.json"], "--out: got"),  # before any measuring
    (["--compute-ms", "1", "--cluster", "TEXT_GPUS"],
     "gpus_per_node is '8'; allowed: an integer >= 1"),
    (["--compute-ms", "1", "--cluster", "BOGUS_ALGORITHM"],
     "algorithm is 'bogus'; allowed: ring, tree, auto"),
]


def _bad_args(args, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    preset = costmodel.PRESETS["horovod-roce25"].to_json()
    clusters = {"TEXT_GPUS": {**preset, "gpus_per_node": "8"},
                "BOGUS_ALGORITHM": {**preset, "algorithm": "bogus"}}
    for name, cluster in clusters.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(cluster))
    return [str(bad) if a == "UNREADABLE" else str(tmp_path / f"{a}.json") if a in clusters
            else a.replace("OUT", str(tmp_path)) for a in args]


@pytest.mark.parametrize("args, says", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, says):
    assert scale.main(_bad_args(args, tmp_path)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distnn: error: ") and says in lines[0]
    assert "allowed:" in lines[0]


@pytest.mark.parametrize("args, says", [BAD_INPUT[0], BAD_INPUT[4]])
def test_bad_input_from_the_command_line(tmp_path, args, says):
    done = subprocess.run([sys.executable, "-m", "distnn.tools.scale", *_bad_args(args, tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distnn: error: ") and says in lines[0]


def test_compute_contention_by_hand():
    # 2 cores, contention 1.5: one rank alone 10 ms; 2 ranks (5 rows each of 10) 1.5 * 5 ms;
    # 8 ranks share the 2 cores 4 ways: 1.5 * 4 * ceil(10/8)=2 rows = 12 ms; no collective cost
    cluster = costmodel.Cluster(name="t", gpus_per_node=1, intra_alpha_s=0, intra_beta_s=0,
                                inter_alpha_s=0, inter_beta_s=0, cores=2,
                                compute_contention=1.5)
    rows = costmodel.predict(layer_params=[10], batch=10, cluster=cluster, worlds=[1, 2, 8],
                             compute=costmodel.Compute(fixed_ms=0.0, per_sample_ms=1.0))
    assert [r["compute_ms"] for r in rows] == pytest.approx([10.0, 7.5, 12.0])
    assert [r["step_ms"] for r in rows] == pytest.approx([10.0, 7.5, 12.0])
    plain = costmodel.Cluster(**{**cluster.to_json(), "compute_contention": 1.0})
    rows = costmodel.predict(layer_params=[10], batch=10, cluster=plain, worlds=[2, 8],
                             compute=costmodel.Compute(fixed_ms=0.0, per_sample_ms=1.0))
    assert [r["compute_ms"] for r in rows] == pytest.approx([5.0, 8.0])


def test_step_overhead_by_hand():
    # overhead on 2 ranks 1 ms + 1 ns/B: 10 parameters = 40 bytes -> 1.00004 ms, added to the
    # step (compute 5 ms, the collective 0.5 ms): 6.50004 ms; none listed for 4 ranks, none for 1
    cluster = costmodel.Cluster(name="t", gpus_per_node=8, intra_alpha_s=0, intra_beta_s=0,
                                inter_alpha_s=0, inter_beta_s=0,
                                allreduce_fit={"2": [5e-4, 0.0], "4": [5e-4, 0.0]},
                                step_overhead_fit={"2": [1e-3, 1e-9]})
    rows = costmodel.predict(layer_params=[10], batch=10, cluster=cluster, worlds=[1, 2, 4],
                             compute=costmodel.Compute(fixed_ms=0.0, per_sample_ms=1.0))
    assert [r["overhead_ms"] for r in rows] == pytest.approx([0.0, 1.00004, 0.0])
    assert [r["step_ms"] for r in rows] == pytest.approx([10.0, 6.50004, 3.5])
    negative = costmodel.Cluster(**{**cluster.to_json(), "step_overhead_fit": {"2": [-1.0, 0]}})
    assert costmodel.step_overhead_s(40, 2, negative) == 0.0


def test_overhead_fit_by_hand():
    # world 1: (1000 B, 1 ms) and (3000 B, 3 ms): b = 1e-6 s/B, a = 0; world 2, one point: a
    # constant; world 4, three points off a line: least squares (b = 1e-6, a = 1e-3 + 1/3 ms)
    fit = calibrate.overhead_fit({"1": [[1000, 1e-3], [3000, 3e-3]], "2": [[1000, 2e-3]],
                                  "4": [[0, 1e-3], [1000, 3e-3], [2000, 3e-3]]})
    assert fit["1"] == pytest.approx([0.0, 1e-6], abs=1e-12)
    assert fit["2"] == pytest.approx([2e-3, 0.0])
    assert fit["4"] == pytest.approx([1e-3 + 1e-3 / 3, 1e-6])


def test_one_ranks_overhead_is_added_where_listed():
    cluster = costmodel.Cluster(name="t", gpus_per_node=1, intra_alpha_s=0, intra_beta_s=0,
                                inter_alpha_s=0, inter_beta_s=0,
                                allreduce_fit={"2": [0.0, 0.0]},
                                step_overhead_fit={"1": [1e-3, 0.0], "2": [1e-3, 0.0]})
    rows = costmodel.predict(layer_params=[10], batch=10, cluster=cluster, worlds=[1, 2],
                             compute=costmodel.Compute(fixed_ms=0.0, per_sample_ms=1.0))
    assert [r["overhead_ms"] for r in rows] == pytest.approx([1.0, 1.0])
    assert [r["step_ms"] for r in rows] == pytest.approx([11.0, 6.0])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 11 / 12])  # T(1) has it too


TINY = (calibrate.HeldOut("tiny a", 16, 20, (8,), 4), calibrate.HeldOut("tiny b", 16, 20, (64,), 4))


def test_calibrate_measures_the_overhead_and_the_prediction_uses_it(tmp_path, capsys,
                                                                   monkeypatch):
    # Small models, few steps: what the file carries and what the prediction makes of it, not
    # how well (docs/scaling.md records the real check).
    monkeypatch.setattr(calibrate, "HELD_OUT", TINY)
    out = tmp_path / "here.json"
    assert scale.main(["calibrate", "--out", str(out), "--worlds", "2", "--sizes",
                       "4096,65536", "--repeats", "1", "--rounds", "1",
                       "--run-seconds", "0.01"]) == 0
    said = capsys.readouterr().out
    assert "calibrate: measured here in " in said and "held-out models tiny a, tiny b" in said
    assert "gloo all-reduce at 2 ranks" in said and "\n  1 rank: a = " in said, said
    assert "\n  2 ranks: a = " in said and said.rstrip().endswith(f"wrote {out}")
    data = json.loads(out.read_text())
    fit = data["cluster"]["step_overhead_fit"]
    assert sorted(fit) == ["1", "2"] and all(len(line) == 2 for line in fit.values())
    assert data["seconds"]["overhead"] > 0 and data["seconds"]["total"] >= (
        data["seconds"]["collectives"] + data["seconds"]["overhead"])
    assert [m["name"] for m in data["overhead"]["models"]] == ["tiny a", "tiny b"]
    assert {s["name"] for s in data["overhead"]["samples"]} == {"tiny a", "tiny b"}
    assert {s["world_size"] for s in data["overhead"]["samples"]} == {1, 2}

    prediction = tmp_path / "p.json"
    assert scale.main(["--cluster", str(out), "--batch-size", "16", "--d-in", "20", "--hidden",
                       "32", "--d-out", "4", "--compute-ms", "1", "--worlds", "1,2",
                       "--json", str(prediction)]) == 0
    rows = json.loads(prediction.read_text())
    n = (20 * 32 + 32 + 32 * 4 + 4) * 4
    for row in rows:
        a, b = fit[str(row["world_size"])]
        assert row["overhead_ms"] == pytest.approx(max(0.0, a + b * n) * 1e3)
        assert row["step_ms"] == pytest.approx(row["compute_ms"] + row["comm_ms"]
                                               + row["overhead_ms"])


def test_measure_times_distnns_step_beside_a_prediction(tmp_path, capsys):
    prediction = tmp_path / "p.json"
    prediction.write_text(json.dumps([{"world_size": 1, "step_ms": 1.0}]))
    out = tmp_path / "m.json"
    assert scale.main(["measure", "--batch-size", "16", "--d-in", "20", "--hidden", "8",
                       "--d-out", "4", "--worlds", "1", "--steps", "5,25", "--rounds", "2",
                       "--against", str(prediction), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    row, = data["rows"]
    assert row["world_size"] == 1 and row["rounds"] == 2 and row["ms_per_step"] > 0
    assert row["error"] == pytest.approx(1.0 / row["ms_per_step"] - 1)
    assert "| 1 | " in capsys.readouterr().out
    assert [(s["short_steps"], s["long_steps"]) for s in data["samples"]] == [(5, 25)] * 2


@pytest.mark.parametrize("args, says", [
    (["measure", "--steps", "25,5"], "--steps"),
    (["measure", "--against", "UNREADABLE"], "--against"),
    (["calibrate", "--out", "x.json", "--worlds", "2", "--overhead-worlds", "1,4"],
     "--overhead-worlds"),
])
def test_bad_input_to_calibrate_and_measure(tmp_path, capsys, args, says):
    assert scale.main(_bad_args(args, tmp_path)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distnn: error: ") and says in lines[0]
    assert "allowed:" in lines[0]


def test_this_machines_preset_is_a_calibration_file():
    data = json.loads(open(scale.this_machine_file(), encoding="utf-8").read())
    cluster = scale.load_cluster("this-machine-gloo")
    assert cluster == costmodel.Cluster.from_json(data["cluster"])
    assert {"1", "2", "4"} <= set(cluster.step_overhead_fit)
    assert data["overhead"]["models"] and data["seconds"]["total"] > 0


def test_tbf_bucket_by_hand():
    # 404,440 B through rank 0 on 2 ranks, 1 Gbit/s (beta 8e-9), alpha 1e-4, bucket 125,000 B
    # sent at 1e-9 s/B: each direction 1e-4 + 279,440*8e-9 + 125,000*1e-9 = 2.460520e-3
    assert costmodel.via_root_s(404440, 2, 1e-4, 8e-9, 125000, 1e-9) == pytest.approx(
        2 * 2.46052e-3)
    assert costmodel.via_root_s(404440, 2, 1e-4, 8e-9) == pytest.approx(2 * 3.33552e-3)
    # the bucket refills at the rate: 0.5 ms idle at 8e-9 s/B = 62,500 B of a 125,000 B bucket
    assert costmodel.bucket_available(125000, 5e-4, 8e-9) == pytest.approx(62500)
    assert costmodel.bucket_available(125000, 1.0, 8e-9) == 125000
    assert costmodel.bucket_available(0, 1.0, 8e-9) == 0.0
    # a message smaller than the bucket goes wholly at line speed
    assert costmodel.shaped_bytes_s(1000, 8e-9, 125000, 1e-9) == pytest.approx(1e-6)
    cluster = costmodel.Cluster(name="t", gpus_per_node=1, intra_alpha_s=1e-4,
                                intra_beta_s=8e-9, inter_alpha_s=1e-4, inter_beta_s=8e-9,
                                backend="gloo", burst_bytes=125000, burst_beta_s=1e-9)
    # idle = compute 0 + the other direction (>= 2.46 ms = 307,565 B of refill): full bucket
    assert costmodel.gradient_sum_s(404440, 2, cluster) == pytest.approx(2 * 2.46052e-3)
    # ring on 2 nodes, 8.4e6 B: 2e-4 + (8.4e6 - 125,000)*8e-9 + 125,000*1e-9 with compute
    # 1 s of idle; with none, no tokens: 2e-4 + 8.4e6*8e-9
    ring = costmodel.Cluster(name="r", gpus_per_node=1, intra_alpha_s=1e-4, intra_beta_s=8e-9,
                             inter_alpha_s=1e-4, inter_beta_s=8e-9, burst_bytes=125000,
                             burst_beta_s=1e-9)
    assert costmodel.gradient_sum_s(8.4e6, 2, ring, idle_s=1.0) == pytest.approx(0.066525)
    assert costmodel.gradient_sum_s(8.4e6, 2, ring) == pytest.approx(0.0674)
    # no bucket (the default): the formulas as before
    plain = costmodel.Cluster(name="p", gpus_per_node=1, intra_alpha_s=1e-4, intra_beta_s=8e-9,
                              inter_alpha_s=1e-4, inter_beta_s=8e-9)
    assert costmodel.gradient_sum_s(8.4e6, 2, plain, idle_s=1.0) == pytest.approx(0.0674)
    # the script's burst: 1 ms at the rate, at least 64 KiB
    assert scale.tbf_burst_bytes(1e9) == 125000
    assert scale.tbf_burst_bytes(2e8) == 65536
