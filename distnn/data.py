"""The training data and how it is split across ranks.

Either the reference program's random batch (the default) or ``x`` and ``y`` tensors from a
file (``--data``): ``.safetensors``, ``.npz`` or ``.pt``. From a file each rank reads only
its own rows: safetensors slices, uncompressed npz members read from the row offset on
(compressed ones are streamed up to it, in bounded memory), ``.pt`` memory-mapped. Every
problem with a file is a UsageError naming it.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from distnn.config import TrainConfig, UsageError
from distnn.model import build_model

FORMATS = (".safetensors", ".npz", ".pt")
_SAFETENSORS_FLOATS = {"F16", "BF16", "F32", "F64"}


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows [start, stop) of a batch of ``total`` rows that ``rank`` owns.

    Shards are contiguous, in rank order, and their sizes differ by at most one (the first
    ``total % world_size`` ranks hold one row more). A shard may be empty when
    ``total < world_size``; with a sum loss an empty shard simply contributes zero gradient.
    """
    if world_size < 1 or not 0 <= rank < world_size or total < 0:
        raise ValueError(f"shard_bounds: total={total}, world_size={world_size}, rank={rank}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def reference_setup(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, nn.Sequential]:
    """The reference program's batch and initial model, drawn on the CPU in its order.

    ``torch.manual_seed(seed)``, then ``x = randn(N, D_in)``, ``y = randn(N, D_out)``, then the
    model. Every rank calls this, so every rank starts from the same data and weights.
    """
    torch.manual_seed(config.seed)
    x = torch.randn(config.batch_size, config.d_in)
    y = torch.randn(config.batch_size, config.d_out)
    return x, y, build_model(config.d_in, config.hidden, config.d_out)


def seeded_model(config: TrainConfig) -> nn.Sequential:
    """The initial model when the data comes from a file: ``torch.manual_seed(seed)``, then
    the model, so the weights do not depend on the data."""
    torch.manual_seed(config.seed)
    return build_model(config.d_in, config.hidden, config.d_out)


@dataclass(frozen=True)
class DataShape:
    """What a data file holds: ``rows`` samples of ``d_in`` inputs and ``d_out`` targets."""

    rows: int
    d_in: int
    d_out: int


def _fail(path: str, problem: str, allowed: str) -> UsageError:
    return UsageError(f"--data: {path!r} {problem}; allowed: {allowed}")


class _Reader:
    """Reads headers and row ranges of one named 2-D (or 1-D) array in one file format."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.suffix = os.path.splitext(path)[1]

    def header(self, name: str) -> tuple[tuple[int, ...], bool]:
        """(shape, is floating point) without reading the data."""
        if self.suffix == ".safetensors":
            with safe_open(self.path, "pt") as file:
                if name not in file.keys():
                    raise KeyError(name)
                view = file.get_slice(name)
                return tuple(view.get_shape()), view.get_dtype() in _SAFETENSORS_FLOATS
        if self.suffix == ".npz":
            with _open_npy(self.path, name) as member:
                shape, _, dtype = _npy_header(member)
                return shape, np.issubdtype(dtype, np.floating)
        tensor = self._pt()[name]
        return tuple(tensor.shape), tensor.is_floating_point()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a float32 CPU tensor."""
        if self.suffix == ".safetensors":
            with safe_open(self.path, "pt") as file:
                return file.get_slice(name)[start:stop].float()
        if self.suffix == ".npz":
            with _open_npy(self.path, name) as member:
                shape, fortran_order, dtype = _npy_header(member)
                if fortran_order:  # column-major: the rows are not contiguous, read it all
                    count = int(np.prod(shape, dtype=np.int64))
                    whole = np.frombuffer(member.read(count * dtype.itemsize), dtype=dtype,
                                          count=count).reshape(shape, order="F")
                    return torch.from_numpy(np.array(whole[start:stop], order="C")).float()
                row_items = int(np.prod(shape[1:], dtype=np.int64))
                member.seek(member.tell() + start * row_items * dtype.itemsize)
                count = (stop - start) * row_items
                flat = np.frombuffer(member.read(count * dtype.itemsize), dtype=dtype, count=count)
                return torch.from_numpy(flat.reshape((stop - start, *shape[1:])).copy()).float()
        return self._pt()[name][start:stop].float()

    def _pt(self) -> dict:
        if not hasattr(self, "_pt_tensors"):
            try:  # memory-mapped: slicing touches only the shard's pages
                loaded = torch.load(self.path, weights_only=True, mmap=True)
            except RuntimeError:  # files in the legacy (non-zip) format cannot be mapped
                loaded = torch.load(self.path, weights_only=True)
            if not isinstance(loaded, dict):
                raise KeyError("x")
            self._pt_tensors = loaded
        return self._pt_tensors


@contextmanager
def _open_npy(path: str, name: str) -> Iterator[IO[bytes]]:
    """The ``name.npy`` member of an .npz file, as a file object at the member's first byte.

    A stored (uncompressed) member is read straight from the archive file, so seeking to a
    shard's rows reads nothing before them; a compressed one is decompressed as a stream.
    """
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(f"{name}.npy")
        except KeyError:
            raise KeyError(name) from None
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                yield member
            return
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local_header = raw.read(30)  # the zip local file header: fixed part
        name_length, extra_length = struct.unpack("<HH", local_header[26:30])
        raw.seek(info.header_offset + 30 + name_length + extra_length)
        yield raw


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``member``, left at the data's start."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(member)
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version}")
    return readers[version](member)


