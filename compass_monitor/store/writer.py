"""Writes a run store (Zarr v3, schema version 2) snapshot by snapshot.

Every array uses spec-standard codecs only (bytes + zstd), so any Zarr v3
reader opens it. Masks are stored as frames (``codec``): a key frame every
``key_interval`` snapshots, XOR deltas with the previous stored snapshot in
between, each as the smaller of packed bits and Rice-coded positions. Arrays
that grow along time are over-allocated geometrically (fewer metadata
rewrites) and trimmed at ``finalize``; every file is replaced atomically
(zarr's ``LocalStore`` writes a temporary file and renames it, and so does
``row_chunks``, which writes the per-snapshot rows), and the commit
file, written last, says how many snapshots are complete. A reader that trusts
only the commit file never sees a half-written snapshot; a writer killed at any
moment leaves every committed snapshot intact.

This class is not thread-safe: one thread writes (``async_writer.AsyncWriter``
runs it on a background thread for the monitor).
"""

from __future__ import annotations

import errno
import json
import re
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from ..matrix_spec import MatrixSpec
from . import codec, schema
from .commit import read_commit, write_commit, write_json_atomic, writer_identity
from .lock import WriterLock, locked_by_another
from .reader import open_run
from .row_chunks import RowChunks, remove_spares
from .spectral_arrays import fit_spectral_row, spectral_attributes, spectral_detail_k

__all__ = ["RunWriter", "SnapshotRecord", "check_target_free", "check_no_symlinks", "DEFAULT_KEY_INTERVAL"]

log = logging.getLogger(__name__)

# The zstd frame checksum makes every chunk check itself on read (``chunks``).
_ZSTD = ZstdCodec(level=1, checksum=True)
# Every chunk is written, also one equal to the fill value: a missing chunk is then damage.
_COMPLETE = {"write_empty_chunks": True}
_INITIAL_CAPACITY = 16  # rows allocated up front; growth doubles (trimming at finalize and resume deletes chunk keys one by one)
#: Default distance between key frames (snapshots); see ``MonitorConfig.key_interval``.
DEFAULT_KEY_INTERVAL = 32
# Rows of a base-weight chunk: about 2**21 int16 values (4 MiB before compression).
_BASE_CHUNK_VALUES = 1 << 21
_HISTORY_LIMIT = 200
#: Uncompressed bytes of one time-chunk of a per-snapshot array: small rows share a chunk file
#: (a long run of small matrices would otherwise make ~4 files per matrix per snapshot).
TIME_CHUNK_BYTES = 1 << 16
_MAX_TIME_CHUNK_ROWS = 64


def time_chunk_rows(row_nbytes: int, budget: int = TIME_CHUNK_BYTES) -> int:
    """Snapshots per chunk of an array whose row holds ``row_nbytes`` bytes (uncompressed).

    The largest power of two ``L <= 64`` with ``L * row_nbytes <= budget``, at least 1. Each
    snapshot rewrites its chunk whole (atomically, ``RowChunks``), so ``budget`` bounds the
    bytes re-encoded per array per snapshot; ``budget=0`` gives one snapshot per chunk
    (the layout of stores written before this rule).
    """
    rows = 1
    while rows < _MAX_TIME_CHUNK_ROWS and 2 * rows * max(1, row_nbytes) <= budget:
        rows *= 2
    return rows


@dataclass(frozen=True)
class SnapshotRecord:
    """Everything one snapshot adds to the store (host arrays; not modified after hand-off)."""

    step: int
    wall_time: float
    counts: np.ndarray  # (P, len(COUNT_FIELDS)) int64
    null_overlap: np.ndarray  # (P, 3) float64
    rows: list[np.ndarray]  # per param (m,) int32
    cols: list[np.ndarray]  # per param (n,) int32
    packed: list[np.ndarray]  # per param (nbytes,) uint8, np.packbits of the flat mask
    spectral: np.ndarray | None = None  # (P, len(SPECTRAL_FIELDS)) float64, None = not computed
    #: The spectra of Fig. 4 (``schema.SPECTRAL_DETAIL``), None = not computed: (P, 2, K) degrees,
    #: (P, K) singular values of W_t, (P, K) of W_0; float64, NaN-padded past each matrix's k.
    spectral_angles: np.ndarray | None = None
    spectral_sv: np.ndarray | None = None
    spectral_sv_base: np.ndarray | None = None


