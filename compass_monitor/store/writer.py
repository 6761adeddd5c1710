"""Writes a run store (Zarr v3) snapshot by snapshot.

Every array uses spec-standard codecs only (bytes + zstd), so any Zarr v3
reader opens it. Arrays that grow along time are over-allocated geometrically
(fewer metadata rewrites) and trimmed at ``finalize``; the commit file, written
last and replaced atomically, says how many snapshots are complete. A reader
that trusts only the commit file never sees a half-written snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from ..selection import ParamSpec
from . import schema

__all__ = ["RunWriter", "SnapshotRecord"]

log = logging.getLogger(__name__)

_ZSTD = ZstdCodec(level=1)
_INITIAL_CAPACITY = 16


@dataclass(frozen=True)
class SnapshotRecord:
    """Everything one snapshot adds to the store (host arrays)."""

    step: int
    wall_time: float
    counts: np.ndarray  # (P, len(COUNT_FIELDS)) int64
    null_overlap: np.ndarray  # (P, 3) float64
    rows: list[np.ndarray]  # per param (m,) int32
    cols: list[np.ndarray]  # per param (n,) int32
    packed: list[np.ndarray]  # per param (nbytes,) uint8


def check_target_free(path: Path) -> None:
    """Refuse a path that holds anything, a run least of all. Writes nothing."""
    if path.exists() and not path.is_dir():
        raise schema.StoreExistsError(f"{path} is a file; give a directory path for the run store")
    if path.is_dir() and any(path.iterdir()):
        if (path / "zarr.json").exists():
            raise schema.StoreExistsError(
                f"{path} already holds a run store; choose a new run directory "
                "(nothing was written, the existing run is untouched)"
            )
        raise schema.StoreExistsError(
            f"{path} exists and is not empty; choose a new or empty directory for the run store"
        )


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunWriter:
    """Creates a new run store and appends committed snapshots to it."""

    def __init__(self, path: Path, group: zarr.Group, params: list[ParamSpec]) -> None:
        self.path = path
        self._group = group
        self._params = params
        self._count = 0
        self._capacity = 0
        self._last_step: int | None = None
        self._growing: list[zarr.Array] = []
        # Open handles, so that appending never re-reads array metadata.
        self._per_param: list[tuple[zarr.Array, zarr.Array, zarr.Array]] = []
        self._reference: list[zarr.Array] = []

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, params: list[ParamSpec], attributes: dict[str, Any]) -> "RunWriter":
        """Create the store's group and static arrays.

        Raises:
            StoreExistsError: ``path`` is a file, a non-empty directory or an existing run.
        """
        root = Path(path)
        check_target_free(root)
        root.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(store=str(root), mode="w-", zarr_format=3)
        group.attrs.update(
            {
                "format": schema.FORMAT_NAME,
                "schema_version": schema.SCHEMA_VERSION,
                "params": [
                    {
                        "id": schema.param_id(i),
                        "name": p.name,
                        "role": p.role,
                        "module_type": p.module_type,
                        "layer": p.layer,
                        "shape": list(p.shape),
                    }
                    for i, p in enumerate(params)
                ],
                **attributes,
            }
        )
        writer = cls(root, group, params)
        writer._create_arrays()
        writer._commit(status="running")
        return writer

    def _array(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, fill: Any = 0) -> zarr.Array:
        return self._group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, compressors=_ZSTD, fill_value=fill
        )

    def _create_arrays(self) -> None:
        p = len(self._params)
        t = _INITIAL_CAPACITY
        fields, masks = len(schema.COUNT_FIELDS), len(schema.REFERENCE_MASKS)
        self._steps = self._array(schema.STEPS, (t,), (1024,), "int64", -1)
        self._times = self._array(schema.TIMES, (t,), (1024,), "float64", float("nan"))
        self._counts = self._array(schema.COUNTS, (t, p, fields), (1, p, fields), "int64")
        self._null = self._array(schema.NULL_OVERLAP, (t, p, masks), (1, p, masks), "float64", float("nan"))
        self._growing = [self._steps, self._times, self._counts, self._null]
        for i, spec in enumerate(self._params):
            pid = schema.param_id(i)
            m, n = spec.shape
            nbytes = (m * n + 7) // 8
            self._reference.append(self._array(f"{schema.REFERENCE_PREFIX}/{pid}", (masks, nbytes), (1, nbytes), "uint8"))
            arrays = (
                self._array(f"{schema.CHANGED_PREFIX}/{pid}", (t, nbytes), (1, nbytes), "uint8"),
                self._array(f"{schema.ROWS_PREFIX}/{pid}", (t, m), (1, m), "int32"),
                self._array(f"{schema.COLS_PREFIX}/{pid}", (t, n), (1, n), "int32"),
            )
            self._per_param.append(arrays)
            self._growing += arrays
        self._capacity = t

    def write_base(self, *, fingerprints: np.ndarray, class_counts: np.ndarray, reference_packed: list[np.ndarray]) -> None:
        """Store what is computed once from W0: fingerprints, spacing classes, reference masks."""
        self._group.create_array(schema.BASE_FINGERPRINT, data=np.asarray(fingerprints, dtype=np.int64), compressors=_ZSTD)
        self._group.create_array(schema.BASE_CLASS_COUNTS, data=np.asarray(class_counts, dtype=np.int64), compressors=_ZSTD)
        for array, packed in zip(self._reference, reference_packed):
            array[...] = packed

    def _grow_to(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity)
        for array in self._growing:
            array.resize((capacity, *array.shape[1:]))
        self._capacity = capacity

    def append(self, record: SnapshotRecord) -> None:
        """Write one snapshot's arrays, then commit it (the commit file is written last)."""
        if self._last_step is not None and record.step <= self._last_step:
            raise schema.StoreError(f"snapshot steps must increase: got {record.step} after {self._last_step}")
        t = self._count
        self._grow_to(t + 1)
        for (changed, rows, cols), packed, row, col in zip(self._per_param, record.packed, record.rows, record.cols):
            changed[t] = packed
            rows[t] = row
            cols[t] = col
        self._counts[t] = record.counts
        self._null[t] = record.null_overlap
        self._times[t] = record.wall_time
        self._steps[t] = record.step
        self._count = t + 1
        self._last_step = record.step
        self._commit(status="running")

    def _commit(self, *, status: str) -> None:
        _write_json_atomic(
            self.path / schema.COMMIT_FILE,
            {
                "snapshots": self._count,
                "last_step": self._last_step,
                "status": status,
                "heartbeat": time.time(),
            },
        )

    @property
    def num_snapshots(self) -> int:
        return self._count

    def mark(self, status: str) -> None:
        """Record a run status (e.g. ``disabled``) without touching any array."""
        self._commit(status=status)

    def finalize(self, status: str = "finished") -> None:
        """Trim over-allocated arrays to the committed length and mark the run ``status``."""
        for array in self._growing:
            array.resize((self._count, *array.shape[1:]))
        self._capacity = self._count
        self._commit(status=status)
