"""``compass-monitor report``: every figure of one or more runs, with an index page.

Figures (PNG + SVG each, numbers from :mod:`.series` and :mod:`.crossrun`):

1. ``sparsity``: update sparsity over steps and flips between snapshots; ``sparsity_by_type``;
2. ``overlaps``: the three overlaps over steps with random baseline and precision null, and per type at the end;
3. ``profiles_rows`` / ``profiles_cols`` per module type, ``profiles_matrices`` for the chosen matrices;
4. ``mask_1``, ``mask_2``, ...: mask images of the chosen matrices (changed vs W0, flips vs previous);
5. ``spectral`` (``spectral_A``, ... for several runs), when stored;
6. with two or more runs of one base: ``jaccard`` and ``consensus``.

Several runs must share a base model (checked before anything is drawn); per-run
views are drawn at each run's snapshot at the last aligned step (the rule of
:mod:`.crossrun`), time series over each run's own steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..store import ParamInfo, Run, open_run
from ..store.schema import StoreError
from ..tui.data import head_boundaries
from . import figures_cross, figures_matrix, figures_time, series
from .compare_table import run_letters
from .crossrun import CrossRunStats, consensus_map, cross_run_stats, run_labels
from .index import RunRow, write_index
from .render import FigureEntry, save, styled

__all__ = ["ReportConfig", "Report", "ReportError", "build_report"]

log = logging.getLogger(__name__)

_MAX_MASK_RUNS = 4  # mask images of at most this many runs per figure (rows)


class ReportError(StoreError):
    """A report cannot be made from these runs (the message says why and what to do)."""


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """What the report draws.

    Attributes:
        matrices: names of the matrices whose profiles, masks and consensus maps are drawn
            (default: the most changed q, o and down matrices).
        head_dim: attention head size when a run's metadata records none (default: no head lines).
        max_image_side: mask and consensus images are reduced to at most this many pixels a side.
    """

    matrices: tuple[str, ...] = ()
    head_dim: int | None = None
    max_image_side: int = 256

    def __post_init__(self) -> None:
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"ReportConfig.head_dim must be > 0, got {self.head_dim!r}")
        if self.max_image_side < 8:
            raise ValueError(f"ReportConfig.max_image_side must be >= 8, got {self.max_image_side!r}")


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote."""

    out: Path
    figures: list[FigureEntry]
    notes: list[str]
    index: tuple[Path, Path]
    cross: CrossRunStats | None = field(default=None, repr=False)


def _status(run: Run) -> str:
    return "stale" if run.is_stale else run.status


def _open(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Run], list[str]]:
    runs = [open_run(p) for p in paths]
    labels = run_labels([run.path for run in runs])
    for run, label in zip(runs, labels):
        if run.num_snapshots == 0:
            raise ReportError(f"{label} ({run.path}) has no committed snapshot yet; report on it once it has stored one")
    return runs, labels


def _chosen(runs: list[Run], labels: list[str], names: Sequence[str]) -> list[list[ParamInfo]]:
    """The chosen matrices in each run (paired by name with the first run's choice)."""
    first = series.choose_matrices(runs[0], list(names) or None)
    out = []
    for run, label in zip(runs, labels):
        try:
            out.append([run.param(p.name) for p in first])
        except KeyError as exc:
            raise ReportError(f"{label} does not monitor a chosen matrix: {exc.args[0]}") from None
    return out


