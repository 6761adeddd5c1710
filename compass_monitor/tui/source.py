"""A run as the TUI follows it: opened once, then kept current by cheap polls (no Textual).

:meth:`RunSource.poll` costs one ``stat`` of the commit file while nothing
changes. When the commit file changes it reads only the new snapshots' rows of
the per-snapshot metrics, so following a run with thousands of snapshots stays
cheap: ``Run.refresh()`` re-reads the commit file and extends the reader's
cached series by the new rows only. Density maps show the store's coarse
preview first (no mask decoding), then the exact map from the mask.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..store import ParamInfo, open_run
from ..store.schema import COMMIT_FILE, COUNT_FIELDS, COUNTS
from .data import RunStatus, RunView, block_density, describe_error, live_status, read_commit, writer_gone

#: snapshots read before the first paint of a run (about the widest heatmap); the rest follows
FIRST_PAINT_SNAPSHOTS = 256

__all__ = ["Grid", "RunSource", "StatusReader", "Update", "density_grid", "preview_grid", "profiles_at", "spectral_series"]


@dataclass(frozen=True)
class Update:
    """What a poll found: a new view (None if unchanged) and the commit file's content."""

    view: RunView | None
    commit: dict[str, Any]
    new_snapshots: int
    reloaded: bool


class RunSource:
    """One run store, followed by polling its commit file.

    Not thread-safe: one worker owns it. The :class:`RunView` objects it hands
    out are immutable and safe to pass to the UI thread.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.run: Any = None
        self.view: RunView | None = None
        self.commit: dict[str, Any] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._created: Any = None

    def _commit_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path / COMMIT_FILE)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> Update:
        """Open the run and read every committed snapshot's metrics.

        Raises:
            StoreError and zarr/OS errors: no run, a newer schema, a damaged store.
        """
        self._stamp = self._commit_stamp()
        self.run = open_run(self.path)
        self._created = self.run.attrs.get("run", {}).get("created")
        # The heatmap first: the latest snapshots' counts only; complete() reads the rest.
        self.view = RunView.load(self.run, with_null=False, tail=FIRST_PAINT_SNAPSHOTS)
        self.commit = dict(self.run.commit)
        return Update(self.view, self.commit, self.view.num_snapshots, True)

    def complete(self) -> RunView | None:
        """Read what :meth:`load` left for later (earlier snapshots, precision nulls); the new view, or None if nothing was missing."""
        if self.view is None or self.view.null is not None:
            return None
        t = self.view.num_snapshots
        counts = np.asarray(self.run.counts)[:t] if self.view.partial else self.view.counts
        null = np.asarray(self.run.null_overlap)[:t]
        self.view = dataclasses.replace(self.view, counts=counts, null=null, partial=False)
        return self.view

    def poll(self) -> Update:
        """Look for new commits; the reader reads only the new snapshots' rows."""
        stamp = self._commit_stamp()
        if stamp == self._stamp and self.view is not None:
            return Update(None, self.commit, 0, False)
        if self.view is None:
            return self.load()
        self.run.refresh()
        old, new = self.view.num_snapshots, self.run.num_snapshots
        if new < old or self.run.attrs.get("run", {}).get("created") != self._created:
            return self.load()  # the run was replaced or truncated (a resume that dropped snapshots)
        view = self.view
        if new > old:
            run = self.run
            view = view.extended(
                steps=np.asarray(run.steps)[old:new],
                times=np.asarray(run.times)[old:new],
                counts=np.asarray(run.counts)[old:new],
                null=None if view.null is None else np.asarray(run.null_overlap)[old:new],
            )
        self._stamp = stamp
        self.view, self.commit = view, dict(self.run.commit)
        return Update(view if new > old else None, self.commit, new - old, False)


@dataclass(frozen=True)
class Grid:
    """Block densities of a mask with the block edges (row_edges (R+1,), col_edges (C+1,))."""

    values: np.ndarray
    row_edges: np.ndarray
    col_edges: np.ndarray
    exact: bool  # False for the store's coarse preview

    def block_of(self, index: int, axis: str) -> int:
        """The grid row (``axis="rows"``) or column holding matrix row/column ``index``."""
        edges = self.row_edges if axis == "rows" else self.col_edges
        return int(np.searchsorted(edges, index, side="right")) - 1


