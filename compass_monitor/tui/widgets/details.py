"""Text blocks beside the heatmaps: the selected matrix's numbers at the cursor's snapshot."""

from __future__ import annotations

import math

import numpy as np
from rich.text import Text

from ..data import RunView, overlap_series

__all__ = ["sparkline", "matrix_details", "compare_details", "fmt"]

_BARS = "▁▂▃▄▅▆▇█"
_MASK_LABELS = {"principal": "princ", "low": "low", "principal_not_low": "p¬low"}


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def sparkline(values: np.ndarray, width: int, *, lo: float = 0.0, hi: float = 1.0) -> str:
    """The last ``width`` values as bars on the scale lo..hi (NaN as a space)."""
    values = np.asarray(values, dtype=np.float64)[-width:] if width > 0 else np.zeros(0)
    span = hi - lo if hi > lo else 1.0
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(" ")
        else:
            out.append(_BARS[int(min(max((v - lo) / span, 0.0), 0.999) * len(_BARS))])
    return "".join(out)


def matrix_details(view: RunView, index: int, t: int, *, width: int = 30) -> Text:
    """Name, shape, density, flips and the three overlaps with both baselines at snapshot ``t``."""
    p = view.params[index]
    density = view.density[:, index]
    text = Text()
    text.append(p.name + "\n", style="bold")
    kind = p.module_type if p.role == "linear" else p.role
    text.append(f"{p.shape[0]}x{p.shape[1]}  layer {p.layer}  {kind}\n", style="grey70")
    if view.num_snapshots == 0:
        text.append("no snapshots yet\n")
        return text
    t = t % view.num_snapshots
    flips = view.flip_rate[t, index]
    text.append(f"step {int(view.steps[t])} ({t + 1}/{view.num_snapshots})\n")
    text.append("changed |M|/n  ", style="grey70")
    text.append(f"{fmt(density[t])}\n", style="bold")
    text.append("sparsity       ", style="grey70")
    text.append(f"{fmt(1 - density[t])}\n")
    text.append("flips vs prev  ", style="grey70")
    text.append(f"{fmt(flips, 4)}\n")
    text.append(sparkline(density[: t + 1], max(4, width - 2)) + "\n", style="cyan")
    text.append("\noverlap  |X∩M|/|M|\n", style="grey70")
    text.append(f"{'':6}{'obs':>7}{'rand':>7}{'null':>7}\n", style="grey70")
    for series in overlap_series(view, index):
        null = None if series.null is None else series.null[t]
        observed = series.observed[t]
        style = ""
        if math.isfinite(observed) and null is not None and math.isfinite(null):
            style = "green" if observed > null + 0.02 else ("magenta" if observed < null - 0.02 else "")
        text.append(f"{_MASK_LABELS[series.name]:<6}")
        text.append(f"{fmt(observed):>7}", style=style)
        text.append(f"{fmt(series.random[t]):>7}{fmt(null):>7}\n")
    return text


def compare_details(a: RunView, b: RunView, ia: int, ib: int, ta: int, tb: int, jaccard: tuple[float, float] | None) -> Text:
    """Run A vs run B for one matrix at one aligned snapshot."""
    text = Text()
    text.append(a.params[ia].name + "\n", style="bold")
    text.append(f"step A {int(a.steps[ta])}  B {int(b.steps[tb])}\n\n", style="grey70")
    text.append(f"{'':8}{'A':>7}{'B':>8}{'A-B':>8}\n", style="grey70")
    rows = [("changed", a.density[ta, ia], b.density[tb, ib], 3)]
    for j, name in enumerate(_MASK_LABELS):
        rows.append((_MASK_LABELS[name], a.overlap(j)[ta, ia], b.overlap(j)[tb, ib], 3))
    rows.append(("flips", a.flip_rate[ta, ia], b.flip_rate[tb, ib], 4))
    for label, x, y, digits in rows:
        text.append(f"{label:<8}", style="grey70")
        # One space at least between columns: ``-0.0014`` fills 7 characters (issue 16 item 8).
        text.append(f"{fmt(x, digits):>7} {fmt(y, digits):>7} {fmt(x - y, digits):>7}\n")
    text.append("\nmask Jaccard |A∩B|/|A∪B|\n", style="grey70")
    if jaccard is None:
        text.append("computing...\n")
    else:
        text.append(f"{fmt(jaccard[0])}  (independent {fmt(jaccard[1])})\n")
    return text
