"""Checkpoints: ``DIR/step-N/`` folders written atomically, found and verified on resume.

A checkpoint folder holds ``weights.safetensors`` (the model's state_dict), ``losses.safetensors``
(the global losses of the newest steps, at most lossrecord.TAIL), with a torch.optim optimizer
``optimizer.safetensors`` (its per-parameter state), and ``state.json`` (the step, where it
lies in its epoch, the config, the world size, the validation results so far and the
SHA-256 of every tensor file). It is written under a
temporary name, every file flushed to disk, then renamed: a folder named ``step-N`` is
complete, or a crash happened before it got that name. Nothing is read with pickle.

A sharded run's checkpoint (--shard gradients, parameters) holds each rank's shards in
``shards/`` in place of the two tensor files, written by every rank into the temporary
folder before rank 0 completes it (shards.py, which says what DCP reads with pickle).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file

from distnn.config import flag_name, flag_text
from distnn.errors import UsageError
from distnn.resilience.outputs import check_space, tensor_bytes

STEP_DIR = re.compile(r"^step-(0|[1-9]\d*)$")  # step-30; not step-030, a name of no step
WEIGHTS, LOSSES, STATE = "weights.safetensors", "losses.safetensors", "state.json"
OPTIMIZER = "optimizer.safetensors"
LOCK = ".distnn-lock"
TEMPORARY_PREFIX = ".step-"  # a checkpoint being written: ".step-N.tmp-XXXX"
# A checkpoint is refused when these differ from the run's: they fix the model, the order of
# the batches and the meaning of the saved state.
MUST_MATCH = ("batch_size", "d_in", "hidden", "d_out", "model", "model_args", "seed", "no_shuffle",
              "drop_last", "loss", "optimizer")
# What state.json's entries must be (distnn writes them so; older versions wrote fewer of
# them): it has no checksum of its own, so an edited or damaged one is caught here.
STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": int, "sha256": dict, "config": dict, "objects": dict, "val": list,
    "world_size": int, "rows": (int, type(None)), "data": (str, type(None)), "format": str,
    "scheduler": dict, "epoch": int, "batch_in_epoch": int, "optimizer_state": bool,
}


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: training resumes after ``step`` completed steps."""

    path: str
    step: int
    weights: dict[str, torch.Tensor]
    losses: torch.Tensor  # float32, the global losses of the newest completed steps
    state: dict[str, Any]
    optimizer: dict[str, torch.Tensor] | None = None  # torch.optim state (optimizers.py)

    @property
    def sharded(self) -> bool:
        """Whether the weights and optimizer state are each rank's shards (shards.py),
        read by every rank at the resume, rather than ``weights`` and ``optimizer``."""
        return self.state.get("format") == "sharded"

    @property
    def has_optimizer_state(self) -> bool:
        return self.optimizer is not None or bool(self.state.get("optimizer_state"))


