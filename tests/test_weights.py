"""Output files: checked before training, written atomically, read without pickle."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from distnn.errors import UsageError
from distnn.job.model import build_model
from distnn.resilience.outputs import check_writable, save_weights


def test_check_writable_accepts_a_new_file_in_an_existing_directory(tmp_path):
    check_writable(str(tmp_path / "w.safetensors"), "--save")
    assert list(tmp_path.iterdir()) == [], "the probe file was left behind"


@pytest.mark.parametrize("make_path, words", [
    (lambda d: d, "which is a directory"),
    (lambda d: d / "absent" / "w.safetensors", "does not exist"),
    (lambda d: d / "a_file" / "w.safetensors", "is a file, not a directory"),
])
def test_check_writable_refuses_unusable_paths(tmp_path, make_path, words):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UsageError, match="--save: got") as info:
        check_writable(str(make_path(tmp_path)), "--save")
    assert words in str(info.value)


def test_check_writable_refuses_a_read_only_directory(tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes to a read-only directory: refuse as the kernel would
        def refused(**kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", refused)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="is not writable \\(Permission denied\\)"):
            check_writable(str(tmp_path / "w.safetensors"), "--save")
    finally:
        tmp_path.chmod(0o700)


def test_save_replaces_the_file_whole_and_round_trips(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"an older file")
    model = build_model(5, [4], 3)
    save_weights(model, str(path))
    loaded = load_file(path)
    assert sorted(loaded) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"an older file")

    class Broken(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return {"w": "not a tensor"}

    with pytest.raises(AttributeError):
        save_weights(Broken(), str(path))
    assert path.read_bytes() == b"an older file"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_a_save_that_fails_while_writing_leaves_the_old_file_and_no_temporary(tmp_path,
                                                                            monkeypatch):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"an older file")

    def failing_fsync(fd):  # the bytes are written, the disk then fails
        assert os.fstat(fd).st_size > 0
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        save_weights(build_model(5, [4], 3), str(path))
    assert path.read_bytes() == b"an older file"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
