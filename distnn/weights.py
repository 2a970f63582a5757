"""Output files: checking a path before training, and saving weights atomically."""

from __future__ import annotations

import os
import tempfile

from safetensors.torch import save_file
from torch import nn

from distnn.config import UsageError


def check_writable(path: str, flag: str) -> None:
    """Raises UsageError unless a file can be created at ``path``.

    Tries for real (creates and removes a temporary file in the target directory), so the
    answer holds for root, read-only mounts and full disks alike.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag}: got {path!r}, which is a directory; allowed: a file path")
    if not os.path.isdir(directory):
        raise UsageError(f"{flag}: got {path!r} but the directory {directory!r} does not exist; "
                         "allowed: a path in an existing, writable directory")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".distnn-probe-"):
            pass
    except OSError as error:
        raise UsageError(f"{flag}: got {path!r} but {directory!r} is not writable "
                         f"({error.strerror}); allowed: a path in a writable directory") from None


def save_weights(module: nn.Module, path: str) -> None:
    """Writes ``module.state_dict()`` to ``path`` as safetensors, atomically.

    The file is written under a temporary name in the same directory, flushed to disk, then
    renamed over ``path``: a reader sees the old file or the complete new one, never half.
    """
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous()
               for name, tensor in module.state_dict().items()}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".distnn-save-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp_path)
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise

