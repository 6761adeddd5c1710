"""Cross-run figures (two or more runs of one base): Jaccard vs the independent baseline, consensus (Fig. 2, Fig. 8).

Functions take :class:`.crossrun.CrossRunStats` (and consensus maps computed
from it) and return ``(Figure, reading)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from .compare_table import ordered_groups, run_letters
from .crossrun import CrossRunStats, GroupOverlap
from .render import new_figure

__all__ = ["jaccard_figure", "consensus_figure", "excess"]


def excess(g: GroupOverlap) -> float:
    """Mean pairwise Jaccard over its independent baseline (1 = chance)."""
    return g.mean_jaccard / g.mean_baseline if g.mean_baseline > 0 else float("nan")


def _pair_range(m: np.ndarray) -> tuple[float, float]:
    off = m[~np.eye(m.shape[0], dtype=bool)]
    off = off[np.isfinite(off)]
    return (float(off.min()), float(off.max())) if off.size else (float("nan"), float("nan"))


def jaccard_figure(stats: CrossRunStats) -> tuple[Figure, str]:
    """Mean pairwise Jaccard per group beside the independent baseline (pair range as whiskers), and the
    pairwise Jaccard matrix of all linear matrices (Fig. 8)."""
    groups = [g for g in ordered_groups(stats) if np.isfinite(g.mean_jaccard)]  # no changed weight: undefined, left out
    fig = new_figure(12.0, 4.0)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.8, 1]})
    x = np.arange(len(groups))
    observed = np.array([g.mean_jaccard for g in groups])
    baseline = np.array([g.mean_baseline for g in groups])
    left.bar(x - 0.2, observed, width=0.38, color="#4c72b0", label="Jaccard |A∩B|/|A∪B| (mean over pairs)")
    left.bar(x + 0.2, baseline, width=0.38, color="#c7c7c7", edgecolor="0.4", hatch="//", label="independent baseline pq/(p+q-pq)")
    if stats.num_runs > 2:
        lo_hi = np.array([_pair_range(g.jaccard) for g in groups])
        left.errorbar(x - 0.2, observed, yerr=[observed - lo_hi[:, 0], lo_hi[:, 1] - observed], fmt="none", ecolor="black", capsize=3, linewidth=0.8)
    left.set_xticks(x, [g.name for g in groups])
    left.set(title=f"final masks at step {stats.step}: Jaccard per module type ({stats.num_runs} runs)", ylabel="Jaccard", ylim=(0, 1))
    left.legend(loc="upper left")
    overall = next(g for g in groups if g.name == "all linear") if any(g.name == "all linear" for g in groups) else groups[0]
    letters = run_letters(stats.num_runs)
    right.grid(False)
    shown = overall.jaccard.copy()
    np.fill_diagonal(shown, np.nan)  # a run with itself (1) would swamp the colour scale
    image = right.imshow(np.ma.masked_invalid(shown), vmin=0.0, vmax=1.0, cmap="viridis")
    for a in range(stats.num_runs):
        for b in range(stats.num_runs):
            if a != b:
                value = overall.jaccard[a, b]
                right.text(b, a, f"{value:.2f}\n({overall.baseline[a, b]:.2f})", ha="center", va="center", fontsize=7,
                           color="white" if value < 0.6 else "black")
    ticks = [f"{x} {label}" if stats.num_runs <= 4 else x for x, label in zip(letters, stats.labels)]
    right.set_xticks(range(stats.num_runs), ticks, rotation=30, ha="right")
    right.set_yticks(range(stats.num_runs), ticks)
    right.set_title(f"{overall.name}: pairwise Jaccard (independent)")
    fig.colorbar(image, ax=right, shrink=0.85, label="Jaccard")
    finite = [g for g in groups if g.name != "all linear" and np.isfinite(excess(g))]
    best = max(finite, key=excess) if finite else None
    reading = (
        f"At step {stats.step}, the runs' masks of {overall.name} weights overlap with mean Jaccard {overall.mean_jaccard:.3f} "
        f"against {overall.mean_baseline:.3f} if they changed weights independently ({excess(overall):.2f}x)"
        + (f"; the most shared module type is {best.name} ({excess(best):.2f}x)." if best else ".")
    )
    return fig, reading


def consensus_figure(stats: CrossRunStats, maps: Sequence[tuple[str, np.ndarray, tuple[float, float], list[int], list[int]]]) -> tuple[Figure, str]:
    """Consensus maps ``C = mean_r M^(r)`` of chosen matrices and the histogram of C over all linear weights
    beside the independence expectation (Fig. 2).

    Args:
        maps: per matrix (name, C image (h, w) in [0, 1], weights per pixel (rows, cols), row head starts, column head starts).
    """
    r = stats.num_runs
    fig = new_figure(4.3 * len(maps) + 4.6, 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(maps) + 1, squeeze=False)).ravel()
    image = None
    for ax, (name, values, block, row_heads, col_heads) in zip(axes, maps):
        ax.grid(False)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="cividis", interpolation="nearest", aspect="auto")
        for b in row_heads:
            ax.axhline(b / block[0] - 0.5, color="white", linewidth=0.5, alpha=0.7)
        for b in col_heads:
            ax.axvline(b / block[1] - 0.5, color="white", linewidth=0.5, alpha=0.7)
        per_pixel = "" if block == (1.0, 1.0) else f"\n{block[0]:.0f}x{block[1]:.0f} weights per pixel"
        ax.set(title=f"{name}{per_pixel}", xlabel="input column", ylabel="output row")
        ax.title.set_fontsize(8)
    if image is not None:
        fig.colorbar(image, ax=axes[: len(maps)].tolist(), shrink=0.85, label=f"consensus C (fraction of {r} runs)")
    ax = axes[-1]
    overall = stats.overall() or ordered_groups(stats)[0]
    total = max(overall.numel, 1)
    k = np.arange(r + 1)
    ax.bar(k - 0.2, overall.consensus / total, width=0.38, color="#4c72b0", label="observed")
    ax.bar(k + 0.2, overall.consensus_expected / total, width=0.38, color="#c7c7c7", edgecolor="0.4", hatch="//", label="if runs were independent")
    ax.set_xticks(k, [f"{i}/{r}" for i in k])
    ax.set(title=f"consensus over {overall.name} weights at step {stats.step}", xlabel="C = fraction of runs that changed the weight",
           ylabel="fraction of weights")
    ax.legend(loc="best")
    all_obs, all_exp = overall.consensus[r] / total, overall.consensus_expected[r] / total
    none_obs, none_exp = overall.consensus[0] / total, overall.consensus_expected[0] / total
    reading = (
        f"At step {stats.step}, {100 * all_obs:.1f}% of {overall.name} weights changed in all {r} runs against "
        f"{100 * all_exp:.1f}% if the runs were independent, and {100 * none_obs:.1f}% in none (independent: {100 * none_exp:.1f}%)."
    )
    return fig, reading