def preview_grid(run: Any, info: ParamInfo, snapshot: int) -> Grid | None:
    """The store's coarse block-density preview (at most 32 x 32 blocks, no mask decoding), if the reader has one."""
    if not hasattr(run, "preview"):
        return None
    rows, cols = run.preview_edges(info)
    return Grid(np.asarray(run.preview(info, snapshot), dtype=np.float64), rows, cols, exact=False)


def density_grid(run: Any, info: ParamInfo, snapshot: int, rows: int, cols: int, *, mode: str = "base") -> Grid:
    """Block densities of the changed mask (``mode="base"``) or of its flips since the previous snapshot (``"flips"``)."""
    mask = run.mask(info, snapshot)
    if mode == "flips":
        previous = run.mask(info, snapshot - 1) if snapshot > 0 else np.zeros_like(mask)
        mask = mask ^ previous
    elif mode != "base":
        raise ValueError(f"unknown density-map mode {mode!r}; expected base or flips")
    m, n = info.shape
    rows, cols = max(1, min(rows, m)), max(1, min(cols, n))
    return Grid(block_density(mask, rows, cols), np.linspace(0, m, rows + 1).astype(np.int64), np.linspace(0, n, cols + 1).astype(np.int64), exact=True)


def profiles_at(run: Any, info: ParamInfo, snapshots: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row ratios rho (len(snapshots), m) and column ratios kappa (len(snapshots), n) (Sec. 2.2, Fig. 3)."""
    m, n = info.shape
    rows = np.asarray(run.row_counts(info))[snapshots] / n
    cols = np.asarray(run.col_counts(info))[snapshots] / m
    return rows, cols


def spectral_series(run: Any, info: ParamInfo) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Spectral drift and angles of one matrix over time, if the run has them: ``{name: (steps, values)}``.

    Empty when the store holds no spectral arrays (runs written without them).
    """
    reader = getattr(run, "spectral", None)
    if callable(reader):
        try:
            found = reader(info)
        except (KeyError, LookupError):
            return {}
        return {k: (np.asarray(v[0]), np.asarray(v[1])) for k, v in dict(found or {}).items()}
    return {}


class StatusReader:
    """Run-list lines, re-read only when a run's commit file changes (one ``stat`` per run and poll otherwise)."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[Any, RunStatus]] = {}

    def status(self, path: Path, *, now: float, stale_after: float) -> RunStatus:
        try:
            st = os.stat(path / COMMIT_FILE)
            stamp: Any = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self._read(path))
            self._cache[path] = cached
        base = cached[1]
        if base.status in ("live", "stale", "crashed"):
            word = live_status("running", base.heartbeat, now, stale_after, writer_alive=not writer_gone(read_commit(path)))
            base = RunStatus(base.path, base.name, word, base.snapshots, base.last_step, base.heartbeat, base.sparsity)
        return base

    @staticmethod
    def _read(path: Path) -> RunStatus:
        commit = read_commit(path)
        heartbeat = commit.get("heartbeat")
        try:
            run = open_run(path)
            t = run.num_snapshots
            sparsity = float("nan")
            if t:
                last = run.read_rows(COUNTS, t - 1, t)[0]
                linear = [p.index for p in run.params if p.role == "linear"] or [p.index for p in run.params]
                numel = sum(run.params[i].numel for i in linear)
                sparsity = 1.0 - float(last[linear, COUNT_FIELDS.index("changed")].sum()) / numel
            name = str(run.attrs.get("run", {}).get("name", path.name))
        except Exception as exc:  # a damaged or foreign store is listed with its reason
            return RunStatus(path, path.name, "error", 0, None, heartbeat, float("nan"), error=describe_error(exc))
        status = str(commit.get("status", "unknown"))
        word = "live" if status == "running" else (status if status in ("finished", "disabled") else "unknown")
        return RunStatus(path, name, word, t, commit.get("last_step"), heartbeat, sparsity)
