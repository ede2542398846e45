"""Reading sample and reference batches (``.npz`` files) without loading them whole.

A batch file holds ``arr_0``: uint8 images [N x H x W x 3] in [0, 255] (what
``scripts/image_sample.py`` writes), and, in OpenAI's reference batches,
precomputed statistics ``mu``, ``sigma`` (pool features) and ``mu_s``,
``sigma_s`` (spatial features) over the whole dataset.

An ``.npz`` is a zip archive of ``.npy`` files. ``open_npz_array`` reads the
``.npy`` header of one member and then streams its data in batches, so a
50000-image 512x512 batch (39 GB) never has to fit in memory. Members that
cannot be streamed (Fortran order, object dtype, unknown header versions) are
loaded whole instead.
"""

import zipfile
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import numpy as np

from .metrics import FIDStatistics

__all__ = [
    "NpzArrayReader",
    "StreamingNpzArrayReader",
    "MemoryNpzArrayReader",
    "BatchIterator",
    "open_npz_array",
    "read_precomputed_statistics",
]

STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class BatchIterator:
    """An iterable with a length, so that progress bars know the number of batches."""

    def __init__(self, gen_fn, length: int):
        self.gen_fn = gen_fn
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return self.gen_fn()


class NpzArrayReader:
    """Reads the rows of one array in consecutive batches."""

    def read_batch(self, batch_size: int) -> Optional[np.ndarray]:
        """The next ``batch_size`` rows (fewer at the end), or None when exhausted."""
        raise NotImplementedError

    def remaining(self) -> int:
        """Number of rows not read yet."""
        raise NotImplementedError

    def read_batches(self, batch_size: int) -> BatchIterator:
        """Iterate over the remaining rows in batches of ``batch_size``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of rows, got {batch_size}.")

        def batches() -> Iterator[np.ndarray]:
            while True:
                batch = self.read_batch(batch_size)
                if batch is None:
                    return
                yield batch

        return BatchIterator(batches, -(-self.remaining() // batch_size))


class StreamingNpzArrayReader(NpzArrayReader):
    """Reads rows straight from the open ``.npy`` stream (positioned after the header)."""

    def __init__(self, arr_f, shape: Tuple[int, ...], dtype: np.dtype):
        if len(shape) == 0:
            raise ValueError("cannot read a 0-d array in batches of rows.")
        self.arr_f = arr_f
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.idx = 0

    def read_batch(self, batch_size: int) -> Optional[np.ndarray]:
        if self.idx >= self.shape[0]:
            return None
        rows = min(batch_size, self.shape[0] - self.idx)
        self.idx += rows
        row_shape = self.shape[1:]
        if self.dtype.itemsize == 0:
            return np.zeros([rows, *row_shape], dtype=self.dtype)
        size = rows * int(np.prod(row_shape)) * self.dtype.itemsize
        data = _read_exactly(self.arr_f, size)
        return np.frombuffer(data, dtype=self.dtype).reshape([rows, *row_shape])

    def remaining(self) -> int:
        return max(0, self.shape[0] - self.idx)


class MemoryNpzArrayReader(NpzArrayReader):
    """Serves batches from an array already in memory."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.idx = 0

    @classmethod
    def load(cls, path: str, arr_name: str) -> "MemoryNpzArrayReader":
        with np.load(path) as data:
            return cls(data[arr_name])

    def read_batch(self, batch_size: int) -> Optional[np.ndarray]:
        if self.idx >= self.arr.shape[0]:
            return None
        batch = self.arr[self.idx : self.idx + batch_size]
        self.idx += batch_size
        return batch

    def remaining(self) -> int:
        return max(0, self.arr.shape[0] - self.idx)


def _read_exactly(stream, size: int) -> bytes:
    """Read ``size`` bytes (zip streams may return fewer per call)."""
    chunks, got = [], 0
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            raise ValueError(
                f"the .npz member ended early: expected {size} more bytes of array data, "
                f"got {got}. The file is truncated; download or write it again."
            )
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@contextmanager
def _open_npy_member(path: str, arr_name: str):
    member = f"{arr_name}.npy"
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f, "r") as zip_f:
            names = zip_f.namelist()
            if member not in names:
                found = ", ".join(n[:-4] if n.endswith(".npy") else n for n in names)
                raise ValueError(
                    f"missing {arr_name} in npz file {path} (it holds: {found or 'nothing'}). "
                    "Sample batches must store images as arr_0 (uint8, N x H x W x 3), "
                    "as scripts/image_sample.py writes them."
                )
            with zip_f.open(member, "r") as arr_f:
                yield arr_f
    except FileNotFoundError:
        raise FileNotFoundError(
            f"batch file not found: {path}. Pass the path of an .npz file "
            "(see docs/evaluation.md for the reference batches)."
        ) from None
    except zipfile.BadZipFile:
        raise ValueError(
            f"{path} is not an .npz (zip) file. Save batches with numpy.savez "
            "(arr_0 = uint8 images N x H x W x 3)."
        ) from None


@contextmanager
def open_npz_array(path: str, arr_name: str):
    """Context manager yielding an ``NpzArrayReader`` over member ``arr_name`` of ``path``."""
    with _open_npy_member(path, arr_name) as arr_f:
        version = np.lib.format.read_magic(arr_f)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(arr_f)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(arr_f)
        else:
            yield MemoryNpzArrayReader.load(path, arr_name)
            return
        shape, fortran_order, dtype = header
        if fortran_order or dtype.hasobject or len(shape) == 0:
            yield MemoryNpzArrayReader.load(path, arr_name)
        else:
            yield StreamingNpzArrayReader(arr_f, shape, dtype)


def read_precomputed_statistics(path: str) -> Optional[Tuple[FIDStatistics, FIDStatistics]]:
    """``(pool, spatial)`` statistics stored in a reference batch, or None if it has none.

    A file with ``mu`` must also hold ``sigma``, ``mu_s`` and ``sigma_s``.
    """
    with np.load(path) as data:
        keys = set(data.keys())
        if "mu" not in keys:
            return None
        missing = [k for k in STATISTICS_KEYS if k not in keys]
        if missing:
            raise ValueError(
                f"{path} has precomputed statistics 'mu' but lacks {missing}: a reference "
                f"batch needs all of {list(STATISTICS_KEYS)}, or none of them (then they "
                "are computed from arr_0)."
            )
        return (
            FIDStatistics(data["mu"], data["sigma"]),
            FIDStatistics(data["mu_s"], data["sigma_s"]),
        )
