"""Colour scales that read the same in 256-colour and true-colour terminals.

Every colour is an xterm-256 palette index (``color(n)``), chosen from the
6x6x6 cube and the grey ramp, so a terminal without true colour shows exactly
the intended shades. The sequential scale follows viridis (dark purple = no
change, yellow = all changed); values that are exactly zero get a neutral dark
grey so that untouched matrices stand apart; the diverging scale (run A minus
run B) goes blue - grey - red.
"""

from __future__ import annotations

import math

from rich.color import Color
from rich.style import Style

__all__ = ["SEQUENTIAL", "DIVERGING", "ZERO", "MISSING", "colour", "cell_style", "legend"]

# viridis, sampled at 12 points and snapped to the xterm cube.
SEQUENTIAL: tuple[int, ...] = (53, 54, 60, 61, 67, 30, 36, 35, 71, 113, 149, 184, 226)
# blue -> grey -> red
DIVERGING: tuple[int, ...] = (21, 27, 33, 39, 74, 110, 244, 174, 167, 203, 197, 160, 124)
ZERO = 236  # exactly zero: nothing changed
MISSING = 234  # no data (NaN: no change to take an overlap of)

_COLOURS = {i: Color.from_ansi(i) for i in set(SEQUENTIAL) | set(DIVERGING) | {ZERO, MISSING}}


def colour_index(value: float, *, lo: float = 0.0, hi: float = 1.0, diverging: bool = False) -> int:
    """The palette index for ``value`` on the scale ``lo..hi`` (clipped)."""
    if value is None or not math.isfinite(value):
        return MISSING
    if not diverging and value == 0.0:
        return ZERO
    scale = DIVERGING if diverging else SEQUENTIAL
    span = hi - lo
    x = 0.5 if span <= 0 else (value - lo) / span
    x = min(1.0, max(0.0, x))
    return scale[min(len(scale) - 1, int(x * len(scale)))]


def colour(value: float, *, lo: float = 0.0, hi: float = 1.0, diverging: bool = False) -> Color:
    return _COLOURS[colour_index(value, lo=lo, hi=hi, diverging=diverging)]


_STYLE_CACHE: dict[tuple[int, int | None], Style] = {}


def cell_style(bg: int, fg: int | None = None) -> Style:
    """A cached style with palette background ``bg`` (and foreground ``fg``)."""
    key = (bg, fg)
    style = _STYLE_CACHE.get(key)
    if style is None:
        style = Style(bgcolor=Color.from_ansi(bg), color=None if fg is None else Color.from_ansi(fg))
        _STYLE_CACHE[key] = style
    return style


def legend(lo: float, hi: float, *, diverging: bool = False, fmt: str = "{:.2f}") -> list[tuple[str, Style]]:
    """Segments of a one-line colour legend ``lo ████ hi``."""
    scale = DIVERGING if diverging else SEQUENTIAL
    segments: list[tuple[str, Style]] = [(fmt.format(lo) + " ", Style())]
    segments += [(" ", cell_style(i)) for i in scale]
    segments.append((" " + fmt.format(hi), Style()))
    return segments
