"""matplotlib set-up shared by the report's figures: figures without pyplot, colours, saving PNG + SVG.

Figures are ``matplotlib.figure.Figure`` objects made directly (no pyplot, so no
global figure registry and no GUI backend); saving renders them with the Agg
(PNG) and SVG canvases. Importing this module imports matplotlib: the report
package imports it only when a report is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["FigureEntry", "styled", "new_figure", "save", "run_colour", "type_colour", "head_lines", "DPI", "STYLE"]

DPI = 110
#: rc settings applied to every figure (legible at 100%: 9-10 pt text at 110 dpi).
STYLE = {
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "legend.fontsize": 8.0,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "svg.hashsalt": "compass-monitor",  # stable ids in the SVG files
}
_RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
_TYPE_COLOURS = {
    "q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c", "qkv": "#17becf", "o": "#d62728",
    "gate": "#9467bd", "up": "#8c564b", "gate_up": "#bcbd22", "down": "#e377c2", "other": "#7f7f7f",
}


@dataclass(frozen=True)
class FigureEntry:
    """One figure of a report: file stem, title, a one-line reading drawn from its data, and its files."""

    name: str
    title: str
    reading: str
    files: tuple[Path, ...]


def styled() -> Any:
    """Context in which figures are drawn and saved with the report's rc settings (``STYLE``);
    rcParams are read when artists are made, so the whole drawing happens inside it."""
    import matplotlib

    return matplotlib.rc_context(STYLE)


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches with constrained layout (draw it inside :func:`styled`)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Figure, out_dir: Path, name: str) -> tuple[Path, ...]:
    """Write ``name.png`` and ``name.svg`` under ``out_dir``; returns their paths."""
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"{name}.{ext}"
        metadata = {"Date": None} if ext == "svg" else {"Software": "compass-monitor"}
        fig.savefig(path, format=ext, dpi=DPI, metadata=metadata)
        paths.append(path)
    return tuple(paths)


def run_colour(index: int) -> str:
    return _RUN_COLOURS[index % len(_RUN_COLOURS)]


def type_colour(name: str, fallback_index: int = 0) -> str:
    return _TYPE_COLOURS.get(name, _RUN_COLOURS[fallback_index % len(_RUN_COLOURS)])


def head_lines(ax: Axes, positions: list[int], *, vertical: bool = True) -> None:
    """Grey dashed lines where attention heads start (paper Fig. 3)."""
    for x in positions:
        if vertical:
            ax.axvline(x - 0.5, color="0.55", linestyle="--", linewidth=0.6, zorder=0)
        else:
            ax.axhline(x - 0.5, color="0.55", linestyle="--", linewidth=0.6, zorder=0)
