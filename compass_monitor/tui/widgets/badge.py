"""The run's status badge (LIVE, PAUSED, FINISHED, STALE ...) as shown in screen headers."""

from __future__ import annotations

from rich.text import Text

__all__ = ["badge_text"]

_BADGE_STYLES = {"LIVE": "black on green", "PAUSED": "black on yellow", "FINISHED": "white on blue", "STALE": "white on red", "CRASHED": "white on red",
                 "DISABLED": "white on magenta", "REPLAY": "black on cyan", "ERROR": "white on red", "WAITING": "black on grey70"}


def badge_text(word: str) -> Text:
    """``word`` (from :func:`..data.badge`) in its colours, padded by a space each side."""
    style = _BADGE_STYLES.get(word.split()[0], "reverse")
    return Text(f" {word} ", style=style)
