"""Figures over optimizer steps: update sparsity and flips, overlaps vs baselines, spectral drift.

Each function takes the data of :mod:`.series` for one or more runs (with their
labels) and returns ``(Figure, reading)``: the figure, and one line that says
what its data show. Nothing here reads the store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..store.schema import REFERENCE_MASKS
from .render import new_figure, run_colour, type_colour
from .series import OverlapSeries, SparsitySeries, SpectralSeries

__all__ = ["sparsity_figure", "sparsity_by_type_figure", "overlap_figure", "spectral_figure", "relation"]

MASK_TITLES = {"principal": "principal mask", "low": "low-magnitude mask", "principal_not_low": "principal, not low"}


def _pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _num(x: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def _last_finite(values: np.ndarray) -> float:
    finite = np.flatnonzero(np.isfinite(values))
    return float(values[finite[-1]]) if finite.size else float("nan")


def relation(observed: float, reference: float, *, tolerance: float = 0.005) -> str:
    """``above``, ``below`` or ``at`` (within ``tolerance``) for a reading; ``-`` if either is undefined."""
    if not (math.isfinite(observed) and math.isfinite(reference)):
        return "-"
    if observed > reference + tolerance:
        return "above"
    if observed < reference - tolerance:
        return "below"
    return "at"


def sparsity_figure(runs: Sequence[tuple[str, SparsitySeries]]) -> tuple[Figure, str]:
    """Global update sparsity over steps (left) and flips between snapshots (right), one line per run."""
    fig = new_figure(10.0, 3.6)
    left, right = fig.subplots(1, 2)
    for i, (label, s) in enumerate(runs):
        left.plot(s.steps, s.overall, color=run_colour(i), marker="o", markersize=3, linewidth=1.6, label=label)
        right.plot(s.steps, s.flips, color=run_colour(i), marker="o", markersize=3, linewidth=1.4, label=label)
    left.set(title="update sparsity of all linear weights", xlabel="optimizer step", ylabel="sparsity 1 - |M|/n")
    right.set(title="flips since the previous snapshot", xlabel="optimizer step", ylabel="fraction of weights |M_t xor M_t-1|/n")
    flips = np.concatenate([s.flips[np.isfinite(s.flips)] for _, s in runs] or [np.zeros(0)])
    if flips.size and flips.min() > 0 and flips.max() / flips.min() > 100:
        right.set_yscale("log")
    if len(runs) > 1:
        left.legend(loc="best")
    label, first = runs[0]
    if len(runs) == 1:
        reading = (
            f"Update sparsity of all linear weights goes from {_num(first.overall[0])} at step {int(first.steps[0])} "
            f"to {_num(first.overall[-1])} at step {int(first.steps[-1])}; between the last two snapshots "
            f"{_pct(_last_finite(first.flips))} of weights flipped."
        )
    else:
        finals = ", ".join(f"{lab} {_num(s.overall[-1])} (step {int(s.steps[-1])})" for lab, s in runs)
        reading = f"Update sparsity at each run's last snapshot: {finals}."
    return fig, reading


def sparsity_by_type_figure(runs: Sequence[tuple[str, SparsitySeries]]) -> tuple[Figure, str]:
    """Update sparsity per module type over steps, one panel per run (shared y axis)."""
    count = len(runs)
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig = new_figure(4.2 * cols + 1.6, 3.3 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
    for ax, (label, s) in zip(axes, runs):
        for j, (name, values) in enumerate(s.by_type.items()):
            ax.plot(s.steps, values, color=type_colour(name, j), linewidth=1.4, label=name)
        ax.plot(s.steps, s.overall, color="black", linewidth=2.2, linestyle="--", label="all linear")
        ax.set(title=f"{label}: update sparsity by module type", xlabel="optimizer step", ylabel="sparsity 1 - |M|/n")
    for ax in axes[count:]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right center", title="module type")
    parts = []
    for label, s in runs[:3]:
        finals = {name: float(v[-1]) for name, v in s.by_type.items() if math.isfinite(v[-1])}
        if finals:
            least = min(finals, key=finals.get)
            most = max(finals, key=finals.get)
            parts.append(f"{label}: least sparse {least} ({_num(finals[least])}), most sparse {most} ({_num(finals[most])})")
    reading = ("At the last snapshot, " + "; ".join(parts) + ".") if parts else "No module type has a defined sparsity."
    return fig, reading


def overlap_figure(runs: Sequence[tuple[str, OverlapSeries]]) -> tuple[Figure, str]:
    """Overlap with each reference mask over steps beside its random baseline and precision null (Fig. 5),
    and the first run's overlaps per module type at its last snapshot."""
    fig = new_figure(13.0, 3.7)
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.35]})
    for ax, mask in zip(axes[:3], REFERENCE_MASKS):
        for i, (label, s) in enumerate(runs):
            c = run_colour(i)
            ax.plot(s.steps, s.observed[mask], color=c, linewidth=1.8, marker="o", markersize=3, label=f"{label}: observed")
            ax.plot(s.steps, s.random[mask], color=c, linewidth=1.0, linestyle="--", label=f"{label}: random baseline")
            ax.plot(s.steps, s.null[mask], color=c, linewidth=1.2, linestyle=":", label=f"{label}: precision null")
        ax.set(title=f"overlap with the {MASK_TITLES[mask]}", xlabel="optimizer step", ylabel="|X∩M| / |M|")
    axes[0].legend(loc="best", fontsize=7)
    label, first = runs[0]
    ax = axes[3]
    # Types with no changed weight (overlaps undefined) are left out rather than drawn as empty slots.
    types = [t for t, v in first.final_by_type.items() if any(math.isfinite(v[m][0]) for m in REFERENCE_MASKS)]
    x = np.arange(len(types))
    width = 0.26
    for j, mask in enumerate(REFERENCE_MASKS):
        obs = [first.final_by_type[t][mask][0] for t in types]
        rnd = [first.final_by_type[t][mask][1] for t in types]
        nul = [first.final_by_type[t][mask][2] for t in types]
        pos = x + (j - 1) * width
        ax.bar(pos, obs, width=width * 0.9, color=("#4c72b0", "#dd8452", "#55a868")[j], label=MASK_TITLES[mask])
        ax.scatter(pos, rnd, marker="_", s=80, color="black", zorder=3, label="random baseline" if j == 0 else None)
        ax.scatter(pos, nul, marker="D", s=14, color="white", edgecolors="black", zorder=4, label="precision null" if j == 0 else None)
    ax.set_xticks(x, types)
    ax.set(title=f"{label} at step {int(first.steps[-1])}, per module type", ylabel="|X∩M| / |M|", ylim=(0, 1.32))
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(loc="upper center", fontsize=7, ncols=2)  # above the bars (y > 1), covering none
    parts = []
    for mask in REFERENCE_MASKS:
        obs, rnd, nul = (float(v[mask][-1]) for v in (first.observed, first.random, first.null))
        parts.append(f"{MASK_TITLES[mask]} {_num(obs)} ({relation(obs, rnd)} random {_num(rnd)}, {relation(obs, nul)} null {_num(nul)})")
    reading = f"{label} at step {int(first.steps[-1])}, overlap of the changed weights with the " + "; ".join(parts) + "."
    return fig, reading


