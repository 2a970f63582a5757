"""Data files (``--data``, ``--val-data``): their headers, and any rows read on demand.

A file holds ``x`` [N, ...] and ``y`` [N, ...], rows of any shape: floating-point inputs
(features [N, D_in], images [N, C, H, W]) or integer ones (token ids [N, T]); floating-point
targets (a regression), or integer class labels (one a row [N], or one a position [N, T]).
Formats: ``.safetensors``, ``.npz`` and ``.pt``.
A rank reads only the rows it asks for, never the whole file: in a ``.safetensors`` file and
an uncompressed ``.npz`` every row lies at a known offset, and runs of consecutive rows are
read with one ``pread`` each; a ``.pt`` file is memory-mapped and indexed. A compressed or
column-major ``.npz`` cannot be read by row, so it is read whole, once, with a notice.
Nothing is unpickled. Every problem with a file is a UsageError naming it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import warnings
import weakref
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from distnn.data.shards import shard_bounds
from distnn.errors import UsageError

log = logging.getLogger("distnn")

FORMATS = (".safetensors", ".npz", ".pt")
# rows read at a time when a file is checked: a small peak of memory, and larger chunks
# are no faster (docs/benchmarks.md#data-files-distnn-against-ddp--distributedsampler)
SCAN_BYTES = 4 * 2**20
_SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool,
}
# what rows may hold: numbers a float32 or an int64 can take (uint16 token ids, as nanoGPT
# stores them, included)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
            torch.uint32, torch.uint64)
# the unsigned ones torch's CPU kernels take few operations of (no aminmax): widened first
_NARROW_KERNELS = (torch.uint16, torch.uint32, torch.uint64)


@dataclass(frozen=True)
class Column:
    """Where one named array lies: its shape and dtype, and how to reach its rows.

    ``offset`` is the byte offset of row 0 in the file when the rows can be read in place
    (C order, uncompressed); else ``tensor`` holds the array (``mapped``: its pages are the
    file's, read as it is indexed), or neither is set: the array must be read whole (a
    compressed or column-major .npz member).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None = None
    tensor: torch.Tensor | None = None
    mapped: bool = False

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def _fail(flag: str, path: str, problem: str, allowed: str) -> UsageError:
    return UsageError(f"{flag}: {path!r} {problem}; allowed: {allowed}")