#: Top-level entries a store's creation writes (an interrupted creation is cleared only if it holds nothing else).
_CREATED_ENTRIES = frozenset(
    {"zarr.json", schema.COMMIT_FILE, schema.LOCK_FILE, "snapshots", "metrics", "masks", "previews", "profiles", "base"}
)


#: zarr's LocalStore writes ``<name>.<uuid4 hex>.partial`` and renames it into place.
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _is_temporary(name: str) -> bool:
    """A file some writer was about to rename into place (ours: ``.<name>.tmp``; zarr's: ``<name>.<hex>.partial``)."""
    return (name.startswith(".") and (name.endswith(".tmp") or name.endswith(".partial"))) or bool(_ZARR_PARTIAL.search(name))


def check_creatable(root: Path) -> None:
    """What :meth:`RunWriter.create` checks before touching anything (reads only): the target is free,
    or holds only an interrupted creation (which create clears).

    Raises:
        StoreExistsError, StoreLockedError: as :func:`check_target_free`.
    """
    if not (root.is_dir() and _interrupted_creation(root)):
        check_target_free(root)


def check_target_free(path: Path) -> None:
    """Refuse a path that holds anything, a run least of all. Writes nothing.

    A directory holding only a writer lock (a creation that failed before
    writing anything) counts as empty.
    """
    if path.is_symlink() and not path.exists():
        raise schema.StoreExistsError(f"{path} is a dangling symlink; give a directory path for the run store")
    if path.exists() and not path.is_dir():
        raise schema.StoreExistsError(f"{path} is a file; give a directory path for the run store")
    if not path.is_dir():
        return
    entries = [e for e in os.listdir(path) if e != schema.LOCK_FILE and not _is_temporary(e)]
    if entries:
        if (path / "zarr.json").exists() or (path / schema.COMMIT_FILE).exists():
            locked = locked_by_another(path)
            if locked is not None:  # a live writer: name it (two creators racing, or a run in progress)
                raise locked
            raise schema.StoreExistsError(
                f"{path} already holds a run store; choose a new run directory, or pass resume=True to "
                "continue it (nothing was written, the existing run is untouched)"
            )
        raise schema.StoreExistsError(
            f"{path} exists and is not empty; choose a new or empty directory for the run store"
        )


def _interrupted_creation(path: Path) -> str | None:
    """Why the store at ``path`` is an interrupted creation that a new run may replace, or None.

    Called with the writer lock held, so its writer is gone. An interrupted
    creation holds only entries a creation writes, and no data: no commit file,
    or a ``running`` commit of zero snapshots without base weights.
    """
    entries = {e for e in os.listdir(path) if not _is_temporary(e)}
    if not entries - {schema.LOCK_FILE}:
        return None  # empty
    if not entries <= _CREATED_ENTRIES or any((path / e).is_symlink() for e in entries):
        return None
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8")) if "zarr.json" in entries else {}
    except (OSError, ValueError):
        return None
    if "zarr.json" in entries and (meta.get("attributes") or {}).get("format") != schema.FORMAT_NAME:
        return None
    try:
        commit = read_commit(path) if schema.COMMIT_FILE in entries else None
    except schema.StoreDamagedError:
        return None
    if commit is None:
        return "its creation was interrupted before its first commit"
    if commit.get("status") == "running" and not commit.get("snapshots") and not commit.get("base_weights"):
        return "its creation was interrupted before the base W0 was written (no snapshots)"
    return None


def _clear_interrupted_creation(path: Path) -> None:
    for name in os.listdir(path):
        if name == schema.LOCK_FILE:
            continue  # never deleted: another creator may be waiting on it
        full = path / name
        if full.is_dir() and not full.is_symlink():
            shutil.rmtree(full)
        else:
            full.unlink()


