"""Checked reads of a run store's chunk files: damage is an error, never data.

zarr reads a missing chunk as the array's fill value and decompresses whatever
a chunk's zstd frame declares. For the store's own arrays (``bytes`` + ``zstd``
on a local directory, chunked along the first axis only) :class:`ChunkReader`
reads the chunk files itself, so that

* a chunk the read covers must exist: a missing file raises
  :class:`~compass_monitor.store.schema.StoreDamagedError` naming the file and
  the snapshots it holds (stores that record ``storage.complete_chunks``; older
  stores may lack chunks that were all fill value, which then read as such);
* a file larger than any zstd frame of the chunk's declared size, a frame that
  declares another size (or none), one that fails to decode or whose zstd
  checksum does not match (stores written since ``complete_chunks`` checksum
  every chunk) raise the same error: decompression is bounded by the chunk's
  declared size, never by what the file claims;
* an unreadable file, a symlink (loop) in place of a chunk, raise it too.

Arrays with other codecs or chunking are read through zarr after checking that
every chunk file exists. The bytes decoded are exactly what zarr would return.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.metadata.v3 import ArrayV3Metadata

from . import schema

__all__ = ["ChunkReader", "zstd_content_size"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DECODER = Zstd()


def zstd_content_size(frame: bytes) -> int | None:
    """Decompressed size a zstd frame header declares (RFC 8878 section 3.1.1.1), None if it declares none.

    Raises:
        ValueError: not a zstd frame.
    """
    if len(frame) < 6 or frame[:4] != _ZSTD_MAGIC:
        raise ValueError("not a zstd frame (bad magic number)")
    descriptor = frame[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    if len(frame) < pos + size:
        raise ValueError("truncated zstd frame header")
    value = int.from_bytes(frame[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def _max_frame_size(nbytes: int) -> int:
    """An upper bound on a zstd frame of ``nbytes`` input (ZSTD_compressBound plus header and checksum)."""
    return nbytes + (nbytes >> 8) + 3 * (nbytes // (128 * 1024) + 1) + 64


_REREADS = 3


class _Rewritten(Exception):
    """The file changed while it was read (a writer reused it as a spare)."""


class ChunkReader:
    """Reads rows along the first axis of one array of a local run store, checking every chunk.

    Args:
        root: the store's directory.
        array: the zarr handle (its metadata; data are read from the files).
        strict: a missing chunk is damage (else it reads as the fill value, as zarr does).
        unit: what a row is, in messages (``snapshot``, ``row``).
    """

    def __init__(self, root: Path, array: zarr.Array, *, strict: bool, unit: str = "snapshot") -> None:
        self.array = array
        self.unit = unit
        self.name = array.path
        self.strict = strict
        self.shape = tuple(int(s) for s in array.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self._dtype = np.dtype(array.dtype)
        self._folder = Path(root) / array.path
        meta = array.metadata
        self._direct = False
        if isinstance(meta, ArrayV3Metadata) and len(meta.codecs) == 2 and self.chunks[1:] == self.shape[1:]:
            serializer, compressor = meta.codecs
            if isinstance(serializer, BytesCodec) and isinstance(compressor, ZstdCodec):
                endian = "<" if serializer.endian is None or serializer.endian.value == "little" else ">"
                self._dtype = self._dtype.newbyteorder(endian) if self._dtype.itemsize > 1 else self._dtype
                self._direct = True
        self._chunk_values = math.prod(self.chunks)
        self._chunk_bytes = self._chunk_values * self._dtype.itemsize
        # The last decoded chunk, keyed by its index and file identity: snapshots share a chunk
        # (``writer.time_chunk_rows``), and a writer replaces the file (new inode) when it adds one.
        self._cached: tuple[tuple[int, int, int, int], np.ndarray] | None = None

    def chunk_path(self, index: int) -> Path:
        """File of chunk ``index`` along the first axis."""
        key = self.array.metadata.encode_chunk_key((index,) + (0,) * (len(self.shape) - 1))
        return self._folder / key

    def _where(self, index: int) -> str:
        rows = self.chunks[0]
        first, last = index * rows, min((index + 1) * rows, self.shape[0]) - 1
        span = f"{self.unit} {first}" if first == last else f"{self.unit}s {first}..{last}"
        return f"{span} of {self.name}"

    def _damaged(self, index: int, path: Path, what: str) -> schema.StoreDamagedError:
        return schema.StoreDamagedError(f"{path} is {what}: {self._where(index)} cannot be read (the store is damaged)")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (``stop`` at most the array's length), decoded and checked.

        Raises:
            StoreDamagedError: a covered chunk is missing (strict), unreadable, truncated, corrupt,
                or ``stop`` exceeds the array's length.
        """
        if not 0 <= start <= stop <= self.shape[0]:
            raise schema.StoreDamagedError(
                f"{self._folder}: rows {start}..{stop} asked of {self.name}, which holds {self.shape[0]} (the store is damaged)"
            )
        rest = self.shape[1:]
        if not self._direct:
            self._check_exist(start, stop)
            return np.asarray(self.array[start:stop])
        out = np.empty((stop - start, *rest), dtype=self._dtype.newbyteorder("=") if self._dtype.itemsize > 1 else self._dtype)
        if stop == start:
            return out
        rows = self.chunks[0]
        for index in range(start // rows, (stop - 1) // rows + 1):
            block = self._chunk(index)
            lo, hi = index * rows, (index + 1) * rows
            a, b = max(lo, start), min(hi, stop)
            out[a - start : b - start] = block[a - lo : b - lo]
        return out

    def _chunk(self, index: int) -> np.ndarray:
        # A writer may rewrite a file a reader has open (``RowChunks`` reuses the old version of
        # a shared chunk as its next spare): a file whose size or mtime moved while it was read
        # is read again from the current name; so is one that fails to decode (file times are
        # coarse), and only what fails every time is damage.
        for _ in range(_REREADS - 1):
            try:
                return self._read_chunk(index)
            except (_Rewritten, schema.StoreDamagedError):
                continue
        return self._read_chunk(index, last=True)

    def _read_chunk(self, index: int, last: bool = False) -> np.ndarray:
        path = self.chunk_path(index)
        block_shape = self.chunks
        if self._chunk_bytes == 0:  # an empty matrix: zarr writes no file for an empty chunk
            return np.zeros(block_shape, dtype=self._dtype)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if self.strict:
                raise self._damaged(index, path, "missing") from None
            return np.full(block_shape, self.array.fill_value, dtype=self._dtype)
        except OSError as exc:
            what = "a symlink" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
            raise self._damaged(index, path, what) from None
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            identity = (index, stat.st_ino, stat.st_mtime_ns, size)
            if self._cached is not None and self._cached[0] == identity:
                return self._cached[1]
            if size > _max_frame_size(self._chunk_bytes):
                raise self._damaged(index, path, f"{size} bytes, more than any chunk of {self._chunk_bytes} bytes compresses to")
            data = b""
            while len(data) < size:
                piece = os.read(fd, size - len(data))
                if not piece:
                    break
                data += piece
            after = os.fstat(fd)
        except OSError as exc:
            raise self._damaged(index, path, f"unreadable ({exc.strerror})") from None
        finally:
            os.close(fd)
        if not last and (after.st_size, after.st_mtime_ns) != (size, stat.st_mtime_ns):
            raise _Rewritten()
        try:
            declared = zstd_content_size(data)
        except ValueError as exc:
            raise self._damaged(index, path, f"corrupt ({exc})") from None
        if declared != self._chunk_bytes:
            raise self._damaged(
                index, path, f"corrupt (its zstd frame declares {declared} bytes, the chunk has {self._chunk_bytes})"
            )
        buffer = np.empty(self._chunk_bytes, dtype=np.uint8)
        try:
            _DECODER.decode(data, out=buffer)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError for bad frames
            reason = str(exc).replace("Zstd decompression error: ", "").strip("b\"'")
            raise self._damaged(index, path, f"corrupt ({reason})") from None
        block = buffer.view(self._dtype).reshape(block_shape)
        block.flags.writeable = False  # shared by later reads of the same chunk
        self._cached = (identity, block)
        return block

    def check_present(self, stop: int) -> None:
        """Raise unless every chunk file holding rows ``0:stop`` exists (one directory listing).

        Raises:
            StoreDamagedError: naming the first missing chunk file (strict stores only).
        """
        if not self.strict or stop <= 0 or self._chunk_bytes == 0:
            return
        try:
            present = set(os.listdir(self._folder))
        except OSError:
            present = set()
        for index in range(0, (stop - 1) // self.chunks[0] + 1):
            path = self.chunk_path(index)
            if path.parent == self._folder and path.name not in present:
                raise self._damaged(index, path, "missing")
            if path.parent != self._folder and not path.is_file():  # '/'-separated keys: one folder per chunk
                raise self._damaged(index, path, "missing")

    def _check_exist(self, start: int, stop: int) -> None:
        if not self.strict or stop == start or self._chunk_bytes == 0:
            return
        grid = [range(0, max(1, -(-s // c))) for s, c in zip(self.shape[1:], self.chunks[1:])]
        rows = self.chunks[0]
        for index in range(start // rows, (stop - 1) // rows + 1):
            for rest in np.ndindex(*[len(g) for g in grid]) if grid else [()]:
                key = self.array.metadata.encode_chunk_key((index, *rest))
                path = self._folder / key
                if not path.is_file() or path.is_symlink():
                    raise self._damaged(index, path, "missing")
