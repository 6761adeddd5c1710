"""A probe's per-matrix state kept off memory, for a base that can be read again (post hoc).

A live monitor keeps, per weight, W0's bf16 code (2 bytes) and 4 bits of
packed masks (principal, low, principal-not-low, previous), on the device the
weights are on: the training process must not reread a base it no longer has.
A post-hoc run (``compass_monitor.checkpoints``) does have it: the base
checkpoint is on disk. Holding 2.5 bytes per weight of a model larger than the
machine's memory is then the one thing that stops it from running. Here:

* W0's codes are read again from the base (memory-mapped, one matrix at a
  time) whenever a matrix is measured, and dropped after it; the layout gives
  the reader (:attr:`compass_monitor.sharding.ShardLayout.base_values`);
* the reference masks and the previous mask (0.5 bytes per weight) go to one
  anonymous temporary file (``O_TMPFILE``: it has no name, so nothing is left
  behind by a crash) beside the run store, at fixed offsets, read and written
  with ``pread``/``pwrite`` (positional, so the writer thread may read while the
  probe writes).

The peak memory of the probe is then one matrix's working set; what remains
per weight is the snapshot in flight (1 bit of changed mask, and the store
writer's previous mask for its delta encoding, 1 bit).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = ["StateSpill", "OffloadedArrays", "spill_directory", "return_freed_memory"]

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    glibc serves allocations below its adaptive mmap threshold (up to 32 MiB)
    from the heap and keeps their pages after ``free``: matrix after matrix, a
    post-hoc pass that holds one matrix at a time still grew its resident set
    by about 2 bytes per weight of the model (``bench/bench_posthoc_memory.py``).
    Called between matrices of the base capture and after each snapshot of an
    offloaded probe only; a live run never calls it.
    """
    if _TRIM is not None:
        _TRIM(0)


def spill_directory(run_dir: str | os.PathLike[str]) -> Path:
    """The nearest existing folder at or above ``run_dir`` (the spill file goes on the store's file system)."""
    path = Path(run_dir).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


class StateSpill:
    """One anonymous temporary file holding fixed-size byte slots (no name on disk; freed on close or exit).

    Args:
        directory: where the file is created (its file system holds 0.5 bytes per monitored weight).

    Raises:
        OSError: the folder cannot hold a temporary file (read-only, full).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".compass-spill-")
        self._fd = self._file.fileno()
        self._end = 0

    def allocate(self, nbytes: int) -> int:
        """A new slot of ``nbytes`` bytes; returns its offset."""
        offset = self._end
        self._end += int(nbytes)
        return offset

    def write(self, offset: int, data: np.ndarray) -> None:
        """Write ``data``'s bytes at ``offset`` (all of them: a short write is retried)."""
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        while view.nbytes:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes from ``offset`` as a new (nbytes,) uint8 array.

        Raises:
            OSError: the file ends early (it was truncated behind our back).
        """
        out = np.empty(int(nbytes), dtype=np.uint8)
        view, got = memoryview(out), 0
        while got < nbytes:
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n == 0:
                raise OSError(f"the monitor's spill file ended at byte {offset + got}, expected {offset + nbytes}")
            got += n
        return out

    @property
    def nbytes(self) -> int:
        """Bytes allocated so far."""
        return self._end

    def close(self) -> None:
        self._file.close()


class OffloadedArrays:
    """Where one matrix range's W0 codes and masks are while it is not being measured.

    Args:
        spill: the file holding the masks.
        base: re-reads the range's W0 as stored (1-D, any float dtype); the caller makes canonical codes of it.
        nbytes: bytes of one packed mask of the range (``aligned_nbytes``).
        device: where the arrays go when loaded.
    """

    def __init__(self, spill: StateSpill, base: Callable[[], torch.Tensor], nbytes: int, device: torch.device) -> None:
        self.spill = spill
        self.base = base
        self.nbytes = int(nbytes)
        self.device = device
        self.reference_offset = spill.allocate(3 * self.nbytes)
        self.previous_offset = spill.allocate(self.nbytes)

    def put_reference(self, reference: np.ndarray) -> None:
        """Store the (3, nbytes) reference masks and a zero previous mask (the state after the base capture)."""
        self.spill.write(self.reference_offset, np.ascontiguousarray(reference, dtype=np.uint8))
        self.spill.write(self.previous_offset, np.zeros(self.nbytes, dtype=np.uint8))

    def reference(self) -> np.ndarray:
        """(3, nbytes) uint8: principal, low, principal-not-low."""
        return self.spill.read(self.reference_offset, 3 * self.nbytes).reshape(3, self.nbytes)

    def previous(self) -> np.ndarray:
        """(nbytes,) uint8: the last stored snapshot's changed mask."""
        return self.spill.read(self.previous_offset, self.nbytes)

    def put_previous(self, packed: np.ndarray) -> None:
        self.spill.write(self.previous_offset, np.ascontiguousarray(packed, dtype=np.uint8))
