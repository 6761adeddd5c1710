"""Figures of matrices: row / column update-ratio profiles with head boundaries (Fig. 3), mask images (Fig. 2).

Functions take :mod:`.series` data (one entry per run, with its label) and
return ``(Figure, reading)``; nothing here reads the store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .render import head_lines, new_figure, run_colour
from .series import MaskImages, Profile

__all__ = ["type_profiles_figure", "matrix_profiles_figure", "mask_figure", "head_means"]

_AXES = {"rows": ("row update ratio rho_i = mean_j M_ij", "output row i"), "cols": ("column update ratio kappa_j = mean_i M_ij", "input column j")}


def head_means(values: np.ndarray, heads: list[int]) -> np.ndarray:
    """Mean of ``values`` over each head's span (heads start at 0 and at each boundary)."""
    edges = [0, *heads, len(values)]
    return np.array([values[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])


def _draw_profile(ax, runs: Sequence[tuple[str, Profile]], axis: str, title: str) -> None:
    for i, (label, p) in enumerate(runs):
        values = p.rows if axis == "rows" else p.cols
        ax.plot(np.arange(len(values)), values, color=run_colour(i), linewidth=1.0, label=label, drawstyle="steps-mid")
    first = runs[0][1]
    heads = first.row_heads if axis == "rows" else first.col_heads
    head_lines(ax, heads)
    ylabel, xlabel = _AXES[axis]
    ax.set(title=title + (f" ({len(heads) + 1} heads)" if heads else ""), xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))


def _spread(values: np.ndarray) -> float:
    """Coefficient of variation (std / mean) of a profile; NaN for an all-zero one."""
    mean = float(np.mean(values)) if values.size else 0.0
    return float(np.std(values)) / mean if mean > 0 else float("nan")


def _chance_spread(p: Profile, axis: str) -> float:
    """std/mean a profile would have if its changes fell uniformly at random: each ratio is then a mean of
    ``w = layers x (length of the other axis)`` Bernoulli(d) draws, so std/mean = sqrt((1 - d) / (d w))."""
    values, other = (p.rows, p.cols) if axis == "rows" else (p.cols, p.rows)
    d = float(np.mean(values)) if values.size else 0.0
    w = p.matrices * len(other)
    return math.sqrt((1 - d) / (d * w)) if 0 < d and w else float("nan")


def type_profiles_figure(runs: Sequence[tuple[str, dict[str, Profile]]], axis: str, step: int) -> tuple[Figure, str]:
    """One panel per module type: its row (``axis="rows"``) or column ratios pooled over layers, runs overlaid."""
    types = list(runs[0][1])
    cols = min(4, max(1, len(types)))
    rows = math.ceil(len(types) / cols)
    fig = new_figure(3.4 * cols, 2.7 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, types):
        present = [(label, profiles[name]) for label, profiles in runs if name in profiles]
        layers = present[0][1].matrices
        _draw_profile(ax, present, axis, f"{name}, mean of {layers} layer{'s' if layers != 1 else ''}")
        ax.set_ylabel("ratio" if ax is not axes[0] else ax.get_ylabel())
    for ax in axes[len(types):]:
        ax.set_visible(False)
    if len(runs) > 1:
        axes[0].legend(loc="best")
    word = "row" if axis == "rows" else "column"
    fig.suptitle(f"{word} update ratios per module type at step {step}", fontsize=11)
    label, first = runs[0]
    spread = {name: _spread(p.rows if axis == "rows" else p.cols) for name, p in first.items()}
    spread = {k: v for k, v in spread.items() if math.isfinite(v)}
    if spread:
        most = max(spread, key=spread.get)
        least = min(spread, key=spread.get)
        reading = (
            f"{label}: {word} ratios vary most across {word}s in {most} (std/mean {spread[most]:.2f}, "
            f"{_chance_spread(first[most], axis):.2f} for changes scattered at random) and least in {least} "
            f"({spread[least]:.2f}, random {_chance_spread(first[least], axis):.2f})."
        )
    else:
        reading = f"{label}: no changed weights at step {step}."
    return fig, reading


