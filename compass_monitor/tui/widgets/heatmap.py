"""A matrices-by-snapshots heatmap with a cursor, drawn line by line.

Only the visible lines are rendered (``render_line``), so a run of hundreds of
matrices and thousands of snapshots costs no more to draw than a small one.
Labels stay fixed on the left; the snapshot axis scrolls to keep the cursor in
view; when rows do not fit, the top-left corner says which are shown
(``1-21 of 37``). One character per snapshot; colours come from :mod:`..palette`.

The owning screen holds the selection and places the cursor with
:meth:`Heatmap.move_to`; a click or the mouse wheel only posts a request
(:class:`Heatmap.CursorMoved`), so the cursor drawn is always the screen's.
"""

from __future__ import annotations

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from .. import palette

__all__ = ["Heatmap"]

_LABEL = Style(color="bright_white")
_LABEL_CURSOR = Style(color="black", bgcolor="bright_white", bold=True)
_HEADER = Style(color="grey62")
_MARK = Style(color="bright_white", bold=True)
_PLAIN = Style.null()  # every segment has a style: NO_COLOR's filter reads segment.style.color


class Heatmap(Widget, can_focus=True):
    """Rows = matrices (in the order given), columns = snapshots.

    Set data with :meth:`set_data`; the owning screen moves the cursor with
    :meth:`move_to`. A click posts :class:`Heatmap.CursorMoved` with the clicked
    cell, the mouse wheel with the row it asks for (``rows_only``); the screen
    decides and moves the cursor.
    """

    DEFAULT_CSS = """
    Heatmap { width: 1fr; height: 1fr; }
    """

    class CursorMoved(Message):
        """The user asks for the cursor at (``row``, ``col``); with ``rows_only`` only the row is asked for."""

        def __init__(self, heatmap: "Heatmap", row: int, col: int, *, rows_only: bool = False) -> None:
            super().__init__()
            self.heatmap = heatmap
            self.row = row
            self.col = col
            self.rows_only = rows_only

        @property
        def control(self) -> "Heatmap":
            return self.heatmap

    cursor_row: reactive[int] = reactive(0, repaint=True)
    cursor_col: reactive[int] = reactive(0, repaint=True)

    def __init__(self, *, show_labels: bool = True, diverging: bool = False, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.show_labels = show_labels
        self.diverging = diverging
        self.values = np.zeros((0, 0))
        self.labels: list[str] = []
        self.lo, self.hi = 0.0, 1.0
        self.empty_text = "loading..."
        self._row_offset = 0
        self._col_offset = 0
        self._colours = np.zeros((0, 0), dtype=np.int16)

    # -- data ---------------------------------------------------------------------
    def set_data(self, values: np.ndarray, labels: list[str], *, lo: float = 0.0, hi: float = 1.0) -> None:
        """Show ``values`` (T, R): R rows (with ``labels``) by T snapshots."""
        self.values = np.asarray(values, dtype=np.float64)
        self.labels = list(labels)
        self.lo, self.hi = lo, hi
        self._colours = self._colour_indices(self.values)
        self.cursor_row = min(self.cursor_row, max(0, len(self.labels) - 1))
        self.cursor_col = min(self.cursor_col, max(0, self.values.shape[0] - 1))
        self._scroll_to_cursor()
        self.refresh()

    def _colour_indices(self, values: np.ndarray) -> np.ndarray:
        scale = np.array(palette.DIVERGING if self.diverging else palette.SEQUENTIAL, dtype=np.int16)
        span = self.hi - self.lo
        x = np.clip((values - self.lo) / (span if span > 0 else 1.0), 0.0, 1.0)
        with np.errstate(invalid="ignore"):
            idx = np.minimum(len(scale) - 1, np.nan_to_num(x * len(scale)).astype(np.int64))
        out = scale[idx]
        if not self.diverging:
            out = np.where(values == 0.0, palette.ZERO, out)
        return np.where(np.isfinite(values), out, palette.MISSING).astype(np.int16)

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    @property
    def num_cols(self) -> int:
        return int(self.values.shape[0]) if self.values.ndim == 2 else 0

    # -- cursor ----------------------------------------------------------------
    def move_to(self, *, row: int | None = None, col: int | None = None, notify: bool = False) -> None:
        """Place the cursor (clipped); with ``notify``, also post :class:`CursorMoved` with the new place."""
        if row is not None:
            self.cursor_row = int(min(max(row, 0), max(0, self.num_rows - 1)))
        if col is not None:
            self.cursor_col = int(min(max(col, 0), max(0, self.num_cols - 1)))
        self._scroll_to_cursor()
        if notify:
            self.post_message(self.CursorMoved(self, self.cursor_row, self.cursor_col))

    @property
    def hidden_rows(self) -> int:
        """Rows that do not fit in the widget's height."""
        return max(0, self.num_rows - max(1, self.size.height - 1))

    def _rows_note(self) -> str:
        """``1-21 of 37``: the rows shown, when some are hidden ('' otherwise)."""
        if not self.hidden_rows:
            return ""
        rows = max(1, self.size.height - 1)
        return f"{self._row_offset + 1}-{min(self.num_rows, self._row_offset + rows)} of {self.num_rows}"

    @property
    def label_width(self) -> int:
        if not self.show_labels:
            return 0
        width = min(max((len(label) for label in self.labels), default=4) + 1, 14)
        return max(width, len(self._rows_note()) + 1) if self.hidden_rows else width

    @property
    def cell_width(self) -> int:
        """Characters per snapshot: 1, or up to 4 when few snapshots leave room."""
        room = max(1, self.size.width - self.label_width)
        return max(1, min(4, room // max(1, self.num_cols)))

    def _visible(self) -> tuple[int, int]:
        """(rows, snapshots) that fit."""
        rows = max(1, self.size.height - 1)
        cols = max(1, (self.size.width - self.label_width) // self.cell_width)
        return rows, cols

    def _scroll_to_cursor(self) -> None:
        rows, cols = self._visible()
        if self.cursor_row < self._row_offset:
            self._row_offset = self.cursor_row
        elif self.cursor_row >= self._row_offset + rows:
            self._row_offset = self.cursor_row - rows + 1
        self._row_offset = max(0, min(self._row_offset, max(0, self.num_rows - rows)))
        if self.cursor_col < self._col_offset:
            self._col_offset = self.cursor_col
        elif self.cursor_col >= self._col_offset + cols:
            self._col_offset = self.cursor_col - cols + 1
        self._col_offset = max(0, min(self._col_offset, max(0, self.num_cols - cols)))

    def on_resize(self, event: events.Resize) -> None:
        self._scroll_to_cursor()

    def on_click(self, event: events.Click) -> None:
        if event.y >= 1 and event.x >= self.label_width and self.num_rows:
            row = min(self._row_offset + event.y - 1, self.num_rows - 1)
            col = min(self._col_offset + (event.x - self.label_width) // self.cell_width, max(0, self.num_cols - 1))
            self.post_message(self.CursorMoved(self, row, col))

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        self.post_message(self.CursorMoved(self, min(self.cursor_row + 3, max(0, self.num_rows - 1)), self.cursor_col, rows_only=True))

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        self.post_message(self.CursorMoved(self, max(self.cursor_row - 3, 0), self.cursor_col, rows_only=True))

    # -- drawing -----------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        lw = self.label_width
        _, cols = self._visible()
        if self.num_rows == 0 or self.num_cols == 0:
            text = self.empty_text if y == 0 else ""
            return Strip([Segment(text[:width].ljust(width), _PLAIN)])
        cw = self.cell_width
        c0 = self._col_offset
        c1 = min(self.num_cols, c0 + cols)
        if y == 0:  # the cursor's snapshot, marked above its column
            before = (self.cursor_col - c0) * cw
            note = self._rows_note()
            return Strip([Segment(note.ljust(lw) + " " * before, _HEADER), Segment("▼", _MARK)]).adjust_cell_length(width, _PLAIN)
        r = self._row_offset + y - 1
        if r >= self.num_rows:
            return Strip([Segment(" " * width, _PLAIN)])
        segments = []
        if lw:
            style = _LABEL_CURSOR if r == self.cursor_row else _LABEL
            segments.append(Segment(self.labels[r][: lw - 1].ljust(lw - 1) + " ", style))
        on_row = r == self.cursor_row
        pad = " " * (cw - 1)
        for c, idx in enumerate(self._colours[c0:c1, r].tolist(), start=c0):
            if c == self.cursor_col:
                segments.append(Segment(("◆" if on_row else "│") + pad, palette.cell_style(idx, 231)))
            else:
                segments.append(Segment(" " + pad, palette.cell_style(idx)))
        return Strip(segments).adjust_cell_length(width, _PLAIN)
