"""Messages that workers post to screens (posting a message is thread-safe)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.message import Message

from .data import RunView
from .follow import follow_run

__all__ = ["RunChanged", "RunFailed", "follow_posting"]


class RunChanged(Message):
    """A followed run has new data (``view``), or only a new commit (status, heartbeat)."""

    def __init__(self, key: str, view: RunView, run: Any, commit: dict[str, Any], new_snapshots: int) -> None:
        super().__init__()
        self.key = key
        self.view = view
        self.run = run
        self.commit = commit
        self.new_snapshots = new_snapshots


class RunFailed(Message):
    """A followed run cannot be read; ``reason`` is one line for the user."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__()
        self.key = key
        self.reason = reason


def follow_posting(target: Any, key: str, path: Path, *, interval: float, cancelled: Callable[[], bool]) -> None:
    """:func:`follow_run` that posts :class:`RunChanged` / :class:`RunFailed` (tagged ``key``) to ``target``."""
    follow_run(
        path,
        changed=lambda view, run, commit, new: target.post_message(RunChanged(key, view, run, commit, new)),
        failed=lambda reason: target.post_message(RunFailed(key, reason)),
        interval=interval,
        cancelled=cancelled,
    )
