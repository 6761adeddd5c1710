"""The run list: every run under PATH with its status, latest step and global update sparsity."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual.worker import get_current_worker

from ..data import RunStatus, discover_runs, format_age
from ..source import StatusReader

__all__ = ["RunsScreen"]

_STATUS_STYLES = {"live": "bold green", "stale": "bold red", "crashed": "bold red", "finished": "blue", "disabled": "magenta", "error": "red", "unknown": "grey62"}


_COLUMNS = ("run", "status", "heartbeat", "snapshots", "step", "sparsity")


class RunsScreen(Screen):
    """Runs under the app's PATH, refreshed while visible; Enter opens one, ``c`` compares two."""

    BINDINGS = [
        Binding("enter", "open", "open run"),
        Binding("c", "compare", "compare (mark, then pick the second)"),
        Binding("r", "rescan", "rescan"),
    ]

    class Listed(Message):
        def __init__(self, statuses: list[RunStatus], now: float) -> None:
            super().__init__()
            self.statuses = statuses
            self.now = now

    def __init__(self, root: Path, *, opened: bool = False) -> None:
        super().__init__()
        self.root = root
        self.statuses: list[RunStatus] = []
        self.marked: Path | None = None
        self._reader = StatusReader()
        self._opened_root = opened
        self._rows: list[tuple[str, ...]] = []

    def compose(self) -> ComposeResult:
        yield Static(id="runs-header", classes="header")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="runs-message", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#runs-header", Static).update(Text(f" compass-monitor  {self.root}", style="bold"))
        self.query_one("#runs-message", Static).update(f" looking for runs under {self.root} ...")
        self.scan_worker()

    @work(thread=True, exclusive=True, group="runs", exit_on_error=False)
    def scan_worker(self) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled:
            if self.app.screen is self:  # no reads while a run or comparison is shown
                try:
                    now = self.app.clock()
                    statuses = [self._reader.status(p, now=now, stale_after=self.app.stale_after) for p in discover_runs(self.root)]
                    self.post_message(self.Listed(statuses, now))
                except Exception:  # listing is best effort; the next scan retries
                    pass
            deadline = time.monotonic() + 1.0
            while not worker.is_cancelled and time.monotonic() < deadline:
                time.sleep(0.05)

    @on(Listed)
    def on_listed(self, message: Listed) -> None:
        self.statuses = message.statuses
        rows = [self._row(s, message.now) for s in message.statuses]
        if rows != self._rows:  # rebuilt only when a line changed: no flicker, no half-laid-out table between scans
            self._rows = rows
            table = self.query_one(DataTable)
            row = table.cursor_row
            # Fixed column widths, set here: DataTable measures auto widths only when idle, so a
            # screen drawn between a rebuild and that measure showed "finish" for "finished".
            table.clear(columns=True)
            for label, index in zip(_COLUMNS, range(len(_COLUMNS))):
                table.add_column(label, width=max(len(label), *(len(cells[index]) for cells in rows)) if rows else len(label))
            for s, cells in zip(message.statuses, rows):
                table.add_row(cells[0], Text(cells[1], style=_STATUS_STYLES.get(s.status, "")), *cells[2:], key=str(s.path))
            if message.statuses:
                table.move_cursor(row=min(row, len(message.statuses) - 1))
        self.query_one("#runs-message", Static).update(self._message())
        if not self._opened_root and [s.path for s in message.statuses] == [self.root]:
            self._opened_root = True  # PATH itself became a run (e.g. a demo that started after the TUI)
            self.app.open_run(self.root)

    def _row(self, s: RunStatus, now: float) -> tuple[str, ...]:
        """The cells of one run's line: run, status, heartbeat age, snapshots, step, sparsity."""
        return (
            ("* " if s.path == self.marked else "") + self._label(s),
            s.status,
            format_age(s.age(now)) if s.status in ("live", "stale", "crashed") else "-",
            str(s.snapshots),
            "-" if s.last_step is None else str(s.last_step),
            "-" if s.sparsity != s.sparsity else f"{s.sparsity:.3f}",
        )

    def _label(self, status: RunStatus) -> str:
        """A run's folder, relative to PATH (metadata names repeat: runs/demo and runs/demo-s1 are both "demo")."""
        try:
            label = str(status.path.relative_to(self.root))
        except ValueError:
            label = str(status.path)
        label = status.path.name if label == "." else label
        return label if label == status.name or status.name == status.path.name else f"{label} ({status.name})"

    def _message(self) -> Text:
        if not self.root.exists():
            if self.app.waiting is not None:
                return Text(f" {self.app.waiting()}  q quits.", style="yellow")
            return Text(f" {self.root} does not exist (yet): watching for a run to appear there. q quits.", style="yellow")
        if not self.statuses:
            return Text(f" no compass-monitor run under {self.root} (a run is a directory with zarr.json and commit.json); watching. q quits.", style="yellow")
        errors = [s for s in self.statuses if s.status == "error"]
        text = Text(f" {len(self.statuses)} runs. Enter opens, c marks two runs to compare.")
        for s in errors[:3]:
            text.append(f"\n {s.path.name}: {s.error}", style="red")
        return text

    def _selected(self) -> RunStatus | None:
        table = self.query_one(DataTable)
        if not self.statuses or table.cursor_row is None:
            return None
        return self.statuses[min(table.cursor_row, len(self.statuses) - 1)]

    def action_open(self) -> None:
        selected = self._selected()
        if selected is not None:
            self.app.open_run(selected.path)

    def action_compare(self) -> None:
        selected = self._selected()
        if selected is None:
            return
        if self.marked is None or self.marked == selected.path:
            self.marked = None if self.marked == selected.path else selected.path
            self.notify(f"marked {selected.name}: choose a second run and press c" if self.marked else "unmarked")
            return
        from .compare import CompareScreen

        first, self.marked = self.marked, None
        self.app.push_screen(CompareScreen(first, selected.path))

    def action_rescan(self) -> None:
        self.scan_worker()

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()
