"""--data: each format, each rank reading its own rows, every kind of bad file refused."""

from __future__ import annotations

import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distnn.data.datafile import DataFile
from distnn.errors import UsageError
from distnn.train import main
from tests.conftest import bin_path, read_losses, run_cli, run_world
from tests.reference import assert_matches_reference


def make_tensors(rows=10, d_in=6, d_out=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, d_in, generator=generator),
            torch.randn(rows, d_out, generator=generator))


def write(path, x, y, **npz_options):
    suffix = path.suffix
    if suffix == ".safetensors":
        save_file({"x": x, "y": y}, path)
    elif suffix == ".npz":
        (np.savez_compressed if npz_options.get("compressed") else np.savez)(
            path, x=x.numpy() if npz_options.get("c_order", True) else np.asfortranarray(x),
            y=y.numpy())
    else:
        torch.save({"x": x, "y": y}, path)
    return path


@pytest.mark.parametrize("name, options", [
    ("d.safetensors", {}), ("d.pt", {}), ("d.npz", {}), ("c.npz", {"compressed": True}),
    ("f.npz", {"c_order": False}),
])
def test_every_format_yields_the_same_rows(tmp_path, name, options):
    x, y = make_tensors()
    path = write(tmp_path / name, x, y, **options)
    data = DataFile(str(path))
    assert (data.rows, data.d_in, data.d_out, data.labels) == (10, 6, 3, False)
    for start, stop in [(0, 4), (4, 7), (7, 10), (10, 10)]:
        x_shard, y_shard = data.read_range(start, stop)
        assert torch.equal(x_shard, x[start:stop]) and torch.equal(y_shard, y[start:stop])
        assert x_shard.dtype == torch.float32
    rows = torch.tensor([7, 2, 3, 9, 0, 1])  # any order: a shuffled batch's
    x_rows, y_rows = data.read(rows)
    assert torch.equal(x_rows, x[rows]) and torch.equal(y_rows, y[rows])


@pytest.mark.parametrize("name", ["d.npz", "d.safetensors"])
def test_a_file_read_by_row_reads_only_those_rows(tmp_path, monkeypatch, name):
    x, y = make_tensors(rows=1000, d_in=50)
    path = write(tmp_path / name, x, y)
    data = DataFile(str(path))
    read_sizes = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        read_sizes.append(real_preadv(fd, buffers, offset))
        return read_sizes[-1]

    monkeypatch.setattr(os, "preadv", counting_preadv)
    rows = torch.tensor([905, 100, 101, 102, 3])
    x_rows, y_rows = data.read(rows)
    assert torch.equal(x_rows, x[rows]) and torch.equal(y_rows, y[rows])
    # one read per run of consecutive rows, for x and for y: the rest of the file is not read
    assert len(read_sizes) == 6 and sum(read_sizes) == 5 * (50 + 3) * 4


def test_integer_targets_are_class_labels(tmp_path):
    x, _ = make_tensors(rows=6, d_in=4)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    for name in ("d.safetensors", "d.npz", "d.pt"):
        path = write(tmp_path / name, x, labels)
        data = DataFile(str(path))
        assert data.labels and data.check_labels() == 3
        x_rows, y_rows = data.read(torch.tensor([1, 4]))
        assert y_rows.dtype == torch.int64 and y_rows.tolist() == [3, 2]


@pytest.mark.parametrize("name", ["t.npz", "t.safetensors", "t.pt"])
def test_unsigned_token_ids_train_as_int64_ones_do(tmp_path, no_launcher, name):
    # uint16 token ids, as nanoGPT writes them (uint32 in .pt): the same labels, the same run
    tokens = torch.randint(0, 256, (24, 9), generator=torch.Generator().manual_seed(4))
    narrow = torch.uint32 if name.endswith(".pt") else torch.uint16
    runs = []
    for path, dtype in ((tmp_path / f"wide-{name}", torch.int64),
                        (tmp_path / name, narrow)):
        if name.endswith(".npz"):
            rows = tokens.numpy().astype(np.uint16 if dtype == narrow else np.int64)
            np.savez(path, x=rows[:, :-1], y=rows[:, 1:])
        else:
            write(path, tokens[:, :-1].to(dtype).contiguous(),
                  tokens[:, 1:].to(dtype).contiguous())
        assert DataFile(str(path)).check_labels() == int(tokens[:, 1:].max())
        metrics = tmp_path / f"{path.stem}.jsonl"
        assert main(["--data", str(path), "--model", "distnn.models.gpt:build", "--d-out",
                     "256", "--model-args", '{"d_model": 16, "n_layers": 1, "n_heads": 2}',
                     "--loss", "cross-entropy", "--batch-size", "8", "--steps", "3",
                     "--metrics", str(metrics), "--quiet"]) == 0
        runs.append(read_losses(metrics))
    assert runs[0] == runs[1]


