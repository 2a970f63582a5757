"""``python -m distnn.tools.tokens``: the rows it writes equal windows cut from the text with
plain Python slicing (chunked or not, any stride), the validation split loses and repeats no
byte, and each bad input is one line on stderr and exit 2, with nothing left behind."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distnn.errors import UsageError
from distnn.tools import tokens

REPO = Path(__file__).parent.parent
TEXT = ("The quick brown fox jumps over the lazy dog. Ünïcödé bytes too.\n" * 15).encode()[:1001]


def reference(data: bytes, context: int, stride: int) -> tuple[list, list]:
    """x and y as lists of byte lists: every window of context + 1 bytes, one every stride."""
    starts = range(0, len(data) - context, stride)
    return ([list(data[s:s + context]) for s in starts],
            [list(data[s + 1:s + context + 1]) for s in starts])


@pytest.mark.parametrize("context,stride", [(16, 16), (5, 3), (4, 9), (1, 1), (1000, 1)])
@pytest.mark.parametrize("chunk_bytes", [40, 16 << 20])
def test_rows_equal_python_slicing(tmp_path, monkeypatch, context, stride, chunk_bytes):
    monkeypatch.setattr(tokens, "CHUNK_BYTES", chunk_bytes)  # 40: many chunks of few rows
    text = tmp_path / "in.txt"
    text.write_bytes(TEXT)
    out = tmp_path / "out.safetensors"
    rows = tokens.write_tokens(str(text), str(out), context=context, stride=stride)
    written = load_file(out)
    x, y = reference(TEXT, context, stride)
    assert rows == len(x) > 0
    assert set(written) == {"x", "y"}
    for name, expected in (("x", x), ("y", y)):
        assert written[name].dtype == torch.uint8
        assert written[name].shape == (rows, context)
        assert written[name].tolist() == expected
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.safetensors"]


@pytest.mark.parametrize("stride", [None, 5])
def test_validation_split_starts_at_the_split_byte(tmp_path, capsys, stride):
    text = tmp_path / "in.txt"
    text.write_bytes(TEXT)  # 1001 bytes: 200 to validation, training 0:801
    train, val = tmp_path / "train.safetensors", tmp_path / "val.safetensors"
    argv = [str(text), str(train), "--context", "8", "--val-fraction", "0.2",
            "--val-output", str(val)] + ([] if stride is None else ["--stride", str(stride)])
    assert tokens.main(argv) == 0
    split = 801
    train_rows, val_rows = load_file(train), load_file(val)
    for rows, part in ((train_rows, TEXT[:split]), (val_rows, TEXT[split:])):
        x, y = reference(part, 8, stride or 8)
        assert rows["x"].tolist() == x and rows["y"].tolist() == y
    assert bytes(val_rows["x"][0].tolist()) == TEXT[split:split + 8]
    if stride is None:  # the windows tile training's bytes exactly: none lost, none twice
        tiled = bytes(train_rows["x"].flatten().tolist()) + bytes([train_rows["y"][-1, -1]])
        assert tiled == TEXT[:split]
    line = capsys.readouterr().out.strip()
    assert line == (f"wrote {len(train_rows['x'])} rows ({len(train_rows['x']) * 8} tokens) "
                    f"to {train}; {len(val_rows['x'])} rows ({len(val_rows['x']) * 8} tokens) "
                    f"to {val}; T=8, stride {stride or 8}")


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "CHUNK_BYTES", 40)
    calls = []

    def second_read_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real_fromfile(*args, **kwargs)

    real_fromfile = tokens.np.fromfile
    monkeypatch.setattr(tokens.np, "fromfile", second_read_fails)
    text = tmp_path / "in.txt"
    text.write_bytes(TEXT)
    # a read of the text that fails is said as the text's, not the output's
    with pytest.raises(UsageError, match=f"{text} cannot be read \\(disk went away\\)"):
        tokens.write_tokens(str(text), str(tmp_path / "out.safetensors"), context=8, stride=8)
    assert os.listdir(tmp_path) == ["in.txt"]


def bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name: (argv, a part of the one error line)."""
    text, short = tmp_path / "in.txt", tmp_path / "short.txt"
    text.write_bytes(TEXT)
    short.write_bytes(b"12345")
    out = str(tmp_path / "out.safetensors")
    val = ["--val-output", str(tmp_path / "val.safetensors")]
    named, link = tmp_path / "text.safetensors", tmp_path / "link.safetensors"
    named.write_bytes(TEXT)
    link.symlink_to(text)
    return {
        "missing input": ([str(tmp_path / "nope.txt"), out, "--context", "8"], "nope.txt"),
        "input is a folder": ([str(tmp_path), out, "--context", "8"], "is a directory"),
        "text too short": ([str(short), out, "--context", "8"],
                           "has 5 bytes; --context 8 needs at least 9"),
        "validation part too short": ([str(text), out, "--context", "8", "--val-fraction",
                                       "0.001", *val], "has 1 bytes"),
        "context 0": ([str(text), out, "--context", "0"], "--context 0"),
        "context not a number": ([str(text), out, "--context", "abc"], "invalid int"),
        "no context": ([str(text), out], "--context"),
        "stride 0": ([str(text), out, "--context", "8", "--stride", "0"], "--stride 0"),
        "fraction 1": ([str(text), out, "--context", "8", "--val-fraction", "1", *val],
                       "--val-fraction 1"),
        "fraction alone": ([str(text), out, "--context", "8", "--val-fraction", "0.1"],
                           "go together"),
        "val output alone": ([str(text), out, "--context", "8", *val], "go together"),
        "output folder missing": ([str(text), str(tmp_path / "no" / "o.safetensors"),
                                   "--context", "8"], "does not exist"),
        "output not safetensors": ([str(text), str(tmp_path / "out.npz"), "--context", "8"],
                                   "does not end in .safetensors"),
        "output is the input": ([str(text), str(text), "--context", "8"],
                                f"OUTPUT {text} is the input {text}, which writing it would "
                                "destroy; allowed: another path"),
        # a text named .safetensors, and a link to it: both the input itself
        "val output is the input": ([str(named), out, "--context", "8", "--val-fraction",
                                     "0.1", "--val-output", str(named)],
                                    f"--val-output {named} is the input {named}"),
        "output a link to the input": ([str(text), str(link), "--context", "8"],
                                       f"OUTPUT {link} is the input {text}"),
        "output folder a file": ([str(text), str(text / "o.safetensors"), "--context", "8"],
                                 "is a file, not a folder"),
    }