def sha256_of(path: str) -> str:
    """The SHA-256 of the file at ``path``, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_folder(directory: str, step: int) -> str:
    """A new folder in ``directory`` to write ``step-{step}`` under before it is complete
    (:func:`remove_temporaries` recognises its name)."""
    return tempfile.mkdtemp(dir=directory, prefix=f"{TEMPORARY_PREFIX}{step}.tmp-")


def save_checkpoint(directory: str, *, step: int, weights: dict[str, torch.Tensor] | None,
                    losses: torch.Tensor, state: dict[str, Any], keep: int,
                    optimizer: dict[str, torch.Tensor] | None = None,
                    written: tuple[str, dict[str, str]] | None = None,
                    recipe: dict[str, str] | None = None) -> str:
    """Writes ``directory/step-{step}`` atomically, then keeps only the newest ``keep`` of
    the checkpoints up to it (a folder of a later step is left alone).

    ``state`` is stored in state.json with the step and the files' checksums added;
    ``optimizer`` (optimizers.state_tensors) in optimizer.safetensors when given.
    ``recipe``: how to build the model again, in weights.safetensors' metadata as in
    --save's (distnn.tools.sample reads either).
    ``written``: a sharded checkpoint's temporary folder (:func:`temporary_folder`), which
    already holds the ranks' shards, and their checksums by path; ``weights`` is then None.
    Returns the checkpoint's path. Rank 0 alone calls this. Raises OSError (the file, the
    reason) when it cannot be written, before writing when the free space is visibly short;
    the checkpoints already there stay, and no temporary folder is left.
    """
    final = os.path.join(directory, f"step-{step}")
    files = {LOSSES: tensor_bytes({"loss": losses.detach().to(torch.float32)})}
    if weights is not None:
        files[WEIGHTS] = tensor_bytes(weights, recipe)
    if optimizer is not None:
        files[OPTIMIZER] = tensor_bytes(optimizer)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    record = {**state, "step": step, "sha256": {**digests, **(written[1] if written else {})}}
    files[STATE] = json.dumps(record, indent=1, sort_keys=True).encode()
    try:
        check_space(directory, sum(len(data) for data in files.values()))
        tmp = written[0] if written else temporary_folder(directory, step)
    except BaseException:
        if written:
            shutil.rmtree(written[0], ignore_errors=True)
        raise
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        # a step saved twice (after a restart), or a corrupt entry of its name skipped at the
        # resume (a file, a link, a folder): replace it
        if os.path.islink(final) or os.path.isfile(final):
            os.unlink(final)
        elif os.path.lexists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Folders of later steps are not this run's (a resume would have started from one that
    # verified): left alone, and not counted, so they cannot crowd out the one just written.
    for old in [done for done in list_checkpoints(directory) if done <= step][:-keep]:
        shutil.rmtree(os.path.join(directory, f"step-{old}"), ignore_errors=True)
    return final


def remove_temporaries(directory: str) -> list[str]:
    """Removes the temporary folders of checkpoint writes that were cut short (kill -9,
    power loss); returns their paths. Call it holding the folder's lock: then no other job
    is writing one."""
    removed = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(TEMPORARY_PREFIX) and ".tmp-" in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            removed.append(os.path.join(directory, name))
    return removed


class FolderLock:
    """One job per checkpoint folder: an exclusive ``flock`` on ``DIR/.distnn-lock``, held
    for the whole run by rank 0, with the holder's host and process id written in the file.

    The kernel releases it when the process ends, even by kill -9. Some network file systems
    do not honour flock: there the lock guards nothing.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK)
        self._file = open(self.path, "a+", encoding="utf-8")  # held for the run
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.readline(200).strip() or "unknown"  # (what distnn wrote)
            self._file.close()
            raise UsageError(f"--checkpoint-dir: {directory!r} is in use by another job "
                             f"({holder}); allowed: one job per checkpoint folder: wait for "
                             "it, stop it, or use another --checkpoint-dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        """Releases the lock (safe to call more than once)."""
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def list_checkpoints(directory: str) -> list[int]:
    """The steps of the ``step-N`` folders in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    steps = [int(m.group(1)) for name in os.listdir(directory) if (m := STEP_DIR.match(name))]
    return sorted(steps)


def read_checkpoint(path: str) -> Checkpoint:
    """Reads and verifies one checkpoint folder ``.../step-N``; raises ValueError saying
    what is wrong."""
    try:
        with open(os.path.join(path, STATE), encoding="utf-8") as file:
            state = json.load(file)
        check_state(state, path)
        sharded = state.get("format") == "sharded"
        if sharded and "shards/.metadata" not in state["sha256"]:
            raise ValueError("its shards' index is not listed in state.json")
        for name in sorted({LOSSES, *state["sha256"], *([] if sharded else [WEIGHTS])}):
            if sha256_of(os.path.join(path, name)) != state["sha256"][name]:
                raise ValueError(f"{name} does not match its checksum")
        weights = {} if sharded else load_file(os.path.join(path, WEIGHTS))
        losses = load_file(os.path.join(path, LOSSES))["loss"]
        optimizer = (load_file(os.path.join(path, OPTIMIZER))
                     if OPTIMIZER in state["sha256"] else None)
    except (OSError, KeyError, TypeError, RecursionError, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable ({type(error).__name__}: {error})") from None
    step = state["step"]
    if losses.dim() != 1 or not losses.is_floating_point() or losses.numel() > step:
        raise ValueError(f"holds losses of shape {list(losses.shape)} and dtype "
                         f"{str(losses.dtype).removeprefix('torch.')} for {step} steps")
    return Checkpoint(path=path, step=step, weights=weights, losses=losses, state=state,
                      optimizer=optimizer)


def check_state(state: Any, path: str) -> None:
    """Raises ValueError unless ``state`` is a state.json that distnn could have written in
    ``path``: its entries of their types, its step the folder's, and the files it lists
    regular files inside the folder (a name such as ``../x`` or ``/dev/zero`` would have
    the checksums read any file, or one that never ends)."""
    if not isinstance(state, dict):
        raise ValueError(f"state.json holds a {type(state).__name__}, not an object")
    for key, kind in STATE_TYPES.items():
        value = state.get(key)
        if key in state and (not isinstance(value, kind)
                             or (isinstance(value, bool) and kind is not bool)):
            raise ValueError(f"state.json's {key!r} is {json.dumps(value)[:40]}")
    if not all(isinstance(record, dict) for record in state.get("val", [])):
        raise ValueError("state.json's 'val' holds other things than validation records")
    named = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if "step" not in state or state["step"] < 0 or (
            named and state["step"] != int(named.group(1))):
        raise ValueError(f"state.json's step {state.get('step')} is not the folder's")
    for name, digest in state.get("sha256", {}).items():
        inside = os.path.normpath(name)
        if (not isinstance(digest, str) or os.path.isabs(name) or inside != name
                or inside.split(os.sep)[0] == os.pardir):
            raise ValueError(f"state.json lists {json.dumps(name)[:60]}, not a file of the "
                             "checkpoint")
        file = os.path.join(path, name)  # (a link to a regular file is read through)
        if os.path.exists(file) and not os.path.isfile(file):
            raise ValueError(f"{name} is not a regular file")


def latest_checkpoint(directory: str) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint in ``directory`` that verifies, and one notice per one skipped."""
    notices = []
    for step in reversed(list_checkpoints(directory)):
        path = os.path.join(directory, f"step-{step}")
        try:
            return read_checkpoint(path), notices
        except ValueError as error:
            notices.append(f"checkpoint {path} is corrupt or partial ({error}); skipping it")
    return None, notices


def changed_settings(checkpoint: Checkpoint, config: dict[str, Any],
                     names: list[str]) -> list[str]:
    """The settings of ``names`` that this run changes from the checkpoint's run, as text.
    (Settings that may change at a resume, a schedule by hand say, though the result is
    then neither run's.)"""
    saved = checkpoint.state.get("config", {})
    return [f"{flag_name(name)} {flag_text(saved[name])} (now {flag_text(config[name])})"
            for name in names if name in saved and saved[name] != config.get(name)]


def _shown(saved: Any, now: Any) -> str:
    """``saved (now now)`` as flags read, or as JSON where that reads the same (a state.json
    edited to hold "10" for 10, say)."""
    if flag_text(saved) == flag_text(now):
        return f"{json.dumps(saved)} (now {json.dumps(now)})"
    return f"{flag_text(saved)} (now {flag_text(now)})"


def check_compatible(checkpoint: Checkpoint, config: dict[str, Any]) -> None:
    """Raises UsageError when the checkpoint was made for other shapes, batch or data."""
    saved = checkpoint.state.get("config", {})
    now = json.loads(json.dumps(config))  # tuples become lists, as in state.json
    differ = [f"{flag_name(name)} {_shown(saved.get(name), now[name])}"
              for name in MUST_MATCH if name in now and saved.get(name) != now[name]]
    if differ:
        raise UsageError(f"--checkpoint-dir: {checkpoint.path} was made with "
                         f"{', '.join(differ)}; allowed: resume with the same model, batch "
                         "order, loss and optimizer, or use another --checkpoint-dir")