def build_report(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, config: ReportConfig | None = None) -> Report:
    """Draw every figure of the runs at ``paths`` into ``out`` (created if needed) and write the index.

    Raises:
        ReportError: a run has no snapshot, or does not monitor a chosen matrix.
        CrossRunError: several runs of different bases or models (nothing is drawn).
        NotARunError, SchemaVersionError: a path is not a readable run store.
        KeyError: a ``config.matrices`` name is not monitored.
    """
    config = config or ReportConfig()
    runs, labels = _open(paths)
    stats = cross_run_stats(runs, labels=labels) if len(runs) > 1 else None  # refuses different bases first
    snapshots = [int(t) for t in stats.snapshots] if stats is not None else [runs[0].num_snapshots - 1]
    chosen = _chosen(runs, labels, config.matrices)
    heads = [series.head_dim(run, config.head_dim) for run in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[FigureEntry] = []
    notes: list[str] = []
    if stats is not None:
        notes.append(f"Runs of one base model; snapshots {stats.alignment.describe()}; per-run views at step {stats.step}.")

    def emit(name: str, title: str, drawn: tuple) -> None:
        fig, reading = drawn
        entries.append(FigureEntry(name, title, reading, save(fig, out, name)))
        log.info("wrote %s", name)

    with styled():
        sparsity = [(label, series.sparsity_series(run)) for label, run in zip(labels, runs)]
        emit("sparsity", "Update sparsity and flips over optimizer steps", figures_time.sparsity_figure(sparsity))
        emit("sparsity_by_type", "Update sparsity per module type", figures_time.sparsity_by_type_figure(sparsity))
        overlaps = [(label, series.overlap_series(run)) for label, run in zip(labels, runs)]
        emit("overlaps", "Overlap with principal / low / principal-not-low masks vs random baseline and precision null",
             figures_time.overlap_figure(overlaps))

        step = int(runs[0].steps[snapshots[0]])
        for axis, word in (("rows", "Row"), ("cols", "Column")):
            per_type = [(label, series.type_profiles(run, t, head_size=h)) for label, run, t, h in zip(labels, runs, snapshots, heads)]
            emit(f"profiles_{axis}", f"{word} update ratios per module type", figures_matrix.type_profiles_figure(per_type, axis, step))
        if chosen[0]:
            profiles = [(label, [series.matrix_profiles(run, p, t, head_size=h) for p in ps])
                        for label, run, ps, t, h in zip(labels, runs, chosen, snapshots, heads)]
            emit("profiles_matrices", "Row and column update ratios of the chosen matrices", figures_matrix.matrix_profiles_figure(profiles, step))
        if len(runs) > _MAX_MASK_RUNS:
            notes.append(f"Mask images show the first {_MAX_MASK_RUNS} runs.")
        for k, p in enumerate(chosen[0], start=1):
            images = [(label, series.mask_images(run, ps[k - 1], t, max_side=config.max_image_side))
                      for label, run, ps, t in list(zip(labels, runs, chosen, snapshots))[:_MAX_MASK_RUNS]]
            emit(f"mask_{k}", f"Mask of {p.name}: changed vs W0 and flips vs the previous snapshot",
                 figures_matrix.mask_figure(images, row_heads=head_boundaries(p, heads[0], "rows"),
                                            col_heads=head_boundaries(p, heads[0], "cols")))

        letters = run_letters(len(runs))
        for letter, label, run in zip(letters, labels, runs):
            spectral = series.spectral_series(run)
            name = "spectral" if len(runs) == 1 else f"spectral_{letter}"
            if spectral is None:
                notes.append(f"{label}: no spectral diagnostics stored (MonitorConfig spectral off), so no spectral figure.")
                continue
            emit(name, f"Spectral drift of {label}: NSS, principal angles, top-k energy", figures_time.spectral_figure(label, spectral))

        if stats is not None:
            emit("jaccard", "Cross-run Jaccard of the final masks vs the independent baseline", figures_cross.jaccard_figure(stats))
            maps = []
            position = {int(i): k for k, i in enumerate(stats.rows[0])}
            for p in chosen[0][:2]:
                k = position[p.index]
                image, block = series.reduce_image(consensus_map(runs, stats.rows[:, k], stats.snapshots), config.max_image_side)
                maps.append((p.name, image, block, head_boundaries(p, heads[0], "rows"), head_boundaries(p, heads[0], "cols")))
            emit("consensus", "Consensus ratio C = mean over runs of M: maps and histogram", figures_cross.consensus_figure(stats, maps))

    rows = [
        RunRow(letter, label, str(run.path), _status(run), run.num_snapshots, f"{int(run.steps[0])}..{int(run.steps[-1])}", len(run.params))
        for letter, label, run in zip(letters, labels, runs)
    ]
    title = f"compass-monitor report: {', '.join(labels)}"
    index = write_index(out, title=title, runs=rows, notes=notes, figures=entries)
    return Report(out, entries, notes, index, stats)
