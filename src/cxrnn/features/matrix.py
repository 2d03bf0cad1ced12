"""A dataset's feature maps as one on-disk ``.npy`` matrix, read in batches so RAM stays bounded.

The per-image store (``cxrnn.features.store``) is what extraction writes and resumes from; training wants one
(N, C, H, W) array. Stacking 20,000 VGG19 maps in RAM takes 2 GB in fp32 (4 GB for InceptionV3), so the
array is assembled once on disk per (store, ordered list of images) and handed out as a read-only
``np.memmap`` (any code that indexes it keeps working). Training reads its batches with explicit file
reads (:func:`take_rows`) instead of touching the mapping: pages touched through a mapping count in the
process's resident set until unmapped, file reads leave them in the kernel's page cache only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from cxrnn.utils.atomic import atomic_write
from cxrnn.utils.hashing import sequence_digest

RowSource = Callable[[int], np.ndarray]


def matrix_key(digests: Sequence[str]) -> str:
    """Identity of an ordered list of images (their content digests)."""
    return sequence_digest(digests)[:24]


def write_matrix(path: Path, n_rows: int, row_shape: tuple[int, ...], dtype: str, rows: Iterable[np.ndarray]) -> Path:
    """Write rows one by one (never the whole matrix in RAM) through the atomic-write helper."""

    def write(fh) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": (n_rows, *row_shape)}
        np.lib.format.write_array_header_1_0(fh, header)
        written = 0
        for row in rows:
            row = np.ascontiguousarray(row, dtype=dtype)
            if row.shape != tuple(row_shape):
                raise ValueError(f"feature row {written} has shape {row.shape}, expected {tuple(row_shape)}")
            fh.write(row.tobytes())
            written += 1
        if written != n_rows:
            raise ValueError(f"wrote {written} feature rows, expected {n_rows}")

    return atomic_write(path, write)


def open_matrix(path: str | Path) -> np.memmap:
    return np.load(path, mmap_mode="r")


def take_rows(matrix: np.ndarray, index: Sequence[int] | np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows ``matrix[index]`` as a new in-RAM array of ``dtype``.

    For a file-backed memmap the rows are read with ``readinto`` (in file order, then put back in the
    requested order), so reading a whole epoch does not grow the resident set; anything else is indexed.
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    filename = getattr(matrix, "filename", None)
    if not isinstance(matrix, np.memmap) or filename is None or not matrix.flags.c_contiguous:
        return np.asarray(matrix[index], dtype=dtype)
    n = matrix.shape[0]
    if len(index) and (index.min() < -n or index.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    index = np.where(index < 0, index + n, index)
    row_shape = matrix.shape[1:]
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * matrix.dtype.itemsize
    raw = np.empty((len(index), *row_shape), dtype=matrix.dtype)
    order = np.argsort(index, kind="stable")
    base = matrix.offset + _view_offset(matrix)
    with open(filename, "rb", buffering=0) as fh:
        flat = raw.reshape(len(index), -1).view(np.uint8)
        for slot in order:
            fh.seek(base + int(index[slot]) * row_bytes)
            got = fh.readinto(memoryview(flat[slot]))
            if got != row_bytes:
                raise OSError(f"{filename}: short read of feature row {int(index[slot])}")
    return raw.astype(dtype, copy=False)


def _view_offset(matrix: np.memmap) -> int:
    """Byte offset of a memmap view (e.g. ``mm[10:]``) inside its mapping."""
    base = matrix
    while isinstance(getattr(base, "base", None), np.ndarray):
        base = base.base
    try:
        return int(matrix.__array_interface__["data"][0] - base.__array_interface__["data"][0])
    except (AttributeError, TypeError):
        return 0


class FeatureRows:
    """A lazy selection of rows of a feature matrix: ``len``, ``shape``, batch indexing.

    ``rows[batch_positions]`` reads only those rows (positions are 0..len-1 within the selection);
    ``np.asarray(rows)`` materialises everything, for small sets and code that wants a plain array.
    """

    def __init__(self, matrix: np.ndarray, index: Sequence[int] | np.ndarray | None = None):
        self.matrix = matrix
        self.index = np.arange(len(matrix)) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.matrix.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __getitem__(self, positions) -> np.ndarray:
        if isinstance(positions, (int, np.integer)):
            return take_rows(self.matrix, self.index[[int(positions)]])[0]
        return take_rows(self.matrix, self.index[positions])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = take_rows(self.matrix, self.index)
        return out if dtype is None else out.astype(dtype, copy=False)

    def batches(self, batch_size: int) -> Iterable[np.ndarray]:
        for start in range(0, len(self), batch_size):
            yield self[np.arange(start, min(start + batch_size, len(self)))]
