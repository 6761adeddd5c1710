"""Reads a run store with plain zarr + numpy (no Textual, no training framework).

Only committed snapshots are visible: the reader takes the snapshot count from
the commit file and never indexes past it, even if a writer has already
resized or filled later rows. A live viewer polls :meth:`Run.refresh`, which
re-reads the commit file and, when snapshots were added, reopens array
handles that are too short and extends its cached series by the new rows only.

The mask encoding (key frames, XOR deltas, Rice-coded positions) is hidden:
:meth:`Run.mask` returns the (m, n) boolean mask of any committed snapshot,
decoding at most ``key_interval`` frames, and caches the last mask per matrix so
that stepping through time decodes one frame per step.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..matrix_spec import MatrixSpec
from . import codec, schema
from .chunks import ChunkReader
from .commit import liveness, read_commit, writer_alive
from .integrity import check_array_shape, check_params, expected_shape
from .spectral_arrays import SpectralDetail, read_spectral_detail

__all__ = ["ParamInfo", "Run", "open_run"]

_PROFILE_CACHE = 64  # per-matrix series (rows, cols, previews) kept in memory


#: The store's record of a monitored matrix is the one record the monitor uses.
ParamInfo = MatrixSpec


def _open_group(root: Path) -> tuple[zarr.Group, dict[str, Any]]:
    if not (root / "zarr.json").is_file():
        raise schema.NotARunError(f"{root} is not a compass-monitor run store (no zarr.json); pass a run directory")
    try:
        group = zarr.open_group(store=str(root), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:  # zarr raises several types for damaged metadata
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise schema.StoreDamagedError(f"{root / 'zarr.json'} cannot be read ({reason}); the store is damaged") from exc
    if attrs.get("format") != schema.FORMAT_NAME:
        raise schema.NotARunError(f"{root} is a Zarr group but not a compass-monitor run (format={attrs.get('format')!r})")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or version > schema.SCHEMA_VERSION:
        raise schema.SchemaVersionError(
            f"{root} uses run-store schema {version!r}; this compass-monitor reads up to "
            f"{schema.SCHEMA_VERSION}. Upgrade compass-monitor to read it."
        )
    return group, attrs


def open_run(path: str | os.PathLike[str], *, check: bool = True) -> "Run":
    """Open a run store for reading (also while a writer is appending to it).

    Checks the root attributes, the commit file, and (``check``) that every
    array holds the committed snapshots and every chunk file they need exists
    (one directory listing per array). Chunk contents are checked as they are
    read; ``integrity.verify_run`` checks all of them.

    Raises:
        NotARunError: no run store at ``path``.
        SchemaVersionError: the store was written by a newer compass-monitor.
        StoreDamagedError: damaged metadata or commit file, a missing chunk, arrays shorter than the commit.
    """
    root = Path(path)
    group, attrs = _open_group(root)
    run = Run(root, group, attrs)
    if check:
        run.check_chunks_present()
    return run


def _segment_start(encodings: np.ndarray, t: int) -> int:
    """Index of the key frame that snapshot t's mask starts from (the last key at or before t)."""
    keys = np.flatnonzero((encodings[: t + 1] & codec.DELTA) == 0)
    if keys.size == 0:
        raise schema.StoreDamagedError(f"no key frame at or before snapshot {t} in {schema.FRAMES}: the store is damaged")
    return int(keys[-1])


class _Rows:
    """``rows[j]``: row j of a checked chunk reader (the frame loops index payloads one by one)."""

    def __init__(self, reader: ChunkReader) -> None:
        self._reader = reader

    def __getitem__(self, j: int) -> np.ndarray:
        return self._reader.read(j, j + 1)[0]


