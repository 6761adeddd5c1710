"""Shared helpers of the TUI tests: waiting on a running app, reading what it shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from textual.widgets import Static


async def wait_for(pilot, predicate: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition") -> float:
    """Let the app run until ``predicate()`` holds; returns the seconds it took.

    ``timeout`` only bounds a hang (the wait ends as soon as the predicate holds):
    generous, because CI machines are shared and slow at times.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.02)
    return time.monotonic() - start


def text_of(screen, selector: str) -> str:
    """Plain text of a Static on a screen."""
    return str(screen.query_one(selector, Static).content)


def heatmap_text(heatmap) -> list[str]:
    """What a heatmap draws, line by line (plain text)."""
    return [heatmap.render_line(y).text for y in range(heatmap.size.height)]


async def read_line(proc, timeout: float = 60.0) -> str:
    """A line from a subprocess's stdout without blocking the event loop."""
    loop = asyncio.get_running_loop()
    return (await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), timeout)).strip()