def test_training_on_a_file_matches_the_reference_on_three_ranks(tmp_path):
    x, y = make_tensors(rows=11, d_in=7, d_out=2, seed=3)
    path = write(tmp_path / "d.safetensors", x, y)
    result = run_world(3, ["--data", str(path), "--hidden", "5", "--steps", "200",
                           "--lr", "1e-3", "--seed", "4"], tmp_path / "run")
    assert_matches_reference(result["losses"], result["weights"][0], data=str(path),
                             hidden=(5,), steps=200, lr=1e-3, seed=4)


def test_deeper_models_match_the_reference(tmp_path):
    argv = ["--hidden", "16,8", "--d-in", "12", "--batch-size", "9", "--steps", "150",
            "--lr", "1e-3"]
    result = run_world(2, argv, tmp_path)
    assert sorted(result["weights"][0]) == ["0.bias", "0.weight", "2.bias", "2.weight",
                                            "4.bias", "4.weight"]
    assert_matches_reference(result["losses"], result["weights"][0], hidden=(16, 8), d_in=12,
                             batch_size=9, steps=150, lr=1e-3)


def test_a_data_file_sets_the_model_sizes(tmp_path, capsys, no_launcher):
    x, y = make_tensors(rows=5, d_in=4, d_out=1)
    path = write(tmp_path / "d.pt", x, y.reshape(5))  # a 1-D target is one output
    same = write(tmp_path / "same.safetensors", x, y)  # the reference reads this copy
    metrics, weights = tmp_path / "m.jsonl", tmp_path / "w.safetensors"
    assert main(["--data", str(path), "--steps", "40", "--metrics", str(metrics),
                 "--save", str(weights)]) == 0
    state = load_file(weights)
    assert state["0.weight"].shape == (100, 4) and state["2.weight"].shape == (1, 100)
    assert_matches_reference(read_losses(metrics), state, data=str(same), steps=40)


BAD_FILES = {
    "missing": "does not exist",
    "d.csv": "has an unknown format; allowed: .safetensors, .npz, .pt files",
    "no_y.safetensors": "has no tensor named 'y'",
    # rows of any shape and dtype are data (for --model); the MLP takes features
    "ints.safetensors": "holds x of shape [4, 3] and dtype int64, which the MLP cannot take",
    "rows.safetensors": "holds 4 rows of x and 3 of y",
    "shape.npz": "holds x of shape [4] and dtype float32, which the MLP cannot take",
    "nan.safetensors": "holds a non-finite value in x",
    "torn.safetensors": "cannot be read",
    "pickle.pt": "cannot be read",
    "no_x_columns.safetensors": "holds x of shape [4, 0] and y of shape [4, 2]; allowed: at "
                                "least one value in each row",
    "no_y_columns.safetensors": "holds x of shape [4, 3] and y of shape [4, 0]",
    "folder.safetensors": "is a directory; allowed: a data file",
    # what a .pt file can hold beyond plain tensors: refused by name, not a traceback
    "fp8.pt": "holds x of shape [4, 3] and dtype float8_e4m3fn; allowed: rows [N, ...] of "
              "numbers",
    "sparse.pt": "holds x as a sparse_coo tensor; allowed: dense tensors with their values",
    "csr.pt": "holds y as a sparse_csr tensor",
    "meta.pt": "holds x as a tensor without values (on the meta device)",
}


def make_bad(tmp_path, name):
    path = tmp_path / name
    x, y = make_tensors(rows=4, d_in=3, d_out=2)
    if name == "d.csv":
        path.write_text("1,2\n")
    elif name == "no_y.safetensors":
        save_file({"x": x}, path)
    elif name == "ints.safetensors":
        save_file({"x": x.long(), "y": y}, path)
    elif name == "rows.safetensors":
        save_file({"x": x, "y": y[:3].contiguous()}, path)
    elif name == "shape.npz":
        np.savez(path, x=np.zeros(4, dtype=np.float32), y=y.numpy())
    elif name == "nan.safetensors":
        x[2, 1] = float("nan")
        save_file({"x": x, "y": y}, path)
    elif name == "torn.safetensors":
        save_file({"x": x, "y": y}, path)
        path.write_bytes(path.read_bytes()[:40])
    elif name == "pickle.pt":
        torch.save({"x": x, "y": y, "evil": object()}, path)  # needs pickle: refused
    elif name == "no_x_columns.safetensors":
        save_file({"x": torch.zeros(4, 0), "y": y}, path)
    elif name == "no_y_columns.safetensors":
        save_file({"x": x, "y": torch.zeros(4, 0)}, path)
    elif name == "folder.safetensors":
        path.mkdir()
    elif name == "fp8.pt":
        torch.save({"x": x.to(torch.float8_e4m3fn), "y": y}, path)
    elif name == "sparse.pt":
        torch.save({"x": x.to_sparse(), "y": y}, path)
    elif name == "csr.pt":
        with warnings.catch_warnings():  # torch's: CSR support is in beta
            warnings.simplefilter("ignore")
            torch.save({"x": x, "y": y.to_sparse_csr()}, path)
    elif name == "meta.pt":
        torch.save({"x": x.to("meta"), "y": y}, path)
    return path


