"""Entry points of ``compass-monitor tui`` and ``compass-monitor replay`` (Textual is imported here, lazily)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["NO_TERMINAL", "compare_app", "run_compare_tui", "run_tui"]

#: the one line printed when stdin or stdout is not a terminal
NO_TERMINAL = ("compass-monitor: the TUI needs a terminal (stdin and stdout must be one); "
               "to print a run's numbers without one use: compass-monitor summary RUN_DIR")


def run_tui(
    path: str | Path,
    *,
    replay: bool = False,
    speed: float = 2.0,
    head_dim: int | None = None,
    stale_after: float = 120.0,
    waiting: Callable[[], str] | None = None,
) -> int:
    """Run the app in the foreground until the user quits. Returns a process exit code.

    0 when the user quits, 1 when the app crashed (Textual prints the error), 2 when
    it cannot start: no terminal, no Textual, or a bad argument (one line on stderr).
    ``waiting`` gives the line shown while ``path`` does not exist yet (the live demo's progress).
    """
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Textual would run without a terminal, writing escape codes to a file until killed.
        print(NO_TERMINAL, file=sys.stderr)
        return 2
    if speed <= 0:
        print(f"compass-monitor: --speed must be > 0, got {speed}", file=sys.stderr)
        return 2
    if head_dim is not None and head_dim <= 0:
        print(f"compass-monitor: --head-dim must be > 0, got {head_dim}", file=sys.stderr)
        return 2
    try:
        from .app import CompassApp
    except ImportError as exc:
        print(f"compass-monitor: the TUI needs Textual ({exc}); install it with: pip install -e '.[tui]' in the source tree", file=sys.stderr)
        return 2
    # zarr warns about non-zarr files (commit.json) when it opens a run; on stderr that would tear the screen.
    warnings.filterwarnings("ignore", module=r"zarr(\..*)?$")
    app = CompassApp(path, replay=replay, speed=speed, head_dim=head_dim, stale_after=stale_after, waiting=waiting)
    app.run()
    return int(app.return_code or 0)  # Textual sets 1 when the app ended on an unhandled error


def compare_app(paths: Sequence[str | Path], **options: Any) -> Any:
    """A ``CompassApp`` that opens straight on the compare screen of ``paths`` (escape quits).

    ``options`` are ``CompassApp``'s keyword arguments (``head_dim``, ``poll_interval``, ...).
    """
    from .app import CompassApp

    paths = [Path(p) for p in paths]
    return CompassApp(paths[0].parent, compare=paths, **options)


def run_compare_tui(paths: Sequence[str | Path], *, head_dim: int | None = None) -> int:
    """Open the compare screen on ``paths`` in the foreground (``compass-monitor compare ... --tui``). Returns an exit code."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("compass-monitor compare: --tui needs a terminal; without --tui it prints the comparison as a table", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", module=r"zarr(\..*)?$")
    app = compare_app(paths, head_dim=head_dim)
    app.run()
    return int(app.return_code or 0)
