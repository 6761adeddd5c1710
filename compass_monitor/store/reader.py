"""Reads a run store with plain zarr + numpy (no Textual, no training framework).

Only committed snapshots are visible: the reader takes the snapshot count from
the commit file and never indexes past it, even if a writer has already
resized or filled later rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import schema

__all__ = ["ParamInfo", "Run", "open_run"]


@dataclass(frozen=True)
class ParamInfo:
    """A monitored parameter as recorded in the store."""

    index: int
    id: str
    name: str
    role: str
    module_type: str
    layer: int
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def open_run(path: str | os.PathLike[str]) -> "Run":
    """Open a run store for reading.

    Raises:
        NotARunError: no run store at ``path``.
        SchemaVersionError: the store was written by a newer compass-monitor.
    """
    root = Path(path)
    if not (root / "zarr.json").is_file():
        raise schema.NotARunError(f"{root} is not a compass-monitor run store (no zarr.json); pass a run directory")
    try:
        group = zarr.open_group(store=str(root), mode="r")
    except Exception as exc:  # zarr raises several types for damaged metadata
        raise schema.NotARunError(f"{root}: cannot read the store's metadata ({exc})") from exc
    attrs = dict(group.attrs)
    if attrs.get("format") != schema.FORMAT_NAME:
        raise schema.NotARunError(f"{root} is a Zarr group but not a compass-monitor run (format={attrs.get('format')!r})")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or version > schema.SCHEMA_VERSION:
        raise schema.SchemaVersionError(
            f"{root} uses run-store schema {version!r}; this compass-monitor reads up to "
            f"{schema.SCHEMA_VERSION}. Upgrade compass-monitor to read it."
        )
    return Run(root, group, attrs)


class Run:
    """A run store opened for reading. Arrays are read lazily."""

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any]) -> None:
        self.path = path
        self._group = group
        self.attrs = attrs
        self.params = [
            ParamInfo(i, p["id"], p["name"], p["role"], p["module_type"], int(p["layer"]), (int(p["shape"][0]), int(p["shape"][1])))
            for i, p in enumerate(attrs["params"])
        ]
        self._by_name = {p.name: p for p in self.params}
        self.commit = self._read_commit()

    def _read_commit(self) -> dict[str, Any]:
        try:
            with open(self.path / schema.COMMIT_FILE, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {"snapshots": 0, "last_step": None, "status": "unknown", "heartbeat": None}

    # -- run-level facts -------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.attrs.get("config", {})

    @property
    def status(self) -> str:
        """``running``, ``finished``, ``disabled`` (the monitor stopped itself) or ``unknown``."""
        return str(self.commit.get("status", "unknown"))

    @property
    def num_snapshots(self) -> int:
        return int(self.commit.get("snapshots", 0))

    @cached_property
    def steps(self) -> np.ndarray:
        """Optimizer step of each committed snapshot, (T,) int64."""
        return self._group[schema.STEPS][: self.num_snapshots]

    @cached_property
    def times(self) -> np.ndarray:
        return self._group[schema.TIMES][: self.num_snapshots]

    def param(self, key: str | int | ParamInfo) -> ParamInfo:
        """Look a parameter up by name, index or ParamInfo."""
        if isinstance(key, ParamInfo):
            return key
        if isinstance(key, (int, np.integer)):
            return self.params[int(key)]
        try:
            return self._by_name[key]
        except KeyError:
            raise KeyError(f"no monitored parameter named {key!r} in {self.path}") from None

    # -- metrics -----------------------------------------------------------
    @cached_property
    def counts(self) -> np.ndarray:
        """Raw counts (T, P, F) in the order of ``schema.COUNT_FIELDS``."""
        return self._group[schema.COUNTS][: self.num_snapshots]

    def count(self, field: str) -> np.ndarray:
        """One column of :attr:`counts`, (T, P) int64."""
        return self.counts[:, :, schema.COUNT_FIELDS.index(field)]

    @cached_property
    def null_overlap(self) -> np.ndarray:
        """Precision-null overlaps (T, P, 3) in the order of ``schema.REFERENCE_MASKS``."""
        return self._group[schema.NULL_OVERLAP][: self.num_snapshots]

    @cached_property
    def base_fingerprint(self) -> np.ndarray:
        return self._group[schema.BASE_FINGERPRINT][...]

    @cached_property
    def base_class_counts(self) -> np.ndarray:
        return self._group[schema.BASE_CLASS_COUNTS][...]

    # -- masks and profiles --------------------------------------------------
    def _check_snapshot(self, snapshot: int) -> int:
        t = self.num_snapshots
        if not -t <= snapshot < t:
            raise IndexError(f"snapshot {snapshot} out of range: {t} committed snapshots")
        return snapshot % t

    def mask(self, param: str | int | ParamInfo, snapshot: int) -> np.ndarray:
        """Changed mask ``M`` (m, n) bool of ``param`` at the given snapshot index."""
        info = self.param(param)
        t = self._check_snapshot(snapshot)
        packed = self._group[f"{schema.CHANGED_PREFIX}/{info.id}"][t]
        return np.unpackbits(packed, count=info.numel).astype(bool).reshape(info.shape)

    def reference_mask(self, param: str | int | ParamInfo, which: str) -> np.ndarray:
        """``principal``, ``low`` or ``principal_not_low`` mask (m, n) bool."""
        info = self.param(param)
        row = schema.REFERENCE_MASKS.index(which)
        packed = self._group[f"{schema.REFERENCE_PREFIX}/{info.id}"][row]
        return np.unpackbits(packed, count=info.numel).astype(bool).reshape(info.shape)

    def row_counts(self, param: str | int | ParamInfo) -> np.ndarray:
        """Changed count per row (T, m); divide by n for the row ratio rho (Sec. 2.2)."""
        info = self.param(param)
        return self._group[f"{schema.ROWS_PREFIX}/{info.id}"][: self.num_snapshots]

    def col_counts(self, param: str | int | ParamInfo) -> np.ndarray:
        """Changed count per column (T, n); divide by m for the column ratio kappa (Sec. 2.2)."""
        info = self.param(param)
        return self._group[f"{schema.COLS_PREFIX}/{info.id}"][: self.num_snapshots]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, params={len(self.params)}, snapshots={self.num_snapshots})"
