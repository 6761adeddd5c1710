"""Two runs side by side, or their difference, with mask Jaccard against the independence baseline."""

from __future__ import annotations

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

from .. import palette
from ..data import Alignment, RunView, align_runs, jaccard, row_label, row_order
from ..messages import follow_posting
from ..messages import RunChanged, RunFailed
from ..timeline import Timeline
from ..widgets.details import compare_details
from ..widgets.heatmap import Heatmap

__all__ = ["CompareScreen"]


class CompareScreen(Screen):
    """Run A and run B: matrices paired by name, snapshots paired by optimizer step."""

    BINDINGS = [
        Binding("up", "move(-1)", "previous matrix", show=False),
        Binding("down", "move(1)", "next matrix", show=False),
        Binding("left", "scrub(-1)", "earlier snapshot", show=False),
        Binding("right", "scrub(1)", "later snapshot", show=False),
        Binding("home", "home", "first snapshot", show=False),
        Binding("end", "end", "last snapshot", show=False),
        Binding("f", "follow", "follow live"),
        Binding("d", "toggle_diff", "side by side / A-B"),
        Binding("escape", "back", "back"),
    ]

    def __init__(self, path_a: Path, path_b: Path) -> None:
        super().__init__()
        self.paths = {"a": Path(path_a), "b": Path(path_b)}
        self.views: dict[str, RunView] = {}
        self.runs: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.alignment: Alignment | None = None
        self.order: list[int] = []  # positions in the alignment, in display order
        self.timeline = Timeline()
        self.diff = False
        self._jaccard: dict[tuple[int, int], tuple[float, float]] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="compare-header", classes="header")
        with Horizontal(id="compare-body"):
            yield Heatmap(id="heat-a")
            yield Heatmap(id="heat-b", show_labels=False)
            yield Heatmap(id="heat-diff", diverging=True)
            with VerticalScroll(id="side"):
                yield Static(id="compare-details")
        yield Static(id="compare-hint", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#heat-diff").display = False
        self.query_one("#heat-a", Heatmap).focus()
        for key in ("a", "b"):
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
        if len(self.views) == 2:
            self._align()

    @on(RunFailed)
    def on_run_failed(self, message: RunFailed) -> None:
        message.stop()
        self.errors[message.key] = message.reason
        self.refresh_header()

    def _align(self) -> None:
        a, b = self.views["a"], self.views["b"]
        self.alignment = align_runs(a, b)
        position = {store: k for k, store in enumerate(self.alignment.rows_a)}
        self.order = [position[i] for i in row_order(a.params, view=a) if i in position]
        self.timeline.grow(len(self.alignment.steps))
        al = self.alignment
        rows_a = [al.rows_a[k] for k in self.order]
        rows_b = [al.rows_b[k] for k in self.order]
        da = a.density[np.ix_(al.snaps_a, rows_a)] if rows_a else np.zeros((0, 0))
        db = b.density[np.ix_(al.snaps_b, rows_b)] if rows_b else np.zeros((0, 0))
        labels = [row_label(a.params[i]) for i in rows_a]
        empty = "the runs share no matrix" if not rows_a else "the runs share no snapshot"
        for widget_id, values, lo, hi in (("#heat-a", da, 0.0, 1.0), ("#heat-b", db, 0.0, 1.0), ("#heat-diff", da - db, -0.5, 0.5)):
            heatmap = self.query_one(widget_id, Heatmap)
            heatmap.empty_text = empty
            heatmap.set_data(values, labels, lo=lo, hi=hi)
            heatmap.move_to(col=self.timeline.position, notify=False)
        self._refresh_selection()

    # -- selection -------------------------------------------------------------------------
    def _pair(self) -> tuple[int, int, int, int] | None:
        al = self.alignment
        if al is None or not self.order or not len(al.steps):
            return None
        k = self.order[min(self.query_one("#heat-a", Heatmap).cursor_row, len(self.order) - 1)]
        t = self.timeline.position
        return al.rows_a[k], al.rows_b[k], int(al.snaps_a[t]), int(al.snaps_b[t])

    def _refresh_selection(self) -> None:
        self.refresh_header()
        pair = self._pair()
        details = self.query_one("#compare-details", Static)
        if pair is None:
            details.update("")
            return
        ia, ib, ta, tb = pair
        key = (ia, ta)
        details.update(compare_details(self.views["a"], self.views["b"], ia, ib, ta, tb, self._jaccard.get(key)))
        if key not in self._jaccard:
            self._jaccard_worker(self.runs["a"], self.runs["b"], ia, ib, ta, tb)

    @work(thread=True, exclusive=True, group="jaccard", exit_on_error=False, name="jaccard")
    def _jaccard_worker(self, run_a: Any, run_b: Any, ia: int, ib: int, ta: int, tb: int) -> tuple:
        mask_a, mask_b = run_a.mask(ia, ta), run_b.mask(ib, tb)
        if mask_a.shape != mask_b.shape:
            return ((ia, ta), (float("nan"), float("nan")))
        return ((ia, ta), jaccard(mask_a, mask_b))

    @on(Worker.StateChanged)
    def on_worker_done(self, event: Worker.StateChanged) -> None:
        if event.worker.name != "jaccard":
            return
        if event.state == WorkerState.ERROR:
            self.notify(f"cannot read masks: {event.worker.error}", severity="error")
        elif event.state == WorkerState.SUCCESS and event.worker.result is not None:
            key, value = event.worker.result
            self._jaccard[key] = value
            self._refresh_selection()

    def refresh_header(self) -> None:
        text = Text()
        text.append(" A ", style="black on cyan")
        text.append(f" {self.paths['a'].name}  ")
        text.append(" B ", style="black on magenta")
        text.append(f" {self.paths['b'].name}  ")
        al = self.alignment
        if al is not None and len(al.steps):
            t = self.timeline.position
            text.append(f"step {int(al.steps[t])} ({t + 1}/{len(al.steps)})", style="bold")
            text.append("  paired by step" if al.by_step else "  no common step: paired by index", style="grey70")
        for key, reason in self.errors.items():
            text.append(f"  {key.upper()}: {reason}", style="red")
        self.query_one("#compare-header", Static).update(text)
        hint = Text()
        if self.diff:
            hint.append(" A - B changed |M|/n ", style="bold")
            segments = palette.legend(-0.5, 0.5, diverging=True, fmt="{:+.1f}")
        else:
            hint.append(" changed |M|/n: A | B ", style="bold")
            segments = palette.legend(0.0, 1.0, fmt="{:g}")
        for segment, style in segments:
            hint.append(segment, style=style)
        if al is not None:
            hint.append(f"  {len(al.rows_a)} shared matrices")
        self.query_one("#compare-hint", Static).update(hint)

    def _sync(self, row: int | None = None) -> None:
        for heatmap in self.query(Heatmap):
            heatmap.move_to(row=row, col=self.timeline.position, notify=False)
        self._refresh_selection()

    @on(Heatmap.CursorMoved)
    def on_cursor(self, message: Heatmap.CursorMoved) -> None:
        self.timeline.seek(message.col)
        self._sync(message.row)

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
        self.diff = not self.diff
        self.query_one("#heat-a").display = not self.diff
        self.query_one("#heat-b").display = not self.diff
        self.query_one("#heat-diff").display = self.diff
        self._sync()

    def action_back(self) -> None:
        self.app.pop_screen()
