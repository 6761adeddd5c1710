"""The main view: a matrices-by-snapshots heatmap of update density, with the selected matrix's details."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import get_current_worker

from .. import palette
from ..data import SORTS, MatrixFilter, RunView, badge, discover_runs, row_label, row_order, stale_threshold, live_status, writer_gone
from ..messages import RunChanged, RunFailed, follow_posting
from ..timeline import Selection
from ..widgets.badge import badge_text
from ..widgets.details import matrix_details
from ..widgets.heatmap import Heatmap
from .matrix import MatrixScreen

__all__ = ["RunScreen"]

METRICS = ("density", "flips", "principal")
_METRIC_TITLES = {"density": "changed |M|/n", "flips": "flips vs previous /n", "principal": "overlap with M_princ"}


class RunScreen(Screen):
    """One run: heatmap (rows = matrices grouped by layer and type, columns = snapshots) and details.

    The selected (matrix, snapshot) lives in one :class:`Selection`, shared with the
    matrix drill-down; every key changes it and then :meth:`_sync` draws the
    cursor, the header and the side panel from it.
    """

    BINDINGS = [
        Binding("up", "move(-1)", "previous matrix", show=False),
        Binding("down", "move(1)", "next matrix", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("left", "scrub(-1)", "earlier snapshot (pauses)", show=False),
        Binding("right", "scrub(1)", "later snapshot (pauses)", show=False),
        Binding("shift+left", "scrub(-10)", "10 snapshots earlier", show=False),
        Binding("shift+right", "scrub(10)", "10 snapshots later", show=False),
        Binding("home", "home", "first snapshot (pauses)", show=False),
        Binding("end", "end", "last snapshot (pauses)", show=False),
        Binding("f", "follow", "follow live"),
        Binding("enter", "drill", "matrix"),
        Binding("slash", "filter", "filter"),
        Binding("s", "sort", "sort"),
        Binding("m", "metric", "metric"),
        Binding("c", "compare", "compare"),
        Binding("space", "play", "play/pause replay", show=False),
        Binding("plus,equals_sign", "speed(2.0)", "replay faster", show=False),
        Binding("minus", "speed(0.5)", "replay slower", show=False),
        Binding("escape", "back", "run list", show=False),
    ]

    def __init__(self, path: Path, *, replay: bool = False, speed: float = 2.0) -> None:
        super().__init__()
        self.path = Path(path)
        self.view: RunView | None = None
        self.run: Any = None
        self.commit: dict[str, Any] = {}
        self.error: str | None = None
        self.selection = Selection()
        self.selection.timeline.following = not replay
        self.selection.timeline.playing = replay
        self.filter = MatrixFilter()
        self.sort = "layer"
        self.metric = "density"
        self.replay = replay
        self.speed = speed
        self.child: MatrixScreen | None = None

    @property
    def timeline(self):
        return self.selection.timeline

    @property
    def order(self) -> list[int]:
        return self.selection.order

    @property
    def playing(self) -> bool:
        return self.timeline.playing

    # -- layout ----------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(id="run-header", classes="header")
        with Horizontal(id="run-body"):
            yield Heatmap(id="heatmap")
            with VerticalScroll(id="side"):
                yield Static(id="details")
        yield Static(id="run-hint", classes="hint")
        yield Footer()

    @property
    def heatmap(self) -> Heatmap:
        return self.query_one("#heatmap", Heatmap)

    def on_mount(self) -> None:
        self.heatmap.empty_text = f"opening {self.path} ..."
        self.heatmap.focus()
        self.follow_worker()
        self.set_interval(1.0, self.refresh_header)
        self._player = self.set_interval(1.0 / self.speed, self._tick, pause=not self.playing)
        self.refresh_header()

    @work(thread=True, exclusive=True, group="follow-main", exit_on_error=False)
    def follow_worker(self) -> None:
        worker = get_current_worker()
        follow_posting(self, "main", self.path, interval=self.app.poll_interval, cancelled=lambda: worker.is_cancelled)

    # -- data ------------------------------------------------------------------------
    @on(RunChanged)
    def on_run_changed(self, message: RunChanged) -> None:
        first = self.view is None
        self.view, self.run, self.commit, self.error = message.view, message.run, message.commit, None
        self.timeline.grow(self.view.num_snapshots)
        if first and self.replay:
            self.timeline.position = 0
        if first or self.sort != "layer":
            self._reorder()
        self._show()
        if self.child is not None:
            self.child.data_changed(self.view, self.run)

    @on(RunFailed)
    def on_run_failed(self, message: RunFailed) -> None:
        self.error = message.reason
        if self.view is None:
            self.heatmap.empty_text = f"cannot read {self.path}: {message.reason}"
            self.heatmap.refresh()
        self.refresh_header()

    def _reorder(self) -> None:
        if self.view is None:
            return
        self.selection.set_order(row_order(self.view.params, flt=self.filter, sort=self.sort, view=self.view, snapshot=self.timeline.position))

    def _show(self) -> None:
        if self.view is None:
            return
        values = self.view.metric(self.metric)[:, self.order]
        hm = self.heatmap
        if not self.order:
            hm.empty_text = f"no matrix matches the filter {self.filter.text!r} (press / to change it)"
        elif self.view.num_snapshots == 0:
            hm.empty_text = "no committed snapshots yet: waiting for the first one"
        hm.set_data(values if self.order and self.view.num_snapshots else values[:0], [row_label(self.view.params[i]) for i in self.order], lo=0.0, hi=1.0)
        self._sync()

    def _sync(self) -> None:
        """Draw the selection: the heatmap's cursor, the side panel and the header (the only place that does)."""
        self.heatmap.move_to(row=self.selection.row, col=self.timeline.position)
        self.refresh_details()
        self.refresh_header()

    @property
    def selected_index(self) -> int | None:
        return self.selection.matrix if self.selection.matrix in self.order else None

    # -- display ---------------------------------------------------------------------------
    def status_word(self) -> str:
        now = self.app.clock()
        if self.error and self.view is None:
            return "ERROR"
        if self.view is None:
            return "WAITING"
        stale_after = stale_threshold(self.view.times, self.app.stale_after)
        status = live_status(str(self.commit.get("status", "unknown")), self.commit.get("heartbeat"), now, stale_after,
                             writer_alive=not writer_gone(self.commit))
        if self.replay:
            if self.playing:
                return f"REPLAY ▶ {self.speed:g}/s"
            return "REPLAY ❚❚" if not self.timeline.at_end or status == "live" else badge(status, following=True)
        hb = self.commit.get("heartbeat")
        return badge(status, following=self.timeline.following, heartbeat_age=None if hb is None else now - hb)

    def refresh_header(self) -> None:
        header = Text()
        name = self.path.name
        if self.run is not None:
            name = str(self.run.attrs.get("run", {}).get("name", name))
        header.append(f" {name} ", style="bold")
        header.append_text(badge_text(self.status_word()))
        if self.view is not None and self.view.num_snapshots:
            t = self.timeline.position
            header.append(f"  step {int(self.view.steps[t])}", style="bold")
            header.append(f" ({t + 1}/{self.view.num_snapshots})")
            header.append(f"  global sparsity {self.view.global_sparsity[t]:.3f}")
        self.query_one("#run-header", Static).update(header)
        hint = Text()
        hint.append(f" {_METRIC_TITLES[self.metric]} ", style="bold")
        for text, style in palette.legend(0.0, 1.0, fmt="{:g}"):
            hint.append(text, style=style)
        hint.append(f"  sort {self.sort}")
        if self.view is not None:
            hint.append(f"  {len(self.order)}/{len(self.view.params)} matrices")
        if self.filter.active:
            hint.append(f"  filter '{self.filter.text}'", style="yellow")
        if self.view is not None and self.view.partial:
            hint.append("  reading earlier snapshots...", style="yellow")
        gaps = sum(int(g[2]) for g in self.commit.get("gaps", []) if len(g) > 2)
        if gaps:
            hint.append(f"  {gaps} snapshots not stored (writer queue full)", style="yellow")
        if self.error and self.view is not None:
            hint.append(f"  read error: {self.error}", style="red")
        self.query_one("#run-hint", Static).update(hint)

    def refresh_details(self) -> None:
        details = self.query_one("#details", Static)
        index = self.selected_index
        if self.view is None or index is None:
            details.update("")
            return
        width = max(10, self.query_one("#side").size.width - 2)
        details.update(matrix_details(self.view, index, self.timeline.position, width=width))

    @on(Heatmap.CursorMoved)
    def on_cursor(self, message: Heatmap.CursorMoved) -> None:
        """A click (row and snapshot) or the mouse wheel (row only) asks for a new selection."""
        self.selection.select_row(message.row)
        if not message.rows_only:
            self.timeline.seek(message.col)
            self._pause_player()
        self._moved()

    def on_screen_resume(self) -> None:
        # The drill-down shares the selection: show where it left it (and whether it asked to follow).
        if self.view is not None:
            if self.timeline.following:
                self.replay = False
            self._pause_player()
            self._moved()

    # -- actions -------------------------------------------------------------------------
    def _moved(self) -> None:
        """The selection changed: re-sort if the order depends on the snapshot, then draw it."""
        if self.sort != "layer":
            self._reorder()
            self._show()
        else:
            self._sync()
        if self.child is not None:
            self.child.selection_changed()

    def _pause_player(self) -> None:
        if not self.playing:
            self._player.pause()

    def action_move(self, delta: int) -> None:
        self.selection.move(delta)
        self._moved()

    def action_page(self, direction: int) -> None:
        self.selection.move(direction * max(1, self.heatmap.size.height - 2))
        self._moved()

    def action_scrub(self, delta: int) -> None:
        self.timeline.step(delta)
        self._pause_player()
        self._moved()

    def action_home(self) -> None:
        self.timeline.home()
        self._pause_player()
        self._moved()

    def action_end(self) -> None:
        self.timeline.end()
        self._pause_player()
        self._moved()

    def action_follow(self) -> None:
        self.replay = False
        self.timeline.follow()
        self._pause_player()
        self._moved()

    def action_play(self) -> None:
        if not self.replay:
            self.replay = True
            self.timeline.following = False
        self.timeline.playing = not self.timeline.playing
        if self.playing and self.timeline.at_end:
            self.timeline.position = 0
        self._player.resume() if self.playing else self._player.pause()
        self._moved()

    def action_speed(self, factor: float) -> None:
        self.speed = min(64.0, max(0.25, self.speed * factor))
        self._player.stop()
        self._player = self.set_interval(1.0 / self.speed, self._tick, pause=not self.playing)
        self.refresh_header()

    def _tick(self) -> None:
        if not self.playing or self.view is None:
            self._pause_player()
            return
        self.timeline.advance()
        self._pause_player()
        self._moved()

    def action_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self._reorder()
        self._show()

    def action_metric(self) -> None:
        self.metric = METRICS[(METRICS.index(self.metric) + 1) % len(METRICS)]
        self._show()

    def action_filter(self) -> None:
        from .dialogs import FilterScreen

        params = self.view.params if self.view is not None else ()

        def apply(result: MatrixFilter | None) -> None:
            if result is not None:
                self.filter = result
                self._reorder()
                self._show()

        self.app.push_screen(FilterScreen(self.filter.text, params), apply)

    def action_drill(self) -> None:
        index = self.selected_index
        if self.view is None or index is None or self.view.num_snapshots == 0 or self.run is None:
            self.notify("nothing to open yet", severity="warning")
            return
        self.child = MatrixScreen(self.selection, self.view, self.run, status=self.status_word)
        self.app.push_screen(self.child, lambda _: setattr(self, "child", None))

    def action_compare(self) -> None:
        from .dialogs import PickRunScreen

        root = self.app.root if self.app.root.resolve() != self.path.resolve() else self.path.parent
        candidates = [p for p in discover_runs(root) if p.resolve() != self.path.resolve()]
        if not candidates:
            self.notify(f"no other run under {root} to compare with", severity="warning")
            return

        def open_compare(other: Path | None) -> None:
            if other is not None:
                from .compare import CompareScreen

                self.app.push_screen(CompareScreen(self.path, other))

        self.app.push_screen(PickRunScreen(candidates, title=f"compare {self.path.name} with"), open_compare)

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