_SPECTRAL_TITLES = {
    "nss": ("normalised spectral shift NSS", "NSS", True),
    "max_angle_deg": ("largest principal angle (top-k, left or right)", "degrees", False),
    "topk_energy_rel_change": ("top-k energy change (Ky Fan k-norm)", "relative change", True),
}


def _log_scale(ax, log: bool) -> None:
    """Log y for quantities spanning decades (NSS, energy): symlog where a line has zeros or signs."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=np.float64) for line in ax.lines] or [np.zeros(0)])
    finite = values[np.isfinite(values)]
    if not log or not (np.abs(finite) > 0).any():
        return
    if (finite > 0).all():
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=float(np.abs(finite[finite != 0]).min()))


def spectral_figure(label: str, s: SpectralSeries) -> tuple[Figure, str]:
    """NSS, largest principal angle and top-k energy change per module type over steps (top) and per
    layer at the last spectral snapshot (bottom) (Sec. 4.1, Fig. 4)."""
    fig = new_figure(13.0, 6.4)
    axes = fig.subplots(2, 3)
    k = f", k={s.k}" if s.k else ""
    for col, (field, (title, unit, log)) in enumerate(_SPECTRAL_TITLES.items()):
        top, bottom = axes[0, col], axes[1, col]
        for j, (name, views) in enumerate(s.by_type.items()):
            top.plot(s.steps, views[field], color=type_colour(name, j), marker="o", markersize=3, linewidth=1.4, label=name)
            layers, final = s.final_layers[name]
            bottom.plot(layers, final[field], color=type_colour(name, j), marker="o", markersize=3, linewidth=1.4, label=name)
        top.set(title=f"{title}{k}", xlabel="optimizer step", ylabel=unit + (" (mean over layers)" if field != "max_angle_deg" else " (max over layers)"))
        bottom.set(title=f"per layer at step {int(s.steps[-1])}", xlabel="layer", ylabel=unit)
        bottom.xaxis.get_major_locator().set_params(integer=True)
        for ax in (top, bottom):
            _log_scale(ax, log)
    axes[0, 0].legend(loc="best", title="module type")
    fig.suptitle(f"{label}: spectral drift from W0", fontsize=11)
    finals = {name: (float(np.nanmax(s.final_layers[name][1]["nss"])), float(np.nanmax(s.final_layers[name][1]["max_angle_deg"])))
              for name in s.by_type if np.isfinite(s.final_layers[name][1]["nss"]).any()}
    if finals:
        top_nss = max(finals, key=lambda n: finals[n][0])
        top_angle = max(finals, key=lambda n: finals[n][1])
        reading = (
            f"{label} at step {int(s.steps[-1])}: largest NSS {finals[top_nss][0]:.2e} ({top_nss}), largest principal angle "
            f"{finals[top_angle][1]:.3g} degrees ({top_angle})."
        )
    else:
        reading = f"{label}: spectral diagnostics are stored but undefined at step {int(s.steps[-1])}."
    return fig, reading
