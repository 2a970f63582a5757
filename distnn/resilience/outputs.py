"""Output files: checking a path before training, writing files whole or not at all, and
saving weights.

Every write goes to a temporary name beside its target, is flushed to disk, then renamed:
a reader sees the old file or the complete new one, never half. A failed write (no space,
a read-only or vanished folder, a file size limit, an I/O error) raises OSError naming the
file and the operating system's reason, and leaves no temporary behind; a temporary left by
a process that was killed mid-write is removed at the next start
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile

import torch
from safetensors.torch import save
from torch import nn

from distnn.errors import UsageError

_TEMPORARY = ".distnn-tmp"  # the suffix of a file being written: ".NAME.PID.distnn-tmp"
SPACE_MARGIN = 1 << 20  # bytes a write leaves free besides its own, at least


def check_writable(path: str, flag: str, *, in_place: bool = False) -> None:
    """Raises UsageError unless ``path`` can be written.

    A file that will be replaced whole (``--save``, a checkpoint's) must be a regular file
    or not exist yet; its directory is tried for real (a temporary file created and removed
    there), so the answer holds for root, read-only mounts and full disks alike. A symbolic
    link is followed: the file it names is written. A file written ``in_place`` (opened and
    appended to, as --metrics is) may also be a device or a pipe that can be opened for
    writing now (/dev/null, /dev/stdout); not a named pipe that no process reads, which
    would block the run until one did.
    """
    try:
        mode: int | None = os.stat(path).st_mode  # through links, /proc's too
    except OSError:
        mode = None  # not there (yet): the directory decides
    link = f" (a link to {os.path.realpath(path)!r})" if os.path.islink(path) else ""
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"{flag}: got {path!r}{link}, which is a directory; allowed: a file "
                         "path")
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        if not in_place:
            raise UsageError(f"{flag}: got {path!r}{link}, which is {kind}; allowed: a regular "
                             "file, which is replaced whole")
        try:  # without blocking: a pipe no one reads fails with ENXIO
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as error:
            reason = "no process reads it" if error.errno == errno.ENXIO else error.strerror
            raise UsageError(f"{flag}: got {path!r}{link}, which is {kind} that cannot be "
                             f"written now ({reason}); allowed: a regular file, or a device "
                             "or pipe open for writing") from None
        return
    directory = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(directory):
        problem = "is a file, not a directory" if os.path.exists(directory) else "does not exist"
        raise UsageError(f"{flag}: got {path!r}{link} but the directory {directory!r} "
                         f"{problem}; allowed: a path in an existing, writable directory")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".distnn-probe-"):
            pass
    except OSError as error:
        raise UsageError(f"{flag}: got {path!r}{link} but {directory!r} is not writable "
                         f"({error.strerror}); allowed: a path in a writable directory") from None


def check_space(directory: str, needed: int) -> None:
    """Raises OSError (ENOSPC) when ``directory``'s file system visibly has less free space
    than ``needed`` bytes and a margin: refused before a byte is written."""
    free = shutil.disk_usage(directory).free
    if free < needed + SPACE_MARGIN:
        raise OSError(errno.ENOSPC, f"No space left on device: {needed} bytes needed and "
                                    f"{SPACE_MARGIN >> 20} MiB kept free, {free} free",
                      directory)


def write_file(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` whole or not at all: a temporary beside it, flushed to
    disk, renamed over it (over the file a symbolic link names, not the link). Raises
    OSError on failure, with no temporary left."""
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    check_space(directory, len(data))
    tmp_path = os.path.join(directory, f".{name}.{os.getpid()}{_TEMPORARY}")
    try:
        with open(tmp_path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def remove_stale_temporaries(path: str) -> list[str]:
    """Removes the temporaries of writes to ``path`` whose writer no longer runs (killed
    mid-write); returns their paths. A live writer's (another job's) is left alone."""
    directory, name = os.path.split(os.path.realpath(path))
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+){re.escape(_TEMPORARY)}$")
    removed = []
    for entry in os.listdir(directory) if os.path.isdir(directory) else []:
        match = pattern.match(entry)
        if match and not _running(int(match.group(1))):
            os.remove(os.path.join(directory, entry))
            removed.append(os.path.join(directory, entry))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def tensor_bytes(tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` as the bytes of a safetensors file (CPU copies, contiguous), with the
    text ``metadata`` in its header."""
    return save({name: tensor.detach().to("cpu", copy=True).contiguous()
                 for name, tensor in tensors.items()}, metadata=metadata)


def save_weights(weights: nn.Module | dict[str, torch.Tensor], path: str,
                 metadata: dict[str, str] | None = None) -> None:
    """Writes ``weights`` (a module's state dict, or the module) to ``path`` as
    safetensors, whole or not at all, with ``metadata`` (text) in its header.

    Raises OSError (the file and the reason) when it cannot be written.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    write_file(path, tensor_bytes(state, metadata))


def describe_os_error(error: OSError) -> str:
    """The operating system's reason in an OSError, in words."""
    return error.strerror or str(error) or type(error).__name__
