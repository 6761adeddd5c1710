"""Fast writes of one snapshot row into arrays chunked along time.

Every per-snapshot array of the run store is chunked ``(L, *rest)`` with the
full extent on every other axis (L = 1 for the per-matrix arrays, 1024 for the
step and time columns), so writing snapshot ``t`` replaces exactly one chunk
per array. zarr's general ``setitem`` costs about 0.4 ms of Python per call
(selection, codec pipeline, event loop and thread hops), and for L > 1 it
reads the chunk back before rewriting it: ~50 ms per snapshot for a 28-matrix
model with four arrays per matrix, ten times the cost of encoding and writing
the bytes. For arrays whose codecs are the store's own (``bytes``
little-endian + ``zstd``) on a local disk, :class:`RowChunks` encodes the chunk
with the same numcodecs ``Zstd`` that zarr's ``ZstdCodec`` uses and writes it
under the key zarr's chunk key encoding names, through a temporary file and a
rename; for L > 1 it keeps the chunk being filled in memory. The files are
exactly what zarr would write (the tests compare the bytes), so any Zarr v3
reader opens them. Arrays with any other metadata fall back to zarr's own
``setitem``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.storage import LocalStore


def _direct_codec(array: zarr.Array) -> Zstd | None:
    """The zstd codec to encode chunks of ``array`` with, or None if they must go through zarr."""
    meta = array.metadata
    if not isinstance(meta, ArrayV3Metadata) or not isinstance(array.store_path.store, LocalStore):
        return None
    if tuple(array.chunks[1:]) != tuple(array.shape[1:]) or len(meta.codecs) != 2:
        return None
    serializer, compressor = meta.codecs
    if not isinstance(serializer, BytesCodec) or not isinstance(compressor, ZstdCodec):
        return None
    if np.dtype(array.dtype).itemsize > 1 and (serializer.endian is None or serializer.endian.value != "little"):
        return None
    return Zstd(level=compressor.level, checksum=compressor.checksum)


class RowChunks:
    """Writes row ``t`` of one zarr v3 array chunked ``(L, *rest)`` (a whole chunk per write).

    One writer per array: the chunk being filled is cached, so call :meth:`reset`
    after anything else changed the array (a resize that dropped rows).
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self._zstd = _direct_codec(array)
        self._dtype = np.dtype(array.dtype).newbyteorder("<")
        self._rows_per_chunk = int(array.chunks[0])
        self._row_shape = tuple(int(s) for s in array.shape[1:])
        self._root = Path(array.store_path.store.root) / array.path if self._zstd is not None else None
        self._pid = os.getpid()
        self.reset()

    @property
    def direct(self) -> bool:
        """Whether rows bypass zarr's ``setitem`` (the store's own codecs on a local disk)."""
        return self._zstd is not None

    def reset(self) -> None:
        """Forget the cached chunk (it is read back from the array on the next write)."""
        self._block_index: int | None = None
        self._block: np.ndarray | None = None

    def write(self, t: int, value: Any) -> None:
        """Store ``value`` (shape ``(1, *rest)`` or ``rest``) as row ``t``; ``t`` must be inside the array's shape."""
        data = np.asarray(np.asarray(value).reshape(self._row_shape), dtype=self._dtype, order="C")  # 0-d stays 0-d
        if self._zstd is None:
            self.array[t : t + 1] = data[None]
            return
        if not 0 <= t < self.array.shape[0]:
            raise IndexError(f"row {t} is outside {self.array.path} of shape {self.array.shape}")
        index, offset = divmod(t, self._rows_per_chunk)
        if self._rows_per_chunk == 1:
            block = data
        else:
            if self._block_index != index:
                self._block = self._load_block(index)
                self._block_index = index
            assert self._block is not None
            self._block[offset] = data
            block = self._block
        key = self.array.metadata.encode_chunk_key((index,) + (0,) * len(self._row_shape))
        self._store_file(self._root / key, self._zstd.encode(block), self._pid)

    def _load_block(self, index: int) -> np.ndarray:
        """Chunk ``index`` as stored (fill value where nothing was written, and past the array's end)."""
        rows = self._rows_per_chunk
        block = np.full((rows, *self._row_shape), self.array.fill_value, dtype=self._dtype)
        start, stop = index * rows, min((index + 1) * rows, self.array.shape[0])
        if stop > start:
            block[: stop - start] = self.array[start:stop]
        return block

    @staticmethod
    def _store_file(path: Path, payload: bytes, pid: int = 0) -> None:
        """Replace the file at ``path`` atomically (temporary file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{pid}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