def check_no_symlinks(root: Path) -> None:
    """Refuse a store that holds a symlink anywhere below its root (a store never does; writing or
    deleting through one could touch files outside the store).

    Raises:
        StoreDamagedError: naming the first symlink found.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            if full.is_symlink():
                raise schema.StoreDamagedError(
                    f"{root}: {full.relative_to(root)} is a symlink (to {os.readlink(full)!r}); a run store holds none, "
                    "so it was modified: refusing to write through it"
                )


def _os_error(root: Path, action: str, exc: OSError) -> schema.StoreError:
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free disk space or choose another run_dir", errno.EROFS: "the file system is read-only; choose another run_dir",
            errno.EACCES: "no permission; choose another run_dir", errno.EDQUOT: "disk quota exceeded; free space or choose another run_dir"}
    return schema.StoreError(f"cannot {action} the run store at {root}: {reason}" + (f" ({hint[exc.errno]})" if exc.errno in hint else ""))


def _drop_consolidated(path: Path) -> None:
    """Remove consolidated metadata from the root ``zarr.json`` (it goes stale while a run grows)."""
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.pop("consolidated_metadata", None) is not None:
        write_json_atomic(meta_path, meta)


class RunWriter:
    """Creates (or reopens, to resume) a run store and appends committed snapshots to it."""

    def __init__(
        self, path: Path, group: zarr.Group, shapes: list[tuple[int, int]], *, key_interval: int, lock: WriterLock | None = None
    ) -> None:
        if key_interval < 1:
            raise ValueError(f"key_interval must be >= 1, got {key_interval!r}")
        self.path = path
        self._lock = lock
        self._group = group
        self._shapes = [(int(m), int(n)) for m, n in shapes]
        self.key_interval = int(key_interval)
        self._count = 0
        self._capacity = 0
        self._last_step: int | None = None
        self._growing: list[zarr.Array] = []
        # Open handles, so that appending never re-reads array metadata.
        self._per_param: list[tuple[zarr.Array, zarr.Array, zarr.Array, zarr.Array]] = []
        self._reference: list[zarr.Array] = []
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        #: Packed mask of the last stored snapshot, per parameter (deltas are taken against it).
        self.previous_packed: list[np.ndarray] = [np.zeros((m * n + 7) // 8, dtype=np.uint8) for m, n in self._shapes]
        self._status = "running"
        self._generation = 0
        self._gaps: list[list[int]] = []
        self._trailing_gap: list[int] = []  # the steps of the last gap entry (this session only)
        self._history: list[dict[str, Any]] = []
        self._base_weights = False
        self.heartbeat_interval: float | None = None

    # -- creation ----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        params: list[MatrixSpec],
        attributes: dict[str, Any],
        key_interval: int = DEFAULT_KEY_INTERVAL,
        time_chunk_bytes: int = TIME_CHUNK_BYTES,
    ) -> "RunWriter":
        """Create the store's group and arrays, and commit zero snapshots.

        ``time_chunk_bytes`` sets how many snapshots share a chunk file (:func:`time_chunk_rows`);
        0 writes one file per snapshot and array (benchmarks compare the two layouts).

        Takes the store's writer lock first (``lock``); a directory holding only an
        interrupted creation (no snapshots, no base weights, its writer gone) is
        cleared and created afresh.

        Raises:
            StoreExistsError: ``path`` is a file, a non-empty directory or an existing run.
            StoreLockedError: another process is creating or writing a store there.
            StoreError: the store cannot be written (disk full, read-only, no permission).
        """
        root = Path(path)
        check_creatable(root)  # early, before touching anything (reads only)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(root, "create", exc) from exc
        lock = WriterLock.acquire(root, purpose="creating")
        try:
            # The authoritative checks, under the lock (another creator may have finished meanwhile).
            why = _interrupted_creation(root)
            if why is not None:
                log.warning("compass-monitor: %s: replacing an earlier store there: %s", root, why)
                _clear_interrupted_creation(root)
            check_target_free(root)
        except BaseException as exc:
            lock.release()
            if isinstance(exc, OSError):
                raise _os_error(root, "create", exc) from exc
            raise
        try:
            return cls._create_locked(root, lock, params, attributes, key_interval, time_chunk_bytes)
        except BaseException as exc:
            try:  # a failed creation leaves nothing behind (but the free lock file)
                _clear_interrupted_creation(root)
            except OSError:
                pass
            lock.release()
            if isinstance(exc, OSError):
                raise _os_error(root, "create", exc) from exc
            raise

    @classmethod
    def _create_locked(
        cls, root: Path, lock: WriterLock, params: list[MatrixSpec], attributes: dict[str, Any], key_interval: int,
        time_chunk_bytes: int,
    ) -> "RunWriter":
        # All attributes in the group's first metadata write: zarr's ``attrs.update``
        # rewrites zarr.json once per key, and a reader polling a run being created
        # would see a half-described group (format but no schema_version).
        group_attributes = {
            "format": schema.FORMAT_NAME,
            "schema_version": schema.SCHEMA_VERSION,
            "params": [{**p.to_record(), "id": schema.param_id(i)} for i, p in enumerate(params)],
            "storage": {
                "key_interval": int(key_interval), "preview_max_blocks": schema.PREVIEW_MAX_BLOCKS, "complete_chunks": True,
                "time_chunk_bytes": int(time_chunk_bytes),
            },
            **attributes,
        }
        # (not ``open_group(mode="w-")``, which refuses a folder holding anything: the lock file)
        group = zarr.create_group(store=str(root), zarr_format=3, attributes=group_attributes, overwrite=False)
        writer = cls(root, group, [p.shape for p in params], key_interval=key_interval, lock=lock)
        writer._event("created")
        writer._create_arrays(time_chunk_bytes)
        writer._commit()
        return writer

    def _array(
        self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, fill: Any = 0,
        attributes: dict[str, Any] | None = None,
    ) -> zarr.Array:
        # "c.t.0" chunk keys: one flat folder per array, so a snapshot creates files, not folders.
        return self._group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, compressors=_ZSTD, fill_value=fill, attributes=attributes,
            chunk_key_encoding={"name": "default", "separator": "."},
        )

    def _create_arrays(self, time_chunk_bytes: int = TIME_CHUNK_BYTES) -> None:
        p = len(self._shapes)
        t = _INITIAL_CAPACITY

        def along_time(name: str, row: tuple[int, ...], dtype: str, fill: Any = 0, **kw: Any) -> zarr.Array:
            rows = time_chunk_rows(math.prod(row) * np.dtype(dtype).itemsize, time_chunk_bytes)
            return self._array(name, (t, *row), (rows, *row), dtype, fill, **kw)

        fields, masks, frame = len(schema.COUNT_FIELDS), len(schema.REFERENCE_MASKS), len(schema.FRAME_FIELDS)
        steps = self._array(schema.STEPS, (t,), (1024,), "int64", -1)
        times = self._array(schema.TIMES, (t,), (1024,), "float64", float("nan"))
        counts = along_time(schema.COUNTS, (p, fields), "int64")
        null = along_time(schema.NULL_OVERLAP, (p, masks), "float64", float("nan"))
        frames = along_time(schema.FRAMES, (p, frame), "int64")
        along_time(schema.SPECTRAL, (p, len(schema.SPECTRAL_FIELDS)), "float64", float("nan"), attributes=spectral_attributes())
        k = spectral_detail_k(dict(self._group.attrs))
        if k:
            for name, row in zip(schema.SPECTRAL_DETAIL, ((p, len(schema.SPECTRAL_SIDES), k), (p, k), (p, k))):
                along_time(name, row, "float64", float("nan"), attributes=spectral_attributes(name, k))
        for i, (m, n) in enumerate(self._shapes):
            pid = schema.param_id(i)
            nbytes = (m * n + 7) // 8
            self._array(f"{schema.REFERENCE_PREFIX}/{pid}", (masks, nbytes), (1, nbytes), "uint8")
            along_time(f"{schema.CHANGED_PREFIX}/{pid}", (nbytes,), "uint8")
            along_time(f"{schema.ROWS_PREFIX}/{pid}", (m,), "int32")
            along_time(f"{schema.COLS_PREFIX}/{pid}", (n,), "int32")
            rows, cols = codec.preview_edges(m, n, schema.PREVIEW_MAX_BLOCKS)
            along_time(
                f"{schema.PREVIEW_PREFIX}/{pid}", (rows.size - 1, cols.size - 1), "int32",
                attributes={"row_edges": rows.tolist(), "col_edges": cols.tolist()},
            )
        self._open_handles()
        del steps, times, counts, null, frames

    def _open_handles(self) -> None:
        g = self._group
        self._steps, self._times = g[schema.STEPS], g[schema.TIMES]
        self._counts, self._null, self._frames = g[schema.COUNTS], g[schema.NULL_OVERLAP], g[schema.FRAMES]
        self._growing = [self._steps, self._times, self._counts, self._null, self._frames]
        # Stores written before the spectral arrays existed (or with spectral off) resume without them.
        self._spectral = g[schema.SPECTRAL] if schema.SPECTRAL in g else None
        if self._spectral is not None:
            self._growing.append(self._spectral)
        self._spectral_detail = {name: g[name] for name in schema.SPECTRAL_DETAIL if name in g}
        self._growing += list(self._spectral_detail.values())
        self._per_param, self._reference, self._edges = [], [], []
        for i, (m, n) in enumerate(self._shapes):
            pid = schema.param_id(i)
            arrays = (
                g[f"{schema.CHANGED_PREFIX}/{pid}"],
                g[f"{schema.ROWS_PREFIX}/{pid}"],
                g[f"{schema.COLS_PREFIX}/{pid}"],
                g[f"{schema.PREVIEW_PREFIX}/{pid}"],
            )
            self._per_param.append(arrays)
            self._growing += arrays
            self._reference.append(g[f"{schema.REFERENCE_PREFIX}/{pid}"])
            attrs = arrays[3].attrs
            self._edges.append((np.asarray(attrs["row_edges"], dtype=np.int64), np.asarray(attrs["col_edges"], dtype=np.int64)))
        self._row_chunks = [tuple(RowChunks(a) for a in arrays) for arrays in self._per_param]
        self._run_rows = {
            "steps": RowChunks(self._steps), "times": RowChunks(self._times), "counts": RowChunks(self._counts),
            "null": RowChunks(self._null), "frames": RowChunks(self._frames),
        }
        if self._spectral is not None:
            self._run_rows["spectral"] = RowChunks(self._spectral)
        for name, array in self._spectral_detail.items():
            self._run_rows[name] = RowChunks(array)
        self._capacity = min(int(a.shape[0]) for a in self._growing)

    def write_base(
        self,
        *,
        fingerprints: np.ndarray,
        class_counts: np.ndarray,
        reference_packed: list[np.ndarray],
        base_codes: list[np.ndarray] | None = None,
        class_attributes: dict[str, Any] | None = None,
    ) -> None:
        """Store what is computed once from W0: fingerprints, precision-null classes (with
        ``class_attributes``, their layout and case, as the array's attributes), reference masks,
        and (if given) the canonical bf16 codes of W0 itself (int16, needed to resume)."""
        self._check_owner()
        for name, value in ((schema.BASE_FINGERPRINT, fingerprints), (schema.BASE_CLASS_COUNTS, class_counts)):
            value = np.asarray(value, dtype=np.int64)
            array = self._group.create_array(
                name, data=value, compressors=_ZSTD, overwrite=True, config=_COMPLETE
            )
            if name == schema.BASE_CLASS_COUNTS and class_attributes:
                array.attrs.update(class_attributes)
        for array, packed in zip(self._reference, reference_packed):
            rows = RowChunks(array)  # every row written (zarr skips a chunk equal to the fill value)
            for j, mask in enumerate(np.asarray(packed, dtype=np.uint8).reshape(array.shape)):
                rows.write(j, mask)
        if base_codes is not None:
            for i, ((m, n), codes) in enumerate(zip(self._shapes, base_codes)):
                rows = max(1, min(m, _BASE_CHUNK_VALUES // max(n, 1)))
                array = self._group.create_array(
                    f"{schema.BASE_WEIGHTS_PREFIX}/{schema.param_id(i)}",
                    shape=(m, n),
                    chunks=(rows, n),
                    dtype="int16",
                    compressors=_ZSTD,
                    fill_value=0,
                    overwrite=True,
                    config=_COMPLETE,
                )
                array[...] = np.asarray(codes, dtype=np.int16).reshape(m, n)
            self._base_weights = True
        self._commit()

    # -- reopening (resume) ---------------------------------------------------------
    @classmethod
    def open_existing(cls, path: str | os.PathLike[str], *, key_interval: int | None = None) -> "RunWriter":
        """Open an existing run store to continue it. Changes nothing until :meth:`resume`.

        Takes the store's writer lock first (from a writer of this process that was
        never closed too: that one is revoked).

        Raises:
            NotARunError: no run store at ``path``.
            StoreLockedError: another process writes the store.
            StoreDamagedError: a symlink inside the store, damaged metadata or commit file.
            StoreError: the store was written by another schema version.
        """
        root = Path(path)
        if not (root / "zarr.json").is_file():
            raise schema.NotARunError(f"{root} holds no run store to resume (no zarr.json)")
        lock = WriterLock.acquire(root, purpose="resuming", takeover=True)
        try:
            return cls._open_locked(root, lock, key_interval)
        except BaseException as exc:
            lock.release()
            if isinstance(exc, OSError):
                raise _os_error(root, "open", exc) from exc
            raise

    @classmethod
    def _open_locked(cls, root: Path, lock: WriterLock, key_interval: int | None) -> "RunWriter":
        check_no_symlinks(root)  # resizing deletes chunk files: never through a link out of the store
        try:
            group = zarr.open_group(store=str(root), mode="r+", use_consolidated=False)
            attrs = dict(group.attrs)
        except (ValueError, KeyError, TypeError) as exc:
            raise schema.StoreDamagedError(f"{root}: cannot read the store's metadata ({exc})") from exc
        if attrs.get("format") != schema.FORMAT_NAME:
            raise schema.NotARunError(f"{root} is not a compass-monitor run (format={attrs.get('format')!r})")
        if attrs.get("schema_version") != schema.SCHEMA_VERSION:
            raise schema.StoreError(
                f"{root} uses run-store schema {attrs.get('schema_version')!r}; resuming needs schema "
                f"{schema.SCHEMA_VERSION} (start a new run store)"
            )
        commit = read_commit(root)
        stored_interval = int(attrs.get("storage", {}).get("key_interval", DEFAULT_KEY_INTERVAL))
        shapes = [tuple(p["shape"]) for p in attrs["params"]]
        writer = cls(root, group, shapes, key_interval=key_interval or stored_interval, lock=lock)
        writer._open_handles()
        writer._count = int(commit.get("snapshots", 0))
        if writer._count > writer._capacity:
            raise schema.StoreDamagedError(
                f"{root / schema.COMMIT_FILE} says {writer._count} snapshots, but the arrays hold {writer._capacity} rows"
            )
        writer._last_step = commit.get("last_step")
        writer._status = str(commit.get("status", "running"))
        writer._generation = int(commit.get("generation", 0))
        writer._gaps = [list(g) for g in commit.get("gaps", [])]
        writer._history = list(commit.get("history", []))
        writer._base_weights = bool(commit.get("base_weights", False))
        return writer

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    @property
    def commit_state(self) -> dict[str, Any]:
        return self._commit_payload()

    def resume(self, keep: int, *, event: dict[str, Any]) -> None:
        """Continue the run after its first ``keep`` committed snapshots; later ones are dropped.

        Records ``event`` (with the number dropped) in the commit history, marks the
        run ``running`` again, and loads the kept last snapshot's masks as the base of
        the next delta frames.

        Raises:
            StoreDamagedError: a chunk of a kept snapshot is missing, or the kept last masks do not
                decode or disagree with their counts (nothing is changed).
        """
        if not 0 <= keep <= self._count:
            raise ValueError(f"cannot keep {keep} of {self._count} committed snapshots")
        self._check_owner()
        # Read (checked) before anything changes: a damaged store is refused untouched.
        run = open_run(self.path, check=False)
        run.check_chunks_present(keep)
        kept_masks = None
        if keep:
            for name in run.time_arrays():  # the kept last row of every array decodes
                run.read_rows(name, keep - 1, keep)
            kept_masks = [run.packed_mask(i, keep - 1) for i in range(len(self._shapes))]
        dropped = self._count - keep
        _drop_consolidated(self.path)
        steps = self._steps[:keep] if keep else np.zeros(0, dtype=np.int64)
        self._count = keep
        self._last_step = int(steps[-1]) if keep else None
        if dropped:
            self._generation += 1
            last = self._last_step if self._last_step is not None else -1
            self._gaps = [g for g in self._gaps if g[0] <= last]
        self._status = "running"
        self._event("resumed", dropped=dropped, kept=keep, **event)
        self._commit()
        # Arrays past the kept snapshots: trim (deletes their chunks), then grow again on append.
        for array in self._growing:
            if array.shape[0] > keep:
                array.resize((keep, *array.shape[1:]))
        for rows in self._all_row_writers():
            rows.reset()  # a cached partly-filled chunk may hold dropped rows
        self._capacity = keep
        if kept_masks is not None:
            self.previous_packed = kept_masks

    # -- appending ----------------------------------------------------------------------
    def _all_row_writers(self) -> list[RowChunks]:
        return [rows for per_param in self._row_chunks for rows in per_param] + list(self._run_rows.values())

    def _grow_to(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity, _INITIAL_CAPACITY)
        for array in self._growing:
            if array.shape[0] < capacity:
                array.resize((capacity, *array.shape[1:]))
        self._capacity = capacity

    def is_key(self, index: int) -> bool:
        """Whether the snapshot with this index is stored as a key frame."""
        return index % self.key_interval == 0

    def append(self, record: SnapshotRecord) -> None:
        """Write one snapshot's arrays, then commit it (the commit file is written last)."""
        self._check_owner()
        if self._last_step is not None and record.step <= self._last_step:
            raise schema.StoreError(f"snapshot steps must increase: got {record.step} after {self._last_step}")
        if len(record.packed) != len(self._shapes):
            raise schema.StoreError(f"snapshot has {len(record.packed)} masks, the store {len(self._shapes)}")
        self._unskip(int(record.step))
        t = self._count
        self._grow_to(t + 1)
        key = self.is_key(t)
        headers = np.zeros((len(self._shapes), len(schema.FRAME_FIELDS)), dtype=np.int64)
        writes: list[tuple[RowChunks, Any]] = []
        for i, ((m, n), arrays, packed, row, col) in enumerate(zip(self._shapes, self._per_param, record.packed, record.rows, record.cols)):
            changed = arrays[0]
            changed_rows, rows, cols, preview = self._row_chunks[i]
            numel = m * n
            packed = np.asarray(packed, dtype=np.uint8)
            if packed.size != changed.shape[1]:
                raise schema.StoreError(f"mask {i} has {packed.size} bytes, the store expects {changed.shape[1]}")
            source = packed if key else np.bitwise_xor(packed, self.previous_packed[i])
            frame = codec.encode_frame(source, numel, delta=not key)
            headers[i] = frame.header()
            buffer = np.zeros((1, changed.shape[1]), dtype=np.uint8)  # zero tail: a few bytes after zstd
            buffer[0, : frame.payload.size] = frame.payload
            edges = self._edges[i]
            writes += [
                (changed_rows, buffer),
                (rows, np.asarray(row, dtype=np.int32).reshape(1, m)),
                (cols, np.asarray(col, dtype=np.int32).reshape(1, n)),
                (preview, codec.preview_counts(packed, (m, n), edges[0], edges[1])[None]),
            ]
        writes += [
            (self._run_rows["frames"], headers[None]),
            (self._run_rows["counts"], np.asarray(record.counts, dtype=np.int64)[None]),
            (self._run_rows["null"], np.asarray(record.null_overlap, dtype=np.float64)[None]),
            (self._run_rows["times"], np.array([record.wall_time], dtype=np.float64)),
            (self._run_rows["steps"], np.array([record.step], dtype=np.int64)),
        ]
        if self._spectral is not None:
            spectral = np.full(self._spectral.shape[1:], np.nan) if record.spectral is None else record.spectral
            writes.append((self._run_rows["spectral"], np.asarray(spectral, dtype=np.float64)[None]))
        detail = (record.spectral_angles, record.spectral_sv, record.spectral_sv_base)
        for (name, array), value in zip(((n, self._spectral_detail.get(n)) for n in schema.SPECTRAL_DETAIL), detail):
            if array is not None:
                writes.append((self._run_rows[name], fit_spectral_row(value, array.shape[1:], name)[None]))
        self._write_rows(t, writes)
        self._count = t + 1
        self._last_step = int(record.step)
        self._commit()
        # Only now is the snapshot the base of the next delta.
        self.previous_packed = [np.asarray(p, dtype=np.uint8) for p in record.packed]

    @staticmethod
    def _write_rows(t: int, writes: list[tuple[RowChunks, Any]]) -> None:
        """Write row t of several arrays (one chunk each; see ``row_chunks`` for why not zarr's setitem)."""
        for rows, value in writes:
            rows.write(t, value)

    def note_gap(self, step: int) -> None:
        """Record that the snapshot of ``step`` was not stored (the writer's queue was full).

        Consecutive skipped snapshots merge into one entry ``[first_step, last_step, count]``;
        the record is committed with the next commit (snapshot or heartbeat).
        """
        if self._gaps and (self._last_step is None or self._last_step < self._gaps[-1][1]):
            first, _, count = self._gaps[-1]  # nothing stored since the last gap: extend it
            self._gaps[-1] = [first, int(step), count + 1]
            self._trailing_gap.append(int(step))
        else:
            self._gaps.append([int(step), int(step), 1])
            self._trailing_gap = [int(step)]

    def _unskip(self, step: int) -> None:
        """A snapshot of a step recorded as skipped is stored after all (e.g. the last one, at close)."""
        if not self._gaps or self._gaps[-1][1] != step:
            return
        first, _, count = self._gaps[-1]
        if count == 1:
            self._gaps.pop()
        elif len(self._trailing_gap) >= 2 and self._trailing_gap[-1] == step:
            self._trailing_gap.pop()
            self._gaps[-1] = [first, self._trailing_gap[-1], count - 1]
        self._trailing_gap = []

    # -- commit -----------------------------------------------------------------------------
    def _event(self, name: str, **fields: Any) -> None:
        self._history.append({"event": name, "time": time.time(), "pid": os.getpid(), **fields})
        if len(self._history) > _HISTORY_LIMIT:  # keep the first (created) and the latest events
            self._history = self._history[:1] + self._history[-(_HISTORY_LIMIT - 1) :]

    def _commit_payload(self) -> dict[str, Any]:
        return {
            "snapshots": self._count,
            "last_step": self._last_step,
            "status": self._status,
            "heartbeat": time.time(),
            "heartbeat_interval": self.heartbeat_interval,
            "generation": self._generation,
            "key_interval": self.key_interval,
            "base_weights": self._base_weights,
            "writer": writer_identity(),
            "gaps": self._gaps,
            "history": self._history,
        }

    def _commit(self) -> None:
        self._check_owner()
        write_commit(self.path, self._commit_payload())

    def _check_owner(self) -> None:
        """Refuse to write once another writer of this process took the store over."""
        if self._lock is not None and self._lock.revoked:
            self._lock.check()

    def release(self) -> None:
        """Give up the store's writer lock (after :meth:`finalize`, or to stop writing). Idempotent."""
        if self._lock is not None and not self._lock.revoked:
            self._lock.release()

    @property
    def owns_store(self) -> bool:
        """Whether this writer still holds the store's lock (False once released or taken over)."""
        return self._lock is not None and self._lock.held

    def heartbeat(self) -> None:
        """Rewrite the commit file with a fresh heartbeat (and any gaps noted since the last commit)."""
        self._commit()

    @property
    def num_snapshots(self) -> int:
        return self._count

    @property
    def last_step(self) -> int | None:
        return self._last_step

    @property
    def status(self) -> str:
        return self._status

    def mark(self, status: str, **event: Any) -> None:
        """Record a run status (e.g. ``disabled``, with a ``reason``) without touching any array."""
        self._status = status
        self._event(status, **event)
        self._commit()

    def finalize(self, status: str = "finished") -> None:
        """Trim over-allocated arrays to the committed length, consolidate metadata, mark ``status``."""
        for array in self._growing:
            if array.shape[0] != self._count:
                array.resize((self._count, *array.shape[1:]))
            remove_spares(self.path / array.path)  # the old versions of shared chunks (RowChunks)
        self._capacity = self._count
        with warnings.catch_warnings():  # consolidated metadata is an extension that zarr warns about
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(self.path))
        self._status = status
        self._event(status, snapshots=self._count)
        self._commit()
        self.release()
