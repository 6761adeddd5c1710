"""The loop a follower worker runs: load a run, then poll its commit file (no Textual: the caller turns reports into messages)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import RunView, describe_error
from .source import RunSource

__all__ = ["follow_run"]

#: consecutive failed polls of a run that was readable before they are reported
_TOLERATED_FAILURES = 3


#: ``changed(view, run, commit, new_snapshots)``: the run has new data, or only a new commit (status, heartbeat)
Changed = Callable[[RunView, Any, dict[str, Any], int], None]
#: ``failed(reason)``: the run cannot be read; ``reason`` is one line for the user
Failed = Callable[[str], None]


def follow_run(path: Path, *, changed: Changed, failed: Failed, interval: float, cancelled: Callable[[], bool]) -> None:
    """Call ``changed`` on load and on every new commit until ``cancelled()`` (in the calling thread).

    Errors never escape: a run that cannot be read (yet) is reported with
    ``failed`` and retried every ``interval``, so a run that appears later, or
    a store caught mid-write, recovers by itself.
    """
    source = RunSource(path)
    loaded = False
    last_commit: dict[str, Any] | None = None
    last_error: str | None = None
    failures = 0
    while not cancelled():
        try:
            # The rest of a run that load() read only the latest part of: after one interval, so
            # that the first paint does not wait for it (the UI thread needs the GIL to paint).
            if loaded and source.complete() is not None:
                changed(source.view, source.run, source.commit, 0)
            update = source.poll() if loaded else source.load()
            loaded = True
            failures = 0
            last_error = None
            if update.view is not None or update.commit != last_commit:
                last_commit = update.commit
                changed(source.view, source.run, update.commit, update.new_snapshots)
        except Exception as exc:  # reported in the UI, never raised into Textual
            failures += 1
            reason = describe_error(exc)
            if (not loaded or failures >= _TOLERATED_FAILURES) and reason != last_error:
                last_error = reason
                failed(reason)
        deadline = time.monotonic() + interval
        while not cancelled() and time.monotonic() < deadline:
            time.sleep(min(0.05, interval))