class DataFile:
    """One data file's ``x`` and ``y``, checked from the headers; rows read by index.

    ``labels`` is True when y holds integer class labels. Raises UsageError for a missing,
    unreadable or malformed file. ``flag`` names the option in messages.
    """

    def __init__(self, path: str, *, flag: str = "--data") -> None:
        self.path, self.flag = path, flag
        if not os.path.exists(path):
            raise self.fail("does not exist", "an existing file")
        if not os.path.isfile(path):
            raise self.fail("is a directory" if os.path.isdir(path) else "is not a regular file "
                            "(a device or a pipe)", "a data file")
        suffix = os.path.splitext(path)[1]
        if suffix not in FORMATS:
            raise self.fail("has an unknown format", ", ".join(FORMATS) + " files")
        try:
            columns = {".safetensors": _safetensors_columns, ".npz": _npz_columns,
                       ".pt": _pt_columns}[suffix](path)
        except Exception as error:  # a damaged file: say what the reader said, briefly
            said = (str(error).strip().splitlines() or [""])[0]
            raise self.fail(f"cannot be read ({type(error).__name__}: {said})",
                            f"a valid {suffix} file without pickled objects") from None
        for name in ("x", "y"):
            if name not in columns:
                raise self.fail(f"has no tensor named {name!r}",
                                "a file holding tensors named 'x' and 'y'")
        self.x, self.y = columns["x"], columns["y"]
        for name, column in (("x", self.x), ("y", self.y)):
            if column.dtype not in FLOATS + INTEGERS or not column.shape:
                raise self.fail(f"holds {name} of shape {list(column.shape)} and dtype "
                                f"{str(column.dtype).removeprefix('torch.')}",
                                "rows [N, ...] of numbers (float16, bfloat16, float32 or "
                                "float64; integers of 8 to 64 bits)")
            tensor = column.tensor
            if tensor is not None and (tensor.layout != torch.strided or tensor.is_meta):
                kind = ("a tensor without values (on the meta device)" if tensor.is_meta
                        else f"a {str(tensor.layout).removeprefix('torch.')} tensor")
                raise self.fail(f"holds {name} as {kind}",
                                "dense tensors with their values (torch.save of plain tensors)")
        self.labels = not self.y.dtype.is_floating_point
        if self.x.shape[0] != self.y.shape[0] or self.x.shape[0] < 1:
            raise self.fail(f"holds {self.x.shape[0]} rows of x and {self.y.shape[0]} of y",
                            "the same number of rows, at least one, in x and y")
        if 0 in self.x.shape[1:] or 0 in self.y.shape[1:]:
            raise self.fail(f"holds x of shape {list(self.x.shape)} and y of shape "
                            f"{list(self.y.shape)}", "at least one value in each row")
        self._whole: dict[str, torch.Tensor] = {}  # arrays that had to be read whole
        self.largest_label: int | None = None  # check_labels', once it has read y
        self.ignored_labels = 0  # labels equal to check_labels' ignore_index
        # Rows are read from the file opened now: one deleted or replaced (renamed over)
        # during the run is still read as it was.
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self._size = os.fstat(self._fd).st_size

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def d_in(self) -> int:
        """The width of a row of x: its first dimension after the rows' (the features
        D_in, the context T of token ids [N, T]); 1 for x [N]."""
        return self.x.shape[1] if len(self.x.shape) > 1 else 1

    @property
    def d_out(self) -> int:
        """Output features of a regression target (1 for y [N]); 0 for class labels."""
        if self.labels:
            return 0
        return self.y.shape[1] if len(self.y.shape) > 1 else 1

    @property
    def features(self) -> bool:
        """Whether x is floating-point features, one vector a row ([N, D_in]): what the
        flags' own MLP takes."""
        return self.x.dtype.is_floating_point and len(self.x.shape) == 2

    def fail(self, problem: str, allowed: str) -> UsageError:
        return _fail(self.flag, self.path, problem, allowed)

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` (any order) as CPU tensors: x float32, or int64 for integer x
        (token ids), of the file's row shape; y as :meth:`read_targets`."""
        x = self._column_rows(self.x, indices)
        x = x.float() if x.is_floating_point() else x.long()
        return x, self.read_targets(indices)

    def read_targets(self, indices: torch.Tensor) -> torch.Tensor:
        """The targets of rows ``indices`` alone: int64 class labels of the file's row shape,
        or float32 (a 1-D regression target [N] becomes one column, [n, 1])."""
        y = self._column_rows(self.y, indices)
        if self.labels:
            return y.long()
        y = y.float()
        return y.unsqueeze(1) if y.dim() == 1 else y

    def read_range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, stop), as :meth:`read`."""
        return self.read(torch.arange(start, stop))

    def check_rows(self, start: int, stop: int) -> None:
        """Checks rows [start, stop) in bounded memory: x, and float targets, finite.

        Raises UsageError naming the first bad rows. Class labels: :meth:`check_labels`.
        """
        chunk = max(1, SCAN_BYTES // (self.x.row_bytes + self.y.row_bytes))
        for first in range(start, stop, chunk):
            last = min(stop, first + chunk)
            for name, column in (("x", self.x), ("y", self.y)):
                values = self._column_rows(column, torch.arange(first, last))
                if values.is_floating_point() and not torch.isfinite(values).all():
                    raise self.fail(f"holds a non-finite value in {name}, rows [{first}, {last})",
                                    "finite values")
                del values  # one chunk alive at a time

    def check_share(self, world_size: int, rank: int) -> None:
        """:meth:`check_rows` over ``rank``'s contiguous share of the rows (every rank
        checks its own, so together they check the whole file once)."""
        self.check_rows(*shard_bounds(self.rows, world_size, rank))

    def check_labels(self, ignore_index: int = -100) -> int:
        """Reads all of y (class labels), in bounded memory; returns the largest label,
        leaving out those equal to ``ignore_index`` (counted in :attr:`ignored_labels`).

        Raises UsageError for another negative label. The result is kept
        (:attr:`largest_label`): later calls return it."""
        if self.largest_label is not None:
            return self.largest_label
        largest, ignored = -1, 0
        chunk = max(1, SCAN_BYTES // self.y.row_bytes)
        for first in range(0, self.rows, chunk):
            last = min(self.rows, first + chunk)
            labels = self._column_rows(self.y, torch.arange(first, last))
            # the range first, in the file's dtype: it settles a chunk with no label to leave
            # out, with no int64 copy or mask (over 1 GiB of uint8 labels those took 87 s
            # on this project's CPU, docs/benchmarks.md#a-1-gib-token-file-memory-per-rank)
            if labels.dtype in _NARROW_KERNELS:
                labels = labels.long()
            low, high = (int(value) for value in torch.aminmax(labels))
            if low <= ignore_index <= high:
                wide = labels.long()
                left_out = wide == ignore_index
                ignored += int(left_out.sum())
                counted = wide[~left_out]
                if not counted.numel():
                    continue
                low, high = (int(value) for value in torch.aminmax(counted))
            if low < 0:
                raise self.fail(f"holds the negative class label {low} in y, rows "
                                f"[{first}, {last})", "class labels 0, 1, 2, ..., or the "
                                f"ignored label {ignore_index} (--ignore-index)")
            largest = max(largest, high)
        self.largest_label, self.ignored_labels = largest, ignored
        return largest

    def _column_rows(self, column: Column, indices: torch.Tensor) -> torch.Tensor:
        if column.offset is not None:
            return _pread_rows(self._fd, self, column, indices.numpy())
        if column.tensor is not None:
            if column.mapped:
                # A mapped page beyond the end of a file cut short kills the process (SIGBUS)
                # when touched: look at the file's size first.
                size = os.fstat(self._fd).st_size
                if size < self._size:
                    raise self.fail(f"ended early (cut to {size} of its {self._size} bytes "
                                    "during the run)", "a complete file")
            return column.tensor[indices]
        name = "x" if column is self.x else "y"
        if name not in self._whole:
            if not self._whole:
                log.warning(f"{self.flag}: {self.path!r} is a compressed or column-major .npz, "
                            "which cannot be read by row: every rank reads it whole into "
                            "memory; save it with numpy.savez (C order) to read only the rows "
                            "each rank needs")
            self._whole[name] = _npz_whole(self._fd, name)
        return self._whole[name][indices]


def _pread_rows(fd: int, file: DataFile, column: Column, indices: np.ndarray) -> torch.Tensor:
    """Rows ``indices`` of an array stored row after row from ``column.offset`` of ``file``,
    open as ``fd``: one pread per run of consecutive rows, in file order, put back in the
    order asked for."""
    count, row_bytes = len(indices), column.row_bytes
    if count == 0:
        return torch.empty((0, *column.shape[1:]), dtype=column.dtype)
    in_order = bool((np.diff(indices) > 0).all())
    order = None if in_order else np.argsort(indices, kind="stable")
    ordered = indices if in_order else indices[order]
    buffer = np.empty((count, row_bytes), dtype=np.uint8)
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, count]
    for first, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        want = (stop - first) * row_bytes
        got = os.preadv(fd, [buffer[first:stop]], column.offset + int(ordered[first]) * row_bytes)
        if got != want:
            raise file.fail(f"ended early (read {got} of {want} bytes at row "
                            f"{int(ordered[first])})", "a complete file")
    if in_order:
        rows = buffer
    else:
        rows = np.empty_like(buffer)
        rows[order] = buffer
    tensor = torch.from_numpy(rows).view(column.dtype)
    return tensor.reshape(count, *column.shape[1:])


def _safetensors_columns(path: str) -> dict[str, Column]:
    """The header of a .safetensors file: an 8-byte length, then JSON with each tensor's
    dtype, shape and byte range (relative to the end of the header)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > os.path.getsize(path):
            raise ValueError("the header length is larger than the file")
        header = json.loads(file.read(length))
    columns = {}
    for name in ("x", "y"):
        if name not in header:
            continue
        entry = header[name]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"unsupported dtype {entry['dtype']} of {name}")
        columns[name] = Column(shape=tuple(entry["shape"]),
                               dtype=_SAFETENSORS_DTYPES[entry["dtype"]],
                               offset=8 + length + entry["data_offsets"][0])
    return columns


def _npz_columns(path: str) -> dict[str, Column]:
    """Each ``name.npy`` member of an .npz file, from its header: read in place when stored
    uncompressed in C order, else read whole when first needed."""
    columns = {}
    with zipfile.ZipFile(path) as archive:
        for name in ("x", "y"):
            try:
                info = archive.getinfo(f"{name}.npy")
            except KeyError:
                continue
            with archive.open(info) as member:
                shape, fortran_order, dtype = _npy_header(member)
                if dtype.hasobject:
                    raise ValueError(f"{name} holds Python objects")
                torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
                if info.compress_type == zipfile.ZIP_STORED and not fortran_order:
                    header_bytes = member.tell()
                    columns[name] = Column(shape=shape, dtype=torch_dtype,
                                           offset=_member_data_offset(path, info) + header_bytes)
                    continue
                columns[name] = Column(shape=shape, dtype=torch_dtype)  # read when needed
    return columns


def _npz_whole(fd: int, name: str) -> torch.Tensor:
    """The ``name.npy`` member of the .npz file open as ``fd``, read whole (C order). (A
    duplicate descriptor shares the file's offset, which the reads by row never use.)"""
    with (os.fdopen(os.dup(fd), "rb") as file, zipfile.ZipFile(file) as archive,
          archive.open(f"{name}.npy") as member):
        shape, fortran_order, dtype = _npy_header(member)
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(member.read(count * dtype.itemsize), dtype=dtype,
                              count=count).reshape(shape, order="F" if fortran_order else "C")
        return torch.from_numpy(np.array(array, order="C"))


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes begin: after its local header, name and extra."""
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local_header = raw.read(30)
        name_length, extra_length = struct.unpack("<HH", local_header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``member``, left at the data's start."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(member)
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version}")
    return readers[version](member)


def _pt_columns(path: str) -> dict[str, Column]:
    """A ``torch.save``d dict, memory-mapped (pages are read as rows are indexed)."""
    with warnings.catch_warnings():  # torch's own about odd tensors (sparse, quantized):
        warnings.simplefilter("ignore")  # what is wrong with them is said in one line
        try:
            loaded, mapped = torch.load(path, weights_only=True, mmap=True), True
        except RuntimeError:  # files in the legacy (non-zip) format cannot be mapped
            loaded, mapped = torch.load(path, weights_only=True), False
    if not isinstance(loaded, dict):
        raise ValueError(f"holds a {type(loaded).__name__}, not a dict of tensors")
    return {name: Column(shape=tuple(tensor.shape), dtype=tensor.dtype, tensor=tensor,
                         mapped=mapped)
            for name, tensor in loaded.items()
            if name in ("x", "y") and isinstance(tensor, torch.Tensor)}
