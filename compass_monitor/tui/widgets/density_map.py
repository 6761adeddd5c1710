"""A matrix's changed mask as a density map: two grid rows per line with ``▀`` (fg = upper, bg = lower).

Head boundaries (rows for q/k/v, columns for o) are marked in a gutter on the
left and a ruler on top, like the grey dashed lines of the paper's Fig. 3.
"""

from __future__ import annotations

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

from .. import palette

__all__ = ["DensityMap"]

_RULE = Style(color="grey50")
_HEAD = Style(color="bright_white", bold=True)
_PLAIN = Style.null()  # every segment has a style: NO_COLOR's filter reads segment.style.color


class DensityMap(Widget):
    """Shows a (2H, W) grid of values in [lo, hi]."""

    DEFAULT_CSS = """
    DensityMap { width: 1fr; height: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.grid: np.ndarray | None = None
        self.row_heads: set[int] = set()  # grid rows where a head starts
        self.col_heads: set[int] = set()  # grid columns where a head starts
        self.lo, self.hi = 0.0, 1.0
        self.message = "loading..."

    def grid_size(self) -> tuple[int, int]:
        """(grid rows, grid columns) that fit: two rows per line, after the ruler and gutter."""
        return max(2, 2 * (self.size.height - 1)), max(1, self.size.width - 1)

    def show(self, grid: np.ndarray, *, row_heads: set[int] = frozenset(), col_heads: set[int] = frozenset(), lo: float = 0.0, hi: float = 1.0) -> None:
        self.grid = np.asarray(grid, dtype=np.float64)
        self.row_heads, self.col_heads = set(row_heads), set(col_heads)
        self.lo, self.hi = lo, hi
        self.message = ""
        self.refresh()

    def show_message(self, text: str) -> None:
        self.grid = None
        self.message = text
        self.refresh()

    def _index(self, value: float) -> int:
        return palette.colour_index(float(value), lo=self.lo, hi=self.hi)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if self.grid is None:
            return Strip([Segment((self.message if y == 0 else "")[:width].ljust(width), _PLAIN)])
        rows, cols = self.grid.shape
        if y == 0:
            ruler = "".join("╷" if c in self.col_heads else " " for c in range(cols))
            return Strip([Segment(" ", _PLAIN), Segment(ruler, _RULE)]).adjust_cell_length(width, _PLAIN)
        r0 = 2 * (y - 1)
        if r0 >= rows:
            return Strip([Segment(" " * width, _PLAIN)])
        head = r0 in self.row_heads or (r0 + 1) in self.row_heads
        segments = [Segment("╶" if head else " ", _HEAD if head else _RULE)]
        upper = self.grid[r0]
        lower = self.grid[r0 + 1] if r0 + 1 < rows else None
        for c in range(cols):
            fg = self._index(upper[c])
            if lower is None:
                segments.append(Segment("▀", Style(color=palette.colour(upper[c], lo=self.lo, hi=self.hi))))
            else:
                segments.append(Segment("▀", palette.cell_style(self._index(lower[c]), fg)))
        return Strip(segments).adjust_cell_length(width, _PLAIN)
