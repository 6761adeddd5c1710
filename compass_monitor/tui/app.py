"""The compass-monitor terminal UI application (screens in ``screens/``, styles in ``compass.tcss``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from textual.app import App
from textual.binding import Binding

from .screens.compare import CompareScreen
from .screens.dialogs import HelpScreen
from .screens.matrix import MatrixScreen
from .screens.run import RunScreen
from .screens.runs import RunsScreen

__all__ = ["CompassApp"]


class CompassApp(App):
    """Watch runs live, scrub and replay them.

    Args:
        path: a run directory, or a folder of runs (it may not exist yet).
        replay: open the run at its first snapshot and play it forward.
        speed: replay speed in snapshots per second.
        head_dim: attention head size for runs that recorded no model geometry (None: no head marks).
        stale_after: seconds without a heartbeat after which a running run is STALE
            (at least 3x its usual snapshot interval).
        poll_interval: seconds between checks of a followed run's commit file.
        clock: the wall clock (tests freeze it).
        waiting: the line shown while ``path`` does not exist yet (the live demo: its latest progress line).
        compare: open straight on the comparison of these runs (``compare --tui``; escape quits).
    """

    CSS_PATH = "compass.tcss"
    TITLE = "compass-monitor"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
    ]

    def __init__(
        self,
        path: str | Path,
        *,
        replay: bool = False,
        speed: float = 2.0,
        head_dim: int | None = None,
        stale_after: float = 120.0,
        poll_interval: float = 0.25,
        clock: Callable[[], float] = time.time,
        waiting: Callable[[], str] | None = None,
        compare: Sequence[Path] | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(path)
        self.replay = replay
        self.speed = speed
        self.head_dim = head_dim
        self.stale_after = stale_after
        self.poll_interval = poll_interval
        self.clock = clock
        self.waiting = waiting
        self.compare = list(compare) if compare else None

    def on_mount(self) -> None:
        if self.compare:
            self.push_screen(CompareScreen(*self.compare))
            return
        is_run = (self.root / "zarr.json").is_file()
        self.push_screen(RunsScreen(self.root, opened=is_run))
        if is_run:
            self.open_run(self.root)

    def open_run(self, path: Path) -> None:
        self.push_screen(RunScreen(path, replay=self.replay, speed=self.speed))

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        sections = [
            ("everywhere", self.BINDINGS),
            ("run list", RunsScreen.BINDINGS),
            ("run: heatmap of matrices x snapshots", RunScreen.BINDINGS),
            ("matrix drill-down", MatrixScreen.BINDINGS),
            ("compare two runs", CompareScreen.BINDINGS),
        ]
        self.push_screen(HelpScreen(sections))
