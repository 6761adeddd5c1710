"""Runs of one base side by side: two runs as A | B (or A - B) with mask Jaccard, more as a consensus view.

Pairing follows ``compass_monitor.report.crossrun`` (the rules ``compass-monitor
compare`` states): matrices by name, snapshots by optimizer step (as of each
step of the run with fewest snapshots when no step is shared), and runs of
different bases are refused with the reason in the header.

The consensus view (default for three or more runs, ``k`` toggles it with two)
shows the runs' mean changed fraction per matrix and snapshot, and for the
selected matrix: each run's density, the pairwise Jaccard against the
independent baseline, the histogram of the consensus ratio C = k/R against
independence, and the map of C (paper Fig. 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState, get_current_worker

from ...report.crossrun import CrossRunError, GroupOverlap, align_steps, check_same_base, matrix_overlap, overlap_group, pair_matrices, run_labels
from .. import palette
from ..data import RunView, block_density, head_boundaries, matrix_head_dim, row_label, row_order
from ..messages import follow_posting
from ..messages import RunChanged, RunFailed
from ..timeline import Timeline
from ..widgets.density_map import DensityMap
from ..widgets.details import compare_details, fmt
from ..widgets.heatmap import Heatmap

__all__ = ["CompareScreen", "Pairing", "consensus_details"]

_BARS = 20  # width of the consensus histogram's bars


@dataclass(frozen=True)
class Pairing:
    """Shared matrices ``rows`` (R, P') and aligned snapshots ``snaps`` (R, S) at ``steps`` (S,) of R runs."""

    rows: np.ndarray
    snaps: np.ndarray
    steps: np.ndarray
    rule: str

    @property
    def by_step(self) -> bool:
        return self.rule == "step"

    @property
    def rows_a(self) -> list[int]:
        return self.rows[0].tolist()

    @property
    def rows_b(self) -> list[int]:
        return self.rows[1].tolist()

    @property
    def snaps_a(self) -> np.ndarray:
        return self.snaps[0]

    @property
    def snaps_b(self) -> np.ndarray:
        return self.snaps[1]


def consensus_details(
    labels: Sequence[str], views: Sequence[RunView], rows: np.ndarray, snaps: np.ndarray, group: GroupOverlap | None, *, note: str | None = None
) -> Text:
    """Per-run density, pairwise Jaccard vs the independent baseline and the consensus histogram of one matrix
    (``note`` in place of the overlaps when they are not defined)."""
    r = len(views)
    letters = [chr(ord("A") + i) if i < 26 else str(i + 1) for i in range(r)]
    p = views[0].params[int(rows[0])]
    text = Text()
    text.append(p.name + "\n", style="bold")
    text.append(f"{p.shape[0]}x{p.shape[1]}  {r} runs\n\n", style="grey70")
    text.append(f"{'run':<14}{'step':>7}{'|M|/n':>8}\n", style="grey70")
    for x, label, view, i, t in zip(letters, labels, views, rows, snaps):
        text.append(f"{x} {label[:11]:<12}{int(view.steps[t]):>7}{fmt(view.density[t, i], 4):>8}\n")
    if group is None:
        text.append(f"\n{note}\n" if note else "\ncomputing overlaps...\n", style="yellow" if note else "")
        return text
    text.append("\nJaccard |A∩B|/|A∪B| (independent)\n", style="grey70")
    for a in range(r):
        for b in range(a + 1, r):
            j, base = group.jaccard[a, b], group.baseline[a, b]
            style = "green" if j > base + 0.02 else ("magenta" if j < base - 0.02 else "")
            text.append(f"{letters[a]}-{letters[b]} ")
            text.append(f"{fmt(j)}", style=style)
            text.append(f" ({fmt(base)})\n", style="grey70")
    if r > 2:
        text.append(f"mean {fmt(group.mean_jaccard)} ({fmt(group.mean_baseline)})\n")
    total = max(group.numel, 1)
    peak = max(float(group.consensus.max()), float(group.consensus_expected.max()), 1.0)
    text.append(f"\nconsensus C=k/{r}: weights changed in k runs\n", style="grey70")
    text.append(f"{'k':>2}{'obs':>7}{'indep':>7}\n", style="grey70")
    for k in range(r + 1):
        observed, expected = group.consensus[k] / total, group.consensus_expected[k] / total
        bar = "█" * int(round(_BARS * group.consensus[k] / peak))
        text.append(f"{k:>2}{fmt(observed):>7}{fmt(expected):>7} ")
        text.append(bar + "\n", style="cyan")
    return text


class CompareScreen(Screen):
    """Runs side by side: matrices paired by name, snapshots paired by optimizer step."""

    DEFAULT_CSS = """
    CompareScreen #consensus-map { height: 14; width: 1fr; }
    CompareScreen #consensus-legend { height: auto; }
    """

    BINDINGS = [
        Binding("up", "move(-1)", "previous matrix", show=False),
        Binding("down", "move(1)", "next matrix", show=False),
        Binding("left", "scrub(-1)", "earlier snapshot", show=False),
        Binding("right", "scrub(1)", "later snapshot", show=False),
        Binding("home", "home", "first snapshot", show=False),
        Binding("end", "end", "last snapshot", show=False),
        Binding("f", "follow", "follow live"),
        Binding("d", "toggle_diff", "side by side / A-B"),
        Binding("k", "toggle_consensus", "consensus view"),
        Binding("escape", "back", "back"),
    ]

    def __init__(self, *paths: Path | str) -> None:
        super().__init__()
        if len(paths) < 2:
            raise ValueError(f"CompareScreen needs at least two runs, got {len(paths)}")
        self.keys = [chr(ord("a") + i) if i < 26 else f"r{i + 1}" for i in range(len(paths))]
        self.paths = {key: Path(p) for key, p in zip(self.keys, paths)}
        self.labels = run_labels(list(self.paths.values()))
        self.views: dict[str, RunView] = {}
        self.runs: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.alignment: Pairing | None = None
        self.order: list[int] = []  # positions in the alignment, in display order
        self.timeline = Timeline()
        self.diff = False
        self.consensus = len(paths) > 2
        self.base_error: str | None = None  # the runs start from different W0: no mask overlap
        self._jaccard: dict[tuple[int, int], tuple[float, float]] = {}
        self._overlaps: dict[tuple[int, int], tuple[GroupOverlap, np.ndarray]] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="compare-header", classes="header")
        with Horizontal(id="compare-body"):
            yield Heatmap(id="heat-a")
            yield Heatmap(id="heat-b", show_labels=False)
            yield Heatmap(id="heat-diff", diverging=True)
            with VerticalScroll(id="side"):
                yield Static(id="compare-details")
                yield DensityMap(id="consensus-map")
                yield Static(id="consensus-legend")
        yield Static(id="compare-hint", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self._show_panels()
        self.query_one("#heat-a", Heatmap).focus()
        for key in self.keys:
            self.follow_worker(key)
        self.refresh_header()

    @work(thread=True, exit_on_error=False, group="follow-compare")
    def follow_worker(self, key: str) -> None:
        worker = get_current_worker()
        follow_posting(self, key, self.paths[key], interval=self.app.poll_interval, cancelled=lambda: worker.is_cancelled)

    @on(RunChanged)
    def on_run_changed(self, message: RunChanged) -> None:
        message.stop()
        self.views[message.key] = message.view
        self.runs[message.key] = message.run
        self.errors.pop(message.key, None)
        if len(self.views) == len(self.keys):
            self._align()

    @on(RunFailed)
    def on_run_failed(self, message: RunFailed) -> None:
        message.stop()
        self.errors[message.key] = message.reason
        self.refresh_header()

    def _ordered_views(self) -> list[RunView]:
        return [self.views[key] for key in self.keys]

    def _align(self) -> None:
        views = self._ordered_views()
        try:
            rows = pair_matrices([v.params for v in views])
            steps = align_steps([v.steps for v in views])
        except CrossRunError as exc:
            self.errors["runs"] = str(exc)
            self.alignment = None
            for heatmap in self.query(Heatmap):
                heatmap.empty_text = "these runs cannot be compared (see the header)"
                heatmap.set_data(np.zeros((0, 0)), [], lo=0.0, hi=1.0)
            self._refresh_selection()
            return
        self.errors.pop("runs", None)
        try:  # densities of runs of different bases still compare; their masks do not
            check_same_base([self.runs[key] for key in self.keys], rows, self.labels)
            self.base_error = None
        except CrossRunError as exc:
            self.base_error = str(exc)
        self.alignment = al = Pairing(rows, steps.snapshots, steps.steps, steps.rule)
        position = {store: k for k, store in enumerate(al.rows_a)}
        self.order = [position[i] for i in row_order(views[0].params, view=views[0]) if i in position]
        self.timeline.grow(len(al.steps))
        labels = [row_label(views[0].params[al.rows[0, k]]) for k in self.order]
        densities = [v.density[np.ix_(al.snaps[r], al.rows[r, self.order])] for r, v in enumerate(views)]
        mean = np.mean(densities, axis=0)
        da, db = densities[0], densities[1]
        panels = (("#heat-a", mean if self.consensus else da, 0.0, 1.0), ("#heat-b", db, 0.0, 1.0), ("#heat-diff", da - db, -0.5, 0.5))
        for widget_id, values, lo, hi in panels:
            heatmap = self.query_one(widget_id, Heatmap)
            heatmap.set_data(values, labels, lo=lo, hi=hi)
            heatmap.move_to(col=self.timeline.position, notify=False)
        self._refresh_selection()

    # -- selection -------------------------------------------------------------------------
    def _selected(self) -> tuple[int, int] | None:
        """(position in the alignment's matrices, aligned snapshot) under the cursor."""
        al = self.alignment
        if al is None or not self.order or not len(al.steps):
            return None
        return self.order[min(self.query_one("#heat-a", Heatmap).cursor_row, len(self.order) - 1)], self.timeline.position

    def _pair(self) -> tuple[int, int, int, int] | None:
        selected = self._selected()
        if selected is None:
            return None
        k, t = selected
        al = self.alignment
        return int(al.rows[0, k]), int(al.rows[1, k]), int(al.snaps[0, t]), int(al.snaps[1, t])

    def _refresh_selection(self) -> None:
        self.refresh_header()
        details = self.query_one("#compare-details", Static)
        selected = self._selected()
        if selected is None:
            details.update("")
            self.query_one("#consensus-map", DensityMap).show_message("")
            return
        k, t = selected
        al = self.alignment
        rows, snaps = al.rows[:, k], al.snaps[:, t]
        cached = self._overlaps.get((k, t))
        note = "masks not compared: the runs start from different base weights" if self.base_error else None
        if self.consensus:
            details.update(consensus_details(self.labels, self._ordered_views(), rows, snaps, None if cached is None else cached[0], note=note))
        else:
            ia, ib, ta, tb = self._pair()
            jac = (float("nan"), float("nan")) if self.base_error else self._jaccard.get((ia, ta))
            details.update(compare_details(self.views["a"], self.views["b"], ia, ib, ta, tb, jac))
        if self.base_error:
            self.query_one("#consensus-map", DensityMap).show_message(note)
        elif cached is None:
            self._overlap_worker([self.runs[key] for key in self.keys], k, t, rows, snaps)
        else:
            self._show_map(k, cached[1])

    @work(thread=True, exclusive=True, group="jaccard", exit_on_error=False, name="jaccard")
    def _overlap_worker(self, runs: list[Any], k: int, t: int, rows: np.ndarray, snaps: np.ndarray) -> tuple:
        info = runs[0].param(int(rows[0]))
        overlap = matrix_overlap(runs, rows, snaps, keep_votes=True)
        changed = np.diagonal(overlap.intersections)[:, None]
        group = overlap_group(info.name, np.array([info.numel]), changed, overlap.intersections[:, :, None], overlap.consensus[None, :])
        return k, t, group, overlap.votes / len(runs)

    @on(Worker.StateChanged)
    def on_worker_done(self, event: Worker.StateChanged) -> None:
        if event.worker.name != "jaccard":
            return
        if event.state == WorkerState.ERROR:
            self.notify(f"cannot read masks: {event.worker.error}", severity="error")
        elif event.state == WorkerState.SUCCESS and event.worker.result is not None:
            k, t, group, consensus = event.worker.result
            self._overlaps[(k, t)] = (group, consensus)
            al = self.alignment
            if al is not None:
                self._jaccard[(int(al.rows[0, k]), int(al.snaps[0, t]))] = (float(group.jaccard[0, 1]), float(group.baseline[0, 1]))
            self._refresh_selection()

    def _show_map(self, k: int, consensus: np.ndarray) -> None:
        density_map = self.query_one("#consensus-map", DensityMap)
        legend = self.query_one("#consensus-legend", Static)
        if not self.consensus or density_map.size.width < 2:
            return
        p = self.views[self.keys[0]].params[int(self.alignment.rows[0, k])]
        rows, cols = density_map.grid_size()
        m, n = p.shape
        rows, cols = max(1, min(rows, m)), max(1, min(cols, n))
        grid = block_density(consensus, rows, cols)
        head_dim = matrix_head_dim(p, self.runs[self.keys[0]].attrs, self.app.head_dim)
        row_heads = {b * rows // m for b in head_boundaries(p, head_dim, "rows")}
        col_heads = {b * cols // n for b in head_boundaries(p, head_dim, "cols")}
        density_map.show(grid, row_heads=row_heads, col_heads=col_heads, lo=0.0, hi=1.0)
        text = Text(" C = mean_r M ", style="bold")
        for segment, style in palette.legend(0.0, 1.0, fmt="{:g}"):
            text.append(segment, style=style)
        text.append(f"  {m / rows:.0f}x{n / cols:.0f} weights per half-cell")
        legend.update(text)

    def refresh_header(self) -> None:
        text = Text()
        styles = ("black on cyan", "black on magenta", "black on yellow", "black on green", "black on white")
        for i, (key, label) in enumerate(zip(self.keys, self.labels)):
            text.append(f" {key.upper()} ", style=styles[i % len(styles)])
            text.append(f" {label}  ")
        al = self.alignment
        if al is not None and len(al.steps):
            t = self.timeline.position
            text.append(f"step {int(al.steps[t])} ({t + 1}/{len(al.steps)})", style="bold")
            text.append("  paired by step" if al.by_step else "  no common step: paired as of each step", style="grey70")
        if self.base_error:
            text.append(f"  {self.base_error}", style="yellow")
        for key, reason in self.errors.items():
            text.append(f"  {key.upper()}: {reason}" if key != "runs" else f"  {reason}", style="red")
        self.query_one("#compare-header", Static).update(text)
        hint = Text()
        if self.consensus:
            hint.append(f" mean changed |M|/n over {len(self.keys)} runs ", style="bold")
            segments = palette.legend(0.0, 1.0, fmt="{:g}")
        elif self.diff:
            hint.append(" A - B changed |M|/n ", style="bold")
            segments = palette.legend(-0.5, 0.5, diverging=True, fmt="{:+.1f}")
        else:
            hint.append(" changed |M|/n: A | B ", style="bold")
            segments = palette.legend(0.0, 1.0, fmt="{:g}")
        for segment, style in segments:
            hint.append(segment, style=style)
        if al is not None:
            hint.append(f"  {al.rows.shape[1]} shared matrices")
        self.query_one("#compare-hint", Static).update(hint)

    def _sync(self, row: int | None = None) -> None:
        for heatmap in self.query(Heatmap):
            heatmap.move_to(row=row, col=self.timeline.position, notify=False)
        self._refresh_selection()

    @on(Heatmap.CursorMoved)
    def on_cursor(self, message: Heatmap.CursorMoved) -> None:
        self.timeline.seek(message.col)
        self._sync(message.row)

    def _show_panels(self) -> None:
        self.query_one("#heat-a").display = self.consensus or not self.diff
        self.query_one("#heat-b").display = not self.consensus and not self.diff
        self.query_one("#heat-diff").display = not self.consensus and self.diff
        self.query_one("#consensus-map").display = self.consensus
        self.query_one("#consensus-legend").display = self.consensus

    # -- actions ---------------------------------------------------------------------------------
    def action_move(self, delta: int) -> None:
        self._sync(self.query_one("#heat-a", Heatmap).cursor_row + delta)

    def action_scrub(self, delta: int) -> None:
        self.timeline.step(delta)
        self._sync()

    def action_home(self) -> None:
        self.timeline.home()
        self._sync()

    def action_end(self) -> None:
        self.timeline.end()
        self._sync()

    def action_follow(self) -> None:
        self.timeline.follow()
        self._sync()

    def action_toggle_diff(self) -> None:
        if len(self.keys) > 2:
            self.notify("A - B needs exactly two runs; this comparison shows the consensus of all", severity="warning")
            return
        self.diff = not self.diff
        self.consensus = False
        self._show_panels()
        self._sync()

    def action_toggle_consensus(self) -> None:
        if len(self.keys) > 2:
            return  # more than two runs: the consensus view is the comparison
        self.consensus = not self.consensus
        self._show_panels()
        if self.views and len(self.views) == len(self.keys):
            self._align()
        self._sync()

    def action_back(self) -> None:
        if len(self.app.screen_stack) <= 2:  # opened by ``compare --tui``: nothing to go back to
            self.app.exit()
        else:
            self.app.pop_screen()