def matrix_profiles_figure(runs: Sequence[tuple[str, Sequence[Profile]]], step: int) -> tuple[Figure, str]:
    """For each chosen matrix, its row and column ratios with attention-head boundaries (runs overlaid)."""
    count = len(runs[0][1])
    fig = new_figure(11.0, 2.8 * count + 0.4)
    axes = fig.subplots(count, 2, squeeze=False)
    for k in range(count):
        per_run = [(label, profiles[k]) for label, profiles in runs]
        name = per_run[0][1].name
        _draw_profile(axes[k, 0], per_run, "rows", f"{name}: rows")
        _draw_profile(axes[k, 1], per_run, "cols", f"{name}: columns")
    if len(runs) > 1:
        axes[0, 0].legend(loc="best")
    fig.suptitle(f"row and column update ratios at step {step} (dashed: attention-head boundaries)", fontsize=11)
    label, profiles = runs[0]
    parts = []
    for p in profiles:
        heads, values = (p.row_heads, p.rows) if p.row_heads else (p.col_heads, p.cols)
        if heads:
            means = head_means(values, heads)
            parts.append(f"{p.name} heads range {means.min():.2f}-{means.max():.2f} (most updated head {int(np.argmax(means))})")
        else:
            parts.append(f"{p.name} rows {p.rows.min():.2f}-{p.rows.max():.2f}, columns {p.cols.min():.2f}-{p.cols.max():.2f}")
    return fig, f"{label}: " + "; ".join(parts) + "."


def mask_figure(runs: Sequence[tuple[str, MaskImages]], *, row_heads: list[int] = (), col_heads: list[int] = ()) -> tuple[Figure, str]:
    """One matrix's mask (changed vs W0) and its flips since the previous snapshot, one row per run."""
    count = len(runs)
    first = runs[0][1]
    h, w = first.changed.shape
    aspect = h / max(w, 1)
    panel = 4.2
    fig = new_figure(2 * panel + 1.4, min(count * panel * aspect + 0.9, 22.0) if aspect > 0 else 4)
    axes = fig.subplots(count, 2, squeeze=False)
    flip_max = max(float(np.max(img.flips)) if img.flips.size else 0.0 for _, img in runs)
    flip_max = max(flip_max, 1e-6)
    for r, (label, img) in enumerate(runs):
        shown = axes[r, 0].imshow(img.changed, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        flips = axes[r, 1].imshow(img.flips, cmap="magma", vmin=0.0, vmax=flip_max, interpolation="nearest", aspect="auto")
        block = "" if img.block == (1.0, 1.0) else f", {img.block[0]:.0f}x{img.block[1]:.0f} weights per pixel"
        axes[r, 0].set_title(f"{label}: changed vs W0 at step {img.step}{block}", fontsize=9)
        axes[r, 1].set_title(f"flips since the previous snapshot", fontsize=9)
        for ax in axes[r]:
            ax.grid(False)
            ax.set(xlabel="input column", ylabel="output row")
            for b in row_heads:
                ax.axhline(b / img.block[0] - 0.5, color="white", linewidth=0.5, alpha=0.7)
            for b in col_heads:
                ax.axvline(b / img.block[1] - 0.5, color="white", linewidth=0.5, alpha=0.7)
        if r == 0:
            fig.colorbar(shown, ax=axes[:, 0].tolist(), shrink=0.8, label="changed fraction")
            fig.colorbar(flips, ax=axes[:, 1].tolist(), shrink=0.8, label="flipped fraction")
    fig.suptitle(first.name, fontsize=11)
    parts = [f"{label} {100 * img.changed_fraction:.1f}% changed, {100 * img.flipped_fraction:.2f}% flipped" for label, img in runs[:4]]
    return fig, f"{first.name} at step {first.step}: " + "; ".join(parts) + "."
