"""Fast writes of one snapshot row into arrays chunked along time.

Every per-snapshot array of the run store is chunked ``(L, *rest)`` with the
full extent on every other axis (L from ``writer.time_chunk_rows``: up to 64
snapshots of a small array share a chunk; 1024 for the step and time columns),
so writing snapshot ``t`` replaces exactly one chunk per array. zarr's general ``setitem`` costs about 0.4 ms of Python per call
(selection, codec pipeline, event loop and thread hops), and for L > 1 it
reads the chunk back before rewriting it: ~50 ms per snapshot for a 28-matrix
model with four arrays per matrix, ten times the cost of encoding and writing
the bytes. For arrays whose codecs are the store's own (``bytes``
little-endian + ``zstd``) on a local disk, :class:`RowChunks` encodes the chunk
with the same numcodecs ``Zstd`` that zarr's ``ZstdCodec`` uses and writes it
under the key zarr's chunk key encoding names, through a spare file swapped in
atomically (:meth:`RowChunks._store_file`); for L > 1 it keeps the chunk being
filled in memory. The files are
exactly what zarr would write (the tests compare the bytes), so any Zarr v3
reader opens them. Arrays with any other metadata fall back to zarr's own
``setitem``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
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
        """Replace the file at ``path`` atomically: write a spare file, then swap it in.

        A chunk that several snapshots share is rewritten once per snapshot. Renaming over
        it frees the old inode, which on ext4 costs several times a new file; so where the
        kernel allows, the spare and the chunk are exchanged (``renameat2(RENAME_EXCHANGE)``,
        as atomic for readers as a rename) and the old version stays behind as the next
        write's spare (``.<key>.<pid>.tmp``; ``finalize`` removes spares). Readers detect a
        spare rewritten under an open handle (``chunks.ChunkReader``). Elsewhere, and for a
        chunk written for the first time, a plain ``os.replace``.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{SPARE_PREFIX}{path.name}.{pid}{SPARE_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, len(payload))
        finally:
            os.close(fd)
        if not _exchange(tmp, path):
            os.replace(tmp, path)


SPARE_PREFIX, SPARE_SUFFIX = ".", ".tmp"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _libc_renameat2() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without renameat2 (glibc < 2.28)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _libc_renameat2() if sys.platform.startswith("linux") else None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the files at ``a`` and ``b``; False if ``b`` does not exist or the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # a first write, or a file system without the exchange: rename instead
    raise OSError(code, os.strerror(code), str(b))


def remove_spares(folder: Path) -> None:
    """Delete the spare files ``RowChunks`` leaves beside shared chunks (any writer's), if any.

    Spares sit beside the chunk files: in the array's folder for ``.``-separated keys, below
    its ``c/`` for ``/``-separated ones. Symlinked folders are not followed.
    """
    for where, _, names in os.walk(folder):
        for name in names:
            if name.startswith(SPARE_PREFIX) and name.endswith(SPARE_SUFFIX):
                try:
                    os.unlink(os.path.join(where, name))
                except OSError:
                    pass
