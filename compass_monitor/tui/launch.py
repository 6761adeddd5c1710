"""Entry points of ``compass-monitor tui`` and ``compass-monitor replay`` (Textual is imported here, lazily)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

__all__ = ["run_tui"]


def run_tui(path: str | Path, *, replay: bool = False, speed: float = 2.0, head_dim: int = 64, stale_after: float = 120.0) -> int:
    """Run the app in the foreground until the user quits. Returns a process exit code."""
    try:
        from .app import CompassApp
    except ImportError as exc:
        print(f"compass-monitor: the TUI needs Textual ({exc}); install it with: pip install 'compass-monitor[tui]'", file=sys.stderr)
        return 2
    if speed <= 0:
        print(f"compass-monitor: --speed must be > 0, got {speed}", file=sys.stderr)
        return 2
    if head_dim <= 0:
        print(f"compass-monitor: --head-dim must be > 0, got {head_dim}", file=sys.stderr)
        return 2
    # zarr warns about non-zarr files (commit.json) when it opens a run; on stderr that would tear the screen.
    warnings.filterwarnings("ignore", module=r"zarr(\..*)?$")
    CompassApp(path, replay=replay, speed=speed, head_dim=head_dim, stale_after=stale_after).run()
    return 0