class Run:
    """A run store opened for reading. Arrays are read lazily, committed snapshots only."""

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any]) -> None:
        self.path = path
        self._group = group
        self.attrs = attrs
        check_params(path, attrs.get("params"))  # types and sizes, before anything is sized from them
        self.params = [MatrixSpec.from_record(i, p) for i, p in enumerate(attrs["params"])]
        self._by_name = {p.name: p for p in self.params}
        self._shapes = {p.id: p.shape for p in self.params}
        #: Stores that wrote every chunk (and checksum them): a missing chunk is damage, not fill value.
        self._strict = bool((attrs.get("storage") or {}).get("complete_chunks", False))
        self.commit = self._read_commit()
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._arrays: dict[str, zarr.Array | None] = {}
        self._readers: dict[str, ChunkReader] = {}
        self._series: dict[str, np.ndarray] = {}
        self._profiles: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._mask_cache: dict[int, tuple[int, np.ndarray]] = {}

    def _read_commit(self) -> dict[str, Any]:
        return read_commit(self.path)

    # -- live viewing ------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the commit file (and array metadata as needed). True if the committed snapshots changed.

        New snapshots extend the cached series; a truncation (a resumed run that
        dropped snapshots, seen as a new ``generation``) or a change of the
        store's layout state (finished <-> running) reopens everything.
        """
        old = self.commit
        new = self._read_commit()
        self.commit = new
        grew = int(new.get("snapshots", 0)) != int(old.get("snapshots", 0))
        regenerated = new.get("generation", 0) != old.get("generation", 0) or int(new.get("snapshots", 0)) < int(old.get("snapshots", 0))
        if regenerated or (new.get("status") != old.get("status") and "finished" in (new.get("status"), old.get("status"))):
            group, attrs = _open_group(self.path)
            self._group, self.attrs = group, attrs
            self._reset_caches()
        return grew or regenerated

    # -- run-level facts -------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.attrs.get("config", {})

    @property
    def schema_version(self) -> int:
        return int(self.attrs.get("schema_version", 1))

    @property
    def status(self) -> str:
        """``running``, ``finished``, ``disabled`` (the monitor stopped itself) or ``unknown``."""
        return str(self.commit.get("status", "unknown"))

    @property
    def num_snapshots(self) -> int:
        return int(self.commit.get("snapshots", 0))

    @property
    def heartbeat_age(self) -> float | None:
        """Seconds since the writer last committed (or refreshed its heartbeat); None if unknown."""
        beat = self.commit.get("heartbeat")
        return None if beat is None else max(0.0, time.time() - float(beat))

    @property
    def writer_alive(self) -> bool | None:
        """For a ``running`` run written on this host: whether the writing process still exists (None if unknown)."""
        return writer_alive(self.commit)

    @property
    def liveness(self) -> str:
        """``live``, ``stale``, ``crashed`` (running runs), ``finished``, ``disabled`` or ``unknown``;
        one definition for every view (``commit.liveness``)."""
        if self.status != "running":
            return liveness(self.commit)
        return liveness(self.commit, times=self.times if self.num_snapshots >= 3 else None)

    @property
    def is_stale(self) -> bool:
        """A ``running`` run whose writer is gone: its process is dead (``crashed``), or its last commit
        is older than ``commit.stale_threshold`` (``stale``)."""
        return self.liveness in ("stale", "crashed")

    @property
    def gaps(self) -> list[tuple[int, int, int]]:
        """Snapshots not stored because the writer's queue was full: (first_step, last_step, count)."""
        return [tuple(int(x) for x in g) for g in self.commit.get("gaps", [])]  # type: ignore[misc]

    @property
    def history(self) -> list[dict[str, Any]]:
        """Events of the run's life: created, resumed (with snapshots dropped), disabled, finished."""
        return list(self.commit.get("history", []))

    @property
    def resume_gaps(self) -> list[tuple[int, int]]:
        """Steps trained without the monitor: (after_step, resumed_at) per resume whose step lay beyond the
        last step the store had seen (a ``resumed`` event with ``gap``); steps ``after_step+1..resumed_at``
        have no snapshot, and the first snapshot after ``resumed_at`` counts its flips since ``after_step``.
        A gap whose resume was later rewound past (a resume at an earlier step) no longer applies."""
        out: list[tuple[int, int]] = []
        for event in self.history:
            if event.get("event") != "resumed":
                continue
            step = event.get("step")
            if isinstance(step, int):
                out = [g for g in out if g[1] <= step]
            gap = event.get("gap")
            if isinstance(gap, list) and len(gap) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in gap):
                out.append((int(gap[0]), int(gap[1])))
        return out

    @property
    def key_interval(self) -> int:
        return int(self.commit.get("key_interval") or self.attrs.get("storage", {}).get("key_interval", 1))

    # -- arrays --------------------------------------------------------------
    def _array(self, path: str, *, rows: int = 0) -> zarr.Array | None:
        """An open array handle with at least ``rows`` rows (reopened when a writer grew it); None if absent.

        Raises:
            StoreDamagedError: its metadata cannot be read, its shape disagrees with the store's
                matrices, or it holds fewer than ``rows`` rows.
        """
        array = self._arrays.get(path)
        if array is None or array.shape[0] < rows:
            try:
                try:
                    array = self._group[path]
                except KeyError:
                    array = None
                if array is not None and array.shape[0] < rows:
                    array = zarr.open_array(store=str(self.path), path=path, mode="r")
            except schema.StoreError:
                raise
            except Exception as exc:  # zarr raises several types for damaged metadata
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
                raise schema.StoreDamagedError(f"{self.path / path / 'zarr.json'} cannot be read ({reason}); the store is damaged") from exc
            if array is not None:
                check_array_shape(self.path, path, tuple(array.shape), expected_shape(path, self._shapes, len(self.params)), rows)
                self._readers.pop(path, None)
            self._arrays[path] = array
        return array

    def _reader(self, path: str, *, rows: int = 0, unit: str = "snapshot") -> ChunkReader | None:
        """A checked chunk reader of an array with at least ``rows`` rows (None if the array is absent)."""
        array = self._array(path, rows=rows)
        if array is None:
            return None
        reader = self._readers.get(path)
        if reader is None or reader.array is not array:
            reader = self._readers[path] = ChunkReader(self.path, array, strict=self._strict, unit=unit)
        return reader

    def _read_series(self, path: str, cached: np.ndarray | None) -> np.ndarray | None:
        """The first T rows of a time-indexed array, reading only rows not yet cached."""
        t = self.num_snapshots
        if cached is not None and cached.shape[0] == t:
            return cached
        reader = self._reader(path, rows=t)
        if reader is None:
            return None
        if cached is not None and cached.shape[0] < t:
            return np.concatenate([cached, reader.read(cached.shape[0], t)])
        return reader.read(0, t)

    def _series_of(self, path: str) -> np.ndarray | None:
        value = self._read_series(path, self._series.get(path))
        if value is not None:
            self._series[path] = value
        return value

    def _profile(self, prefix: str, info: ParamInfo) -> np.ndarray | None:
        key = (prefix, info.index)
        value = self._read_series(f"{prefix}/{info.id}", self._profiles.get(key))
        if value is not None:
            self._profiles[key] = value
            self._profiles.move_to_end(key)
            while len(self._profiles) > _PROFILE_CACHE:
                self._profiles.popitem(last=False)
        return value

    @property
    def steps(self) -> np.ndarray:
        """Optimizer step of each committed snapshot, (T,) int64."""
        return self._series_of(schema.STEPS)

    @property
    def times(self) -> np.ndarray:
        return self._series_of(schema.TIMES)

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
    @property
    def counts(self) -> np.ndarray:
        """Raw counts (T, P, F) in the order of ``schema.COUNT_FIELDS``."""
        return self._series_of(schema.COUNTS)

    def count(self, field: str) -> np.ndarray:
        """One column of :attr:`counts`, (T, P) int64."""
        return self.counts[:, :, schema.COUNT_FIELDS.index(field)]

    @property
    def spectral_metrics(self) -> np.ndarray | None:
        """Spectral diagnostics (T, P, F) in ``schema.SPECTRAL_FIELDS`` order, NaN where not
        computed; None for a store without them."""
        return self._series_of(schema.SPECTRAL)

    @property
    def has_spectral(self) -> bool:
        """Whether any committed snapshot carries spectral diagnostics."""
        values = self.spectral_metrics
        return values is not None and bool(np.isfinite(values).any())

    def spectral(self, param: str | int | ParamInfo) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Spectral series of one matrix: ``{field: (steps, values)}`` over the snapshots that have them;
        ``{}`` when none has (spectral diagnostics off, or a store without them)."""
        info = self.param(param)
        values = self.spectral_metrics
        if values is None:
            return {}
        series = values[:, info.index, :]
        present = np.isfinite(series).any(axis=1)
        if not present.any():
            return {}
        steps = self.steps[present]
        return {name: (steps, series[present, j]) for j, name in enumerate(schema.SPECTRAL_FIELDS)}

    @property
    def spectral_angles(self) -> np.ndarray | None:
        """All principal angles (T, P, 2, K) float64 degrees, descending (axis 2: left, right; Sec. 4.1, Fig. 4);
        NaN where not computed and past a matrix's own k; None for a store without them."""
        return self._series_of(schema.SPECTRAL_ANGLES)

    @property
    def spectral_singular_values(self) -> np.ndarray | None:
        """Top-K singular values of W_t (T, P, K) float64, descending; NaN as :attr:`spectral_angles`; None if not stored."""
        return self._series_of(schema.SPECTRAL_SV)

    @property
    def spectral_base_singular_values(self) -> np.ndarray | None:
        """Top-K singular values of W_0 (T, P, K) float64, on every spectral snapshot; NaN as :attr:`spectral_angles`."""
        return self._series_of(schema.SPECTRAL_SV_BASE)

    def spectral_detail(self, param: str | int | ParamInfo) -> SpectralDetail | None:
        """One matrix's principal angles and singular values over its spectral snapshots (a Fig. 4 of that layer);
        None when the store has none (spectral off, a store from before these arrays, or the matrix failed)."""
        info = self.param(param)
        return read_spectral_detail(
            self.steps, self.spectral_angles, self.spectral_singular_values, self.spectral_base_singular_values, info.index, info.shape
        )

    @property
    def null_overlap(self) -> np.ndarray:
        """Precision-null overlaps (T, P, 3) in the order of ``schema.REFERENCE_MASKS``."""
        return self._series_of(schema.NULL_OVERLAP)

    def _whole(self, path: str) -> np.ndarray:
        reader = self._reader(path, unit="row")
        if reader is None:
            raise schema.StoreDamagedError(f"{self.path / path} is missing (the base was not written, or the store is damaged)")
        return reader.read(0, reader.shape[0])

    @property
    def base_fingerprint(self) -> np.ndarray:
        return self._whole(schema.BASE_FINGERPRINT)

    @property
    def base_class_counts(self) -> np.ndarray:
        return self._whole(schema.BASE_CLASS_COUNTS)

    @property
    def base_class_attributes(self) -> dict[str, Any]:
        """The precision null's class layout and case (``on-grid``/``off-grid``); {} in older stores."""
        return dict(self._group[schema.BASE_CLASS_COUNTS].attrs)

    def base_codes(self, param: str | int | ParamInfo) -> np.ndarray | None:
        """Canonical bf16 codes of W0 (m, n) int16, or None if the run did not store them.

        Raises:
            StoreDamagedError: the commit says they are stored, and a chunk is missing or corrupt.
        """
        info = self.param(param)
        if not self.commit.get("base_weights", False):
            return None
        return self._whole(f"{schema.BASE_WEIGHTS_PREFIX}/{info.id}")

    # -- masks and profiles --------------------------------------------------
    def _check_snapshot(self, snapshot: int) -> int:
        t = self.num_snapshots
        if not -t <= snapshot < t:
            raise IndexError(f"snapshot {snapshot} out of range: {t} committed snapshots")
        return snapshot % t

    def frames(self) -> np.ndarray:
        """Frame headers (T, P, 4) in the order of ``schema.FRAME_FIELDS`` (all zeros for schema 1: packed keys)."""
        value = self._series_of(schema.FRAMES)
        if value is None:  # schema 1: every mask a packed key frame
            t = self.steps.shape[0]  # (checks the commit's count against the arrays first)
            value = self._series[schema.FRAMES] = np.zeros((t, len(self.params), len(schema.FRAME_FIELDS)), dtype=np.int64)
        return value

    def _rows_upto(self, path: str, rows: int) -> np.ndarray:
        """At least the first ``rows`` rows of a run-level series: the cached series, or just those rows
        (a mask needs the headers up to its snapshot only)."""
        cached = self._series.get(path)
        if cached is not None and cached.shape[0] >= rows:
            return cached
        if path == schema.FRAMES and self._array(path) is None:
            return self.frames()  # schema 1: all packed key frames
        if rows >= self.num_snapshots:
            series = self._series_of(path)  # cached for the next call
            if series is not None:
                return series
        reader = self._reader(path, rows=rows)
        if reader is None:
            raise schema.StoreDamagedError(f"{self.path / path} is missing (the store is damaged)")
        return reader.read(0, rows)

    def packed_mask(self, param: str | int | ParamInfo, snapshot: int) -> np.ndarray:
        """Changed mask of ``param`` at a snapshot, bit-packed (``np.packbits`` of the flat mask)."""
        info = self.param(param)
        t = self._check_snapshot(snapshot)
        headers = self._rows_upto(schema.FRAMES, t + 1)[:, info.index]
        encodings = headers[:, 0]
        start = _segment_start(encodings, t)
        reader = self._reader(f"{schema.CHANGED_PREFIX}/{info.id}", rows=t + 1)
        if reader is None:
            raise schema.StoreDamagedError(f"{self.path / schema.CHANGED_PREFIX / info.id} is missing (the store is damaged)")
        changed = _Rows(reader)
        cached = self._mask_cache.get(info.index)
        packed: np.ndarray | None = None
        try:
            if cached is not None:
                ct, cpacked = cached
                same_segment = ct < len(encodings) and _segment_start(encodings, ct) == start
                if same_segment and ct <= t:  # forwards from the cache: apply deltas ct+1..t
                    packed = cpacked
                    for j in range(ct + 1, t + 1):
                        packed = codec.apply_frame(packed, headers[j], changed[j], info.numel)
                elif same_segment:  # backwards: M_{j-1} = M_j xor D_j
                    packed = cpacked
                    for j in range(ct, t, -1):
                        packed = codec.apply_frame(packed, headers[j], changed[j], info.numel)
            if packed is None:
                payloads = reader.read(start, t + 1)
                for j in range(start, t + 1):
                    packed = codec.apply_frame(packed, headers[j], payloads[j - start], info.numel)
        except ValueError as exc:  # a frame that does not decode (its chunk decompressed, its content is wrong)
            raise schema.StoreDamagedError(
                f"{self.path / schema.CHANGED_PREFIX / info.id}: snapshot {t} of {info.name!r} does not decode ({exc}); the store is damaged"
            ) from exc
        assert packed is not None
        ones = int(np.bitwise_count(packed).sum(dtype=np.int64))
        counted = int(self._rows_upto(schema.COUNTS, t + 1)[t, info.index, 0])
        if ones != counted:
            raise schema.StoreDamagedError(
                f"{self.path}: snapshot {t} (step {int(self.steps[t])}) of {info.name!r}: the mask decodes to {ones} changed "
                f"weights, the stored count says {counted}; the store is damaged"
            )
        self._mask_cache[info.index] = (t, packed)
        return packed.copy()

    def mask(self, param: str | int | ParamInfo, snapshot: int) -> np.ndarray:
        """Changed mask ``M`` (m, n) bool of ``param`` at the given snapshot index."""
        info = self.param(param)
        packed = self.packed_mask(info, snapshot)
        return np.unpackbits(packed, count=info.numel).astype(bool).reshape(info.shape)

    def reference_mask(self, param: str | int | ParamInfo, which: str) -> np.ndarray:
        """``principal``, ``low`` or ``principal_not_low`` mask (m, n) bool."""
        info = self.param(param)
        row = schema.REFERENCE_MASKS.index(which)
        reader = self._reader(f"{schema.REFERENCE_PREFIX}/{info.id}", unit="row")
        if reader is None:
            raise schema.StoreDamagedError(f"{self.path / schema.REFERENCE_PREFIX / info.id} is missing (the store is damaged)")
        packed = reader.read(row, row + 1)[0]
        return np.unpackbits(packed, count=info.numel).astype(bool).reshape(info.shape)

    def row_counts(self, param: str | int | ParamInfo) -> np.ndarray:
        """Changed count per row (T, m); divide by n for the row ratio rho (Sec. 2.2)."""
        return self._profile(schema.ROWS_PREFIX, self.param(param))

    def col_counts(self, param: str | int | ParamInfo) -> np.ndarray:
        """Changed count per column (T, n); divide by m for the column ratio kappa (Sec. 2.2)."""
        return self._profile(schema.COLS_PREFIX, self.param(param))

    # -- previews ---------------------------------------------------------------
    def preview_edges(self, param: str | int | ParamInfo) -> tuple[np.ndarray, np.ndarray]:
        """Block edges (row_edges (bh+1,), col_edges (bw+1,)) of a matrix's preview grid.

        Block (i, j) covers rows ``row_edges[i]:row_edges[i+1]`` and columns
        ``col_edges[j]:col_edges[j+1]`` (see ``codec.preview_edges``).
        """
        info = self.param(param)
        array = self._array(f"{schema.PREVIEW_PREFIX}/{info.id}")
        if array is not None and "row_edges" in array.attrs:
            return np.asarray(array.attrs["row_edges"], dtype=np.int64), np.asarray(array.attrs["col_edges"], dtype=np.int64)
        return codec.preview_edges(*info.shape, schema.PREVIEW_MAX_BLOCKS)

    def preview_counts(self, param: str | int | ParamInfo, snapshot: int) -> np.ndarray:
        """Changed weights per preview block (bh, bw) int32 at a snapshot."""
        info = self.param(param)
        t = self._check_snapshot(snapshot)
        reader = self._reader(f"{schema.PREVIEW_PREFIX}/{info.id}", rows=t + 1)
        if reader is None:  # schema 1 stored no previews: derive from the mask
            rows, cols = self.preview_edges(info)
            return codec.preview_counts(self.packed_mask(info, t), info.shape, rows, cols)
        return reader.read(t, t + 1)[0]

    def preview(self, param: str | int | ParamInfo, snapshot: int) -> np.ndarray:
        """Density of changed weights per block (bh, bw) float64 at a snapshot (bh, bw <= 32)."""
        rows, cols = self.preview_edges(param)
        area = np.diff(rows)[:, None] * np.diff(cols)[None, :]
        return self.preview_counts(param, snapshot) / np.maximum(area, 1)

    def time_arrays(self) -> list[str]:
        """Paths of the store's time-indexed arrays present (run-level, then per matrix)."""
        names = [schema.STEPS, schema.TIMES, schema.COUNTS, schema.NULL_OVERLAP, schema.FRAMES, schema.SPECTRAL, *schema.SPECTRAL_DETAIL]
        names += [f"{prefix}/{p.id}" for p in self.params for prefix in (schema.CHANGED_PREFIX, schema.ROWS_PREFIX, schema.COLS_PREFIX, schema.PREVIEW_PREFIX)]
        return [name for name in names if self._array(name) is not None]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the time-indexed array ``name`` (checked; ``stop`` <= committed snapshots).

        Raises:
            StoreDamagedError: a chunk is missing or corrupt; IndexError: beyond the committed snapshots.
        """
        if not 0 <= start <= stop <= self.num_snapshots:
            raise IndexError(f"rows {start}:{stop} of {name}: {self.num_snapshots} committed snapshots")
        reader = self._reader(name, rows=stop)
        if reader is None:
            raise KeyError(f"no array {name!r} in {self.path}")
        return reader.read(start, stop)

    def check_chunks_present(self, snapshots: int | None = None) -> None:
        """Raise unless every chunk of the first ``snapshots`` (default: all committed) exists, in every array.

        Raises:
            StoreDamagedError: the commit covers more rows than an array holds, or a chunk file is missing.
        """
        t = self.num_snapshots if snapshots is None else snapshots
        for name in self.time_arrays():
            reader = self._reader(name, rows=t)
            assert reader is not None
            reader.check_present(t)
        if not self.num_snapshots:
            return  # the base may not be written yet
        static = [schema.BASE_FINGERPRINT, schema.BASE_CLASS_COUNTS] + [f"{schema.REFERENCE_PREFIX}/{p.id}" for p in self.params]
        if self.commit.get("base_weights", False):
            static += [f"{schema.BASE_WEIGHTS_PREFIX}/{p.id}" for p in self.params]
        for name in static:
            reader = self._reader(name, unit="row")
            if reader is None:
                raise schema.StoreDamagedError(f"{self.path / name} is missing (the store is damaged)")
            reader.check_present(reader.shape[0])

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, params={len(self.params)}, snapshots={self.num_snapshots})"
