"""Drill-down into one matrix: mask density map, row/column profiles, overlaps over time, spectral drift."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState, get_current_worker
from textual_plotext import PlotextPlot

from .. import palette
from ..data import HEAD_TYPES, RunView, head_boundaries, matrix_head_dim, overlap_series, row_label
from ..source import density_grid, preview_grid, profiles_at, spectral_series
from ..timeline import Selection
from ..widgets.badge import badge_text
from ..widgets.density_map import DensityMap
from ..widgets.details import fmt

__all__ = ["MatrixScreen"]

_MASK_NAMES = ("principal", "low", "principal_not_low")
_TABS = ("mask", "profiles", "overlap", "spectral")


def profile_snapshots(t: int) -> list[int]:
    """The cursor's snapshot and two earlier ones (a third and two thirds of the way), as in the paper's Fig. 3."""
    return sorted({t // 3, (2 * t) // 3, t})


def profile_ticks(size: int, boundaries: list[int], *, most: int = 8) -> list[int]:
    """Whole-number x ticks of a profile of ``size`` rows or columns: head starts when there are few, else even steps."""
    if size <= 0:
        return []
    if boundaries and len(boundaries) + 1 <= most:
        return [0, *boundaries]
    step = max(1, -(-size // most))
    # a round step (1, 2, 5 x 10^k) so that the labels read as row numbers
    magnitude = 10 ** (len(str(step)) - 1)
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= step)
    return list(range(0, size, step))


class MatrixScreen(Screen):
    """One matrix at the selected snapshot.

    It shares the run screen's :class:`Selection` (scrubbing or changing the matrix
    here moves the run screen's cursor too) and is handed new data by
    :meth:`data_changed`; it never holds the run screen.

    Args:
        selection: the run's selection (snapshot, matrix, shown rows).
        view, run: the run's metrics and reader.
        status: the run's status word for the header badge (LIVE, PAUSED, ...).
    """

    BINDINGS = [
        Binding("left", "scrub(-1)", "earlier snapshot (pauses)", show=False, priority=True),
        Binding("right", "scrub(1)", "later snapshot (pauses)", show=False, priority=True),
        Binding("home", "home", "first snapshot", show=False, priority=True),
        Binding("end", "end", "last snapshot", show=False, priority=True),
        Binding("f", "follow", "follow live"),
        Binding("up", "matrix(-1)", "previous matrix", show=False),
        Binding("down", "matrix(1)", "next matrix", show=False),
        Binding("x", "mode", "base/flips"),
        Binding("o", "series", "next series"),
        Binding("1", "tab('mask')", "mask", show=False),
        Binding("2", "tab('profiles')", "profiles", show=False),
        Binding("3", "tab('overlap')", "overlap", show=False),
        Binding("4", "tab('spectral')", "spectral", show=False),
        Binding("escape", "back", "back"),
    ]

    def __init__(self, selection: Selection, view: RunView, run: Any, *, status: Callable[[], str]) -> None:
        super().__init__()
        self.selection = selection
        self.view = view
        self.run = run
        self.status = status
        self.mode = "base"
        self.series = 0
        self.spectral_index = 0
        self._spectral: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._spectral_of: int | None = None
        self.shown: set[str] = set()  # parts drawn at least once: mask, profiles, spectral

    @property
    def index(self) -> int:
        """Store index of the selected matrix."""
        return int(self.selection.matrix) if self.selection.matrix is not None else 0

    @property
    def t(self) -> int:
        return self.selection.timeline.position

    @property
    def info(self):
        return self.view.params[self.index]

    def compose(self) -> ComposeResult:
        yield Static(id="matrix-header", classes="header")
        with TabbedContent(id="tabs", initial="mask"):
            with TabPane("1 mask", id="mask"):
                yield DensityMap(id="density")
                yield Static(id="mask-legend", classes="hint")
            with TabPane("2 profiles", id="profiles"):
                yield PlotextPlot(id="rows-plot")
                yield PlotextPlot(id="cols-plot")
            with TabPane("3 overlap", id="overlap"):
                yield PlotextPlot(id="overlap-plot")
                yield Static(id="overlap-table", classes="hint")
            with TabPane("4 spectral", id="spectral"):
                yield PlotextPlot(id="spectral-plot")
                yield Static(id="spectral-note", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.selection_changed()

    def on_resize(self) -> None:
        self.call_after_refresh(self.load_mask)

    # -- updates from the run screen ----------------------------------------------------
    def data_changed(self, view: RunView, run: Any) -> None:
        self.view, self.run = view, run
        self._spectral_of = None
        self.selection_changed()

    def selection_changed(self) -> None:
        """Redraw for the current selection (a new snapshot or matrix, from here or from the run screen)."""
        if self._spectral_of != self.index:
            self._spectral_of = self.index
            self._spectral = {}
            self.load_spectral(self.run, self.info)
        self.refresh_all()
        if self._spectral:
            self._show_spectral((self.index, self._spectral))

    def refresh_all(self) -> None:
        self.refresh_header()
        self.load_mask()
        self.load_profiles()
        self.draw_overlap()

    def refresh_header(self) -> None:
        p = self.info
        t = self.t
        text = Text()
        text.append(f" {row_label(p)} ", style="bold reverse")
        text.append(f" {p.name} {p.shape[0]}x{p.shape[1]}  ")
        text.append_text(badge_text(self.status()))
        if self.view.num_snapshots:
            text.append(f"  step {int(self.view.steps[t])} ({t + 1}/{self.view.num_snapshots})", style="bold")
            text.append(f"  changed {fmt(self.view.density[t, self.index])}")
        self.query_one("#matrix-header", Static).update(text)

    # -- mask ------------------------------------------------------------------------------
    def load_mask(self) -> None:
        density = self.query_one("#density", DensityMap)
        if density.size.width < 2 or density.size.height < 2:
            return
        rows, cols = density.grid_size()
        self._mask_worker(self.run, self.info, self.t, self.mode, rows, cols)

    @work(thread=True, exclusive=True, group="mask", exit_on_error=False, name="mask")
    def _mask_worker(self, run: Any, info: Any, t: int, mode: str, rows: int, cols: int) -> tuple:
        if mode == "base":  # the store's coarse preview first: no mask decoding
            preview = preview_grid(run, info, t)
            if preview is not None and not get_current_worker().is_cancelled:
                self.app.call_from_thread(self._show_mask, (info.index, t, mode, preview))
        return (info.index, t, mode, density_grid(run, info, t, rows, cols, mode=mode))

    def _show_mask(self, result: tuple) -> None:
        index, t, mode, grid = result
        if index != self.index or t != self.t or mode != self.mode:
            return
        p = self.info
        head_dim = matrix_head_dim(p, self.run.attrs, self.app.head_dim)
        m, n = p.shape
        values = grid.values
        rows, cols = values.shape
        row_heads = {grid.block_of(b, "rows") for b in head_boundaries(p, head_dim, "rows")}
        col_heads = {grid.block_of(b, "cols") for b in head_boundaries(p, head_dim, "cols")}
        hi = 1.0 if mode == "base" else max(0.05, float(np.nanmax(values)) if values.size else 1.0)
        self.query_one("#density", DensityMap).show(values, row_heads=row_heads, col_heads=col_heads, lo=0.0, hi=hi)
        legend = Text()
        what = "changed vs base (M)" if mode == "base" else "flips vs previous snapshot (M_t xor M_t-1)"
        legend.append(f" {what}, block density ", style="bold")
        for segment, style in palette.legend(0.0, hi, fmt="{:.2g}"):
            legend.append(segment, style=style)
        legend.append(f"  {m / rows:.0f}x{n / cols:.0f} weights per half-cell")
        if not grid.exact:
            legend.append("  (preview, refining...)", style="yellow")
        if row_heads or col_heads:
            legend.append(f"  ╶ ╷ heads of {head_dim}", style="grey70")
        elif head_dim is None and p.module_type in HEAD_TYPES:
            legend.append("  heads: size not recorded (--head-dim N)", style="grey70")
        legend.append("  x: toggle", style="grey70")
        self.query_one("#mask-legend", Static).update(legend)
        if grid.exact:
            self.shown.add("mask")

    # -- profiles ---------------------------------------------------------------------------
    def load_profiles(self) -> None:
        if self.view.num_snapshots:
            self._profiles_worker(self.run, self.info, profile_snapshots(self.t))

    @work(thread=True, exclusive=True, group="profiles", exit_on_error=False, name="profiles")
    def _profiles_worker(self, run: Any, info: Any, snaps: list[int]) -> tuple:
        rows, cols = profiles_at(run, info, snaps)
        return (info.index, snaps, rows, cols)

    def _show_profiles(self, result: tuple) -> None:
        index, snaps, rows, cols = result
        if index != self.index or snaps != profile_snapshots(self.t):
            return  # a result for an earlier selection: the worker for the current one is on its way
        p = self.info
        head_dim = matrix_head_dim(p, self.run.attrs, self.app.head_dim)
        colours = ("grey", "cyan", "yellow")[3 - len(snaps):]
        # The legend goes in the title: plotext draws its legend box over the data.
        legend = ", ".join(f"{c} step {int(self.view.steps[t])}" for c, t in zip(colours, snaps))
        for plot_id, data, axis, title in (("#rows-plot", rows, "rows", "row ratio rho_i"), ("#cols-plot", cols, "cols", "column ratio kappa_j")):
            plot = self.query_one(plot_id, PlotextPlot)
            plt = plot.plt
            plt.clear_data()
            plt.clear_figure()
            for colour, values in zip(colours, data):
                plt.plot(list(range(len(values))), values.tolist(), marker="braille", color=colour)
            bounds = head_boundaries(p, head_dim, axis)
            for b in bounds:
                plt.vline(b, "gray")
            size = data.shape[1] if data.ndim == 2 else 0
            plt.xticks(profile_ticks(size, bounds))
            heads = f", heads of {head_dim}" if bounds else ""
            plt.title(f"{title} per {'output row' if axis == 'rows' else 'input column'}{heads}: {legend}")
            plt.ylim(0, max(0.05, float(np.max(data)) * 1.05) if data.size else 1)
            plot.refresh()
        self.shown.add("profiles")

    # -- overlap ------------------------------------------------------------------------------
    def draw_overlap(self) -> None:
        if not self.view.num_snapshots:
            return
        all_series = overlap_series(self.view, self.index)
        series = all_series[self.series]
        steps = self.view.steps.tolist()
        plot = self.query_one("#overlap-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.plot(steps, np.nan_to_num(series.observed, nan=0.0).tolist(), marker="braille", color="cyan", label="observed")
        plt.plot(steps, series.random.tolist(), marker="braille", color="gray", label="random (density of X)")
        if series.null is not None:
            plt.plot(steps, np.nan_to_num(series.null, nan=0.0).tolist(), marker="braille", color="magenta", label="precision null")
        plt.vline(steps[self.t], "yellow")
        plt.title(f"overlap |X∩M|/|M|, X = {series.name}   (o: next mask)")
        plt.ylim(0, 1)
        plot.refresh()
        table = Text()
        table.append(f" at step {steps[self.t]}: ", style="bold")
        for s in all_series:
            null = None if s.null is None else s.null[self.t]
            table.append(f"{s.name} {fmt(s.observed[self.t])} (rand {fmt(s.random[self.t])}, null {fmt(null)})  ")
        self.query_one("#overlap-table", Static).update(table)

    # -- spectral -------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="spectral", exit_on_error=False, name="spectral")
    def load_spectral(self, run: Any, info: Any) -> tuple:
        return (info.index, spectral_series(run, info))

    def _show_spectral(self, result: tuple) -> None:
        index, series = result
        if index != self.index:
            return
        self._spectral = series
        self.shown.add("spectral")
        note = self.query_one("#spectral-note", Static)
        plot = self.query_one("#spectral-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        if not series:
            plot.display = False
            note.update(" this run has no spectral metrics (NSS, principal angles): it was recorded without them")
            return
        plot.display = True
        names = sorted(series)
        name = names[self.spectral_index % len(names)]
        steps, values = series[name]
        plt.plot(steps.tolist(), np.nan_to_num(values).tolist(), marker="braille", color="cyan", label=name)
        if self.view.num_snapshots:
            plt.vline(int(self.view.steps[self.t]), "yellow")
        plt.title(f"{name} over time   (o: next of {', '.join(names)})")
        plot.refresh()
        last = values[steps <= self.view.steps[self.t]] if self.view.num_snapshots else values
        value = f"{float(last[-1]):.4g}" if len(last) and np.isfinite(last[-1]) else "-"
        note.update(f" {name} at step {int(self.view.steps[self.t])}: {value}")

    # -- worker results ----------------------------------------------------------------------------
    @on(Worker.StateChanged)
    def on_worker_done(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state == WorkerState.ERROR:
            self.notify(f"{worker.name}: {worker.error}", severity="error", title="read failed")
            return
        if event.state != WorkerState.SUCCESS or worker.result is None:
            return
        {"mask": self._show_mask, "profiles": self._show_profiles, "spectral": self._show_spectral}[worker.name](worker.result)

    # -- actions ------------------------------------------------------------------------------------
    def _moved(self) -> None:
        # The run screen redraws itself from the shared selection when it is shown again.
        self.selection_changed()

    def action_scrub(self, delta: int) -> None:
        self.selection.timeline.step(delta)
        self._moved()

    def action_home(self) -> None:
        self.selection.timeline.home()
        self._moved()

    def action_end(self) -> None:
        self.selection.timeline.end()
        self._moved()

    def action_follow(self) -> None:
        self.selection.timeline.follow()
        self._moved()

    def action_matrix(self, delta: int) -> None:
        self.selection.move(delta)
        self._moved()

    def action_mode(self) -> None:
        self.mode = "flips" if self.mode == "base" else "base"
        self.query_one("#density", DensityMap).show_message("loading...")
        self.load_mask()

    def action_series(self) -> None:
        if self.query_one("#tabs", TabbedContent).active == "spectral" and self._spectral:
            self.spectral_index += 1
            self._show_spectral((self.index, self._spectral))
        else:
            self.series = (self.series + 1) % len(_MASK_NAMES)
            self.draw_overlap()

    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab
        self.call_after_refresh(self.load_mask)

    def action_back(self) -> None:
        self.dismiss(None)