@pytest.mark.parametrize("name, options", [("d.safetensors", {}), ("d.npz", {}),
                                           ("d.npz", {"compressed": True})])
def test_a_file_replaced_or_deleted_during_the_run_is_read_as_it_was(tmp_path, name, options):
    x, y = make_tensors(rows=20, d_in=3)
    path = write(tmp_path / name, x, y, **options)
    data = DataFile(str(path))
    other = write(tmp_path / f"other{path.suffix}", x + 1, y + 1, **options)
    os.replace(other, path)  # renamed over it, as a new version of the data would be
    rows = torch.tensor([3, 4, 17])
    got = data.read(rows)
    assert torch.equal(got[0], x[rows]) and torch.equal(got[1], y[rows])
    path.unlink()
    got = data.read(rows)
    assert torch.equal(got[0], x[rows]) and torch.equal(got[1], y[rows])


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_files_are_one_line_and_exit_2(tmp_path, capsys, no_launcher, name):
    path = make_bad(tmp_path, name)
    assert main(["--data", str(path), "--steps", "2"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distnn: error: --data: {str(path)!r}")
    assert BAD_FILES[name] in lines[0], lines[0]


def test_sizes_that_contradict_the_file_are_refused(tmp_path, capsys, no_launcher):
    x, y = make_tensors(rows=4, d_in=3, d_out=2)
    path = write(tmp_path / "d.safetensors", x, y)
    assert main(["--data", str(path), "--d-in", "5"]) == 2
    assert "--d-in: got 5 but --data" in capsys.readouterr().err


def test_a_bad_shard_on_another_rank_stops_every_rank(tmp_path):
    x, y = make_tensors(rows=8, d_in=3, d_out=2)
    x[7, 0] = float("inf")  # in rank 1's rows only
    path = write(tmp_path / "d.safetensors", x, y)
    result = run_cli([bin_path("torchrun"), "--nproc_per_node=2", "-m", "distnn.train",
                      "--data", str(path), "--steps", "2"], timeout=60)
    lines = sorted(line for line in result.stderr.splitlines() if line.startswith("distnn:"))
    assert result.returncode != 0 and len(lines) == 2, result.stderr[-2000:]
    for rank, line in enumerate(lines):
        assert line.startswith(f"distnn: rank {rank}: error: --data: ")
        assert "non-finite value in x, rows [4, 8)" in line


CUT_MAPPED_PT = """
import os, sys, torch
from distnn.errors import UsageError
from distnn.data.datafile import DataFile
path = sys.argv[1]
torch.save({"x": torch.randn(20000, 8), "y": torch.randn(20000, 2)}, path)
data = DataFile(path)
os.truncate(path, 4096)
try:
    data.read(torch.arange(19990, 20000))
except UsageError as error:
    print(error)
"""


def test_a_memory_mapped_pt_file_cut_short_during_the_run_is_named_not_a_crash(tmp_path):
    # touching a mapped page past the new end of the file would kill the process (SIGBUS);
    # run apart, so that a regression fails this test rather than the whole session
    path = tmp_path / "d.pt"
    result = run_cli([sys.executable, "-c", CUT_MAPPED_PT, str(path)])
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip().startswith(
        f"--data: {str(path)!r} ended early (cut to 4096 of its "), result.stdout


def test_a_file_cut_short_during_the_run_is_named_in_one_line(tmp_path):
    x, y = make_tensors(rows=20, d_in=3)
    path = write(tmp_path / "v.safetensors", x, y)
    data = DataFile(str(path), flag="--val-data")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(UsageError, match=re.escape(f"--val-data: {str(path)!r} ended early")):
        data.read(torch.arange(20))