def test_each_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for name, (argv, expected) in bad_cases(tmp_path).items():
        assert tokens.main(argv) == 2, name
        captured = capsys.readouterr()
        assert captured.out == "", name
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("distnn: error: "), (name, lines)
        assert expected in lines[0], (name, lines)
        assert sorted(os.listdir(tmp_path)) == ["in.txt", "link.safetensors", "short.txt",
                                                "text.safetensors"], name
        assert (tmp_path / "text.safetensors").read_bytes() == TEXT, name


def test_a_write_that_fails_replaces_neither_file(tmp_path, capsys, monkeypatch):
    # the training file is written, the validation file's write fails (a full disk): both
    # files appear, or neither
    text = tmp_path / "in.txt"
    text.write_bytes(TEXT * 20)
    out, val = tmp_path / "out.safetensors", tmp_path / "val.safetensors"
    out.write_bytes(b"the previous tokens")
    write, calls = tokens._write_windows, []

    def second_fails(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(*args, **kwargs)

    monkeypatch.setattr(tokens, "_write_windows", second_fails)
    assert tokens.main([str(text), str(out), "--context", "8", "--val-fraction", "0.5",
                        "--val-output", str(val)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"distnn: error: could not write {val} (No space left on device); nothing was written"]
    assert out.read_bytes() == b"the previous tokens" and not val.exists()
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.safetensors"]  # no temporary


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "in.txt").write_bytes(TEXT)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    argv = [str(tmp_path / "in.txt"), str(locked / "o.safetensors"), "--context", "8"]
    assert tokens.main(argv) == 2
    assert "is not writable" in capsys.readouterr().err


def test_the_command_line_speaks_in_one_line(tmp_path):
    """Through ``python -m``: the entry point's exit codes and lines, with no traceback
    (the processes run side by side; each spends seconds importing torch)."""
    cases = bad_cases(tmp_path)
    chosen = [cases["text too short"][0],
              [str(tmp_path / "in.txt"), str(tmp_path / "ok.safetensors"), "--context", "8"]]
    runs = [subprocess.Popen([sys.executable, "-m", "distnn.tools.tokens", *argv], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for argv in chosen]
    results = [(*run.communicate(timeout=120), run.returncode) for run in runs]
    for out, err, code in results[:-1]:
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (code, out, err)
        assert "Traceback" not in err
    out, err, code = results[-1]
    assert code == 0 and err == "" and out.startswith("wrote 125 rows (1000 tokens) to ")
    assert load_file(tmp_path / "ok.safetensors")["x"].shape == (125, 8)