def inspect_data(path: str) -> DataShape:
    """Checks a data file's format, names, shapes and dtypes from its headers alone."""
    if not os.path.isfile(path):
        raise _fail(path, "does not exist", "an existing file")
    if os.path.splitext(path)[1] not in FORMATS:
        raise _fail(path, "has an unknown format", ", ".join(FORMATS) + " files")
    reader = _Reader(path)
    shapes = {}
    for name in ("x", "y"):
        try:
            shape, floating = reader.header(name)
        except KeyError:
            raise _fail(path, f"has no tensor named {name!r}",
                        "a file holding tensors named 'x' and 'y'") from None
        except Exception as error:  # a damaged file: say what the reader said, briefly
            said = (str(error).strip().splitlines() or [""])[0]
            raise _fail(path, f"cannot be read ({type(error).__name__}: {said})",
                        "a valid " + reader.suffix + " file without pickled objects") from None
        if not floating:
            raise _fail(path, f"holds {name} as a non-floating-point dtype",
                        "float16, bfloat16, float32 or float64 data")
        shapes[name] = shape
    x_shape, y_shape = shapes["x"], shapes["y"]
    if len(x_shape) != 2 or len(y_shape) not in (1, 2):
        raise _fail(path, f"holds x of shape {list(x_shape)} and y of shape {list(y_shape)}",
                    "x of shape [N, D_in] and y of shape [N, D_out] or [N]")
    if x_shape[0] != y_shape[0] or x_shape[0] < 1 or x_shape[1] < 1:
        raise _fail(path, f"holds {x_shape[0]} rows of x and {y_shape[0]} of y",
                    "the same number of rows, at least one, in x and y")
    return DataShape(rows=x_shape[0], d_in=x_shape[1], d_out=y_shape[1] if len(y_shape) == 2 else 1)


def load_shard(path: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows [start, stop) of x and y as float32 CPU tensors; checks they are finite."""
    reader = _Reader(path)
    x, y = reader.rows("x", start, stop), reader.rows("y", start, stop)
    if y.dim() == 1:  # a 1-D target is one output per row
        y = y.unsqueeze(1)
    for name, tensor in (("x", x), ("y", y)):
        if not torch.isfinite(tensor).all():
            raise _fail(path, f"holds a non-finite value in {name}, rows [{start}, {stop})",
                        "finite values")
    return x, y


def config_for_data(config: TrainConfig, shape: DataShape) -> TrainConfig:
    """The config with the batch and the model's input/output sizes taken from the data.

    Raises UsageError when a size given on the command line contradicts the file.
    """
    defaults = TrainConfig()
    for name, value in (("batch_size", shape.rows), ("d_in", shape.d_in), ("d_out", shape.d_out)):
        given = getattr(config, name)
        if given != getattr(defaults, name) and given != value:
            raise UsageError(f"--{name.replace('_', '-')}: got {given} but --data "
                             f"{config.data!r} gives {value}; allowed: leave it out with --data")
    return dataclasses.replace(config, batch_size=shape.rows, d_in=shape.d_in, d_out=shape.d_out)
