"""The selection every panel shows: live follow vs scrub on the snapshot axis, and the selected matrix (no Textual)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Selection", "Timeline"]


@dataclass
class Timeline:
    """The selected snapshot of a growing run.

    While ``following``, new snapshots move the position to the latest one;
    any scrub (step, jump to start or end, seek) pauses following until
    :meth:`follow`, and stops a replay (``playing``).
    """

    length: int = 0
    position: int = 0
    following: bool = True
    playing: bool = False

    def grow(self, length: int) -> None:
        self.length = max(0, length)
        if self.following or self.position >= self.length:
            self.position = max(0, self.length - 1)

    def _scrub(self, position: int) -> None:
        self.following = False
        self.playing = False
        self.position = min(max(position, 0), max(0, self.length - 1))

    def step(self, delta: int) -> None:
        self._scrub(self.position + delta)

    def home(self) -> None:
        self._scrub(0)

    def end(self) -> None:
        self._scrub(self.length - 1)

    def seek(self, position: int) -> None:
        self._scrub(position)

    def follow(self) -> None:
        self.following = True
        self.playing = False
        self.position = max(0, self.length - 1)

    def advance(self) -> bool:
        """One replay tick: the next snapshot; at the end, stop playing. Returns whether the position moved."""
        if self.at_end:
            self.playing = False
            return False
        self.position += 1
        return True

    @property
    def at_end(self) -> bool:
        return self.position >= self.length - 1


@dataclass
class Selection:
    """The one selected (matrix, snapshot) of a run: the heatmap's cursor, the header and every panel show it.

    Screens share this object (the run screen and its matrix drill-down) instead of
    keeping copies of the cursor, so no sequence of keys can make one panel show
    another snapshot's or another matrix's numbers.

    Attributes:
        timeline: the selected snapshot.
        matrix: store index of the selected matrix (None while the run has none).
        order: store indices of the rows shown, in display order (filter and sort applied).
    """

    timeline: Timeline = field(default_factory=Timeline)
    matrix: int | None = None
    order: list[int] = field(default_factory=list)

    def set_order(self, order: Sequence[int]) -> None:
        """New rows (filter, sort or a new run); the selected matrix stays selected if it is still shown."""
        self.order = list(order)
        if self.matrix not in self.order:
            self.matrix = self.order[0] if self.order else None

    @property
    def row(self) -> int:
        """Display row of the selected matrix (0 when nothing is shown)."""
        return self.order.index(self.matrix) if self.matrix in self.order else 0

    def move(self, delta: int) -> None:
        """Select the matrix ``delta`` rows down (up if negative), clipped to the shown rows."""
        self.select_row(self.row + delta)

    def select_row(self, row: int) -> None:
        if self.order:
            self.matrix = self.order[min(max(row, 0), len(self.order) - 1)]
