"""Where a rank's snapshots go: the store writer on rank 0, a do-nothing sink elsewhere.

Ranks that do not write get :class:`NullSink`, which has the interface of
``store.async_writer.AsyncWriter`` and does nothing (the metric-logger pattern
of torchtitan), so the monitor's logic holds no ``if rank == 0`` checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["NullSink"]


class NullSink:
    """Stands in for the store writer on ranks that do not write (every call is a no-op)."""

    error: BaseException | None = None
    error_context = ""
    skipped = 0
    num_snapshots = 0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.writer = self

    def full(self) -> bool:
        return False

    def submit(self, record: Any) -> bool:
        return True

    def submit_base(self, **kwargs: Any) -> bool:
        return True

    def note_gap(self, step: int) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def call(self, fn: Any) -> None:
        return None

    def close(self, status: str = "finished", **event: Any) -> None:
        pass

    def abort(self, status: str = "disabled", **event: Any) -> None:
        pass

    def mark(self, status: str, **event: Any) -> None:
        pass
