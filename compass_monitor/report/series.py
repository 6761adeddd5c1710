"""The numbers each report figure draws, read from a run store (numpy only, no matplotlib).

Every ratio comes from ``compass_monitor.aggregates`` (the summary's and the TUI's
definitions) and every array from the store's reader, so a figure shows what
``summary`` prints and the TUI displays. Cost is bounded for large runs: the
time series use stored counts only; profiles read one stored row per matrix;
masks are decoded only for the matrices whose images are drawn.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..aggregates import GroupStats, by_module_type, everything_linear, group_stats, ratio
from ..store import ParamInfo, Run
from ..store.schema import COLS_PREFIX, REFERENCE_MASKS, ROWS_PREFIX, SPECTRAL_FIELDS
from ..tui.data import block_density, head_boundaries, head_dim_for

__all__ = [
    "TYPE_ORDER",
    "ordered_types",
    "SparsitySeries",
    "sparsity_series",
    "OverlapSeries",
    "overlap_series",
    "Profile",
    "matrix_profiles",
    "type_profiles",
    "MaskImages",
    "mask_images",
    "reduce_image",
    "SpectralSeries",
    "spectral_series",
    "choose_matrices",
    "head_dim",
]

#: Module types in the paper's order; other roles after them.
TYPE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other", "embedding", "lm_head", "norm", "bias")


def ordered_types(names: Any) -> list[str]:
    """``names`` in ``TYPE_ORDER``, unknown names last (sorted)."""
    names = list(names)
    return [t for t in TYPE_ORDER if t in names] + sorted(t for t in names if t not in TYPE_ORDER)


def _overall(run: Run) -> GroupStats:
    stats = group_stats(run, everything_linear).get("all linear")
    if stats is None:  # a store with no linear matrix: every matrix is the whole
        stats = group_stats(run, lambda p: "all linear")["all linear"]
    return stats


@dataclass(frozen=True)
class SparsitySeries:
    """Update sparsity ``1 - |M|/n`` (Def. 2.2) over snapshots.

    Attributes:
        steps: (T,) optimizer steps.
        overall: (T,) over all linear matrices.
        by_type: module type -> (T,).
        flips: (T,) fraction of linear weights whose changed bit flipped since the previous
            snapshot ``|M_t xor M_t-1| / n``; NaN at the first snapshot (no previous one).
    """

    steps: np.ndarray
    overall: np.ndarray
    by_type: dict[str, np.ndarray]
    flips: np.ndarray


def sparsity_series(run: Run) -> SparsitySeries:
    """Sparsity and flips of a run from its stored counts (``aggregates.group_stats``)."""
    overall = _overall(run)
    types = group_stats(run, by_module_type)
    flips = ratio(overall.flips_since_previous, overall.numel)
    if flips.size:
        flips[0] = np.nan
    return SparsitySeries(
        steps=np.asarray(run.steps),
        overall=overall.sparsity,
        by_type={name: types[name].sparsity for name in ordered_types(types)},
        flips=flips,
    )


@dataclass(frozen=True)
class OverlapSeries:
    """Overlap ``|X ∩ M| / |M|`` of all linear matrices with X = principal, low, principal-not-low (Sec. 4.2).

    Attributes:
        steps: (T,).
        observed, random, null: mask name -> (T,): the overlap, its random baseline (density of X,
            weighted by |M|) and the precision null.
        final_by_type: module type -> mask name -> (observed, random, null) at the last snapshot.
    """

    steps: np.ndarray
    observed: dict[str, np.ndarray]
    random: dict[str, np.ndarray]
    null: dict[str, np.ndarray]
    final_by_type: dict[str, dict[str, tuple[float, float, float]]]


def overlap_series(run: Run) -> OverlapSeries:
    overall = _overall(run)
    types = group_stats(run, by_module_type)
    final = {
        name: {m: (float(types[name].overlap[m][-1]), float(types[name].random_baseline[m][-1]), float(types[name].null[m][-1])) for m in REFERENCE_MASKS}
        for name in ordered_types(types)
    }
    return OverlapSeries(np.asarray(run.steps), dict(overall.overlap), dict(overall.random_baseline), dict(overall.null), final)


def head_dim(run: Run, fallback: int | None = None) -> int | None:
    """Attention head size from the run's metadata (``tui.data.head_dim_for``), else ``fallback``."""
    return head_dim_for(run.attrs, fallback)


@dataclass(frozen=True)
class Profile:
    """Row ratios ``rho_i = mean_j M_ij`` (m,) and column ratios ``kappa_j = mean_i M_ij`` (n,) (Sec. 2.2, Fig. 3),
    with the rows / columns where a new attention head starts (empty where heads do not apply)."""

    name: str
    rows: np.ndarray
    cols: np.ndarray
    row_heads: list[int]
    col_heads: list[int]
    matrices: int = 1


def _stored_row(run: Run, prefix: str, info: ParamInfo, t: int) -> np.ndarray:
    """One snapshot's row or column counts, read alone (not the matrix's whole series)."""
    return np.asarray(run.read_rows(f"{prefix}/{info.id}", t, t + 1))[0].astype(np.int64)


def matrix_profiles(run: Run, info: ParamInfo, t: int, *, head_size: int | None = None) -> Profile:
    """Profiles of one matrix at snapshot ``t`` from its stored row and column counts."""
    m, n = info.shape
    return Profile(
        name=info.name,
        rows=ratio(_stored_row(run, ROWS_PREFIX, info, t), n),
        cols=ratio(_stored_row(run, COLS_PREFIX, info, t), m),
        row_heads=head_boundaries(info, head_size, "rows"),
        col_heads=head_boundaries(info, head_size, "cols"),
    )


def type_profiles(run: Run, t: int, *, head_size: int | None = None) -> dict[str, Profile]:
    """Per module type, the profiles pooled over its matrices of the most common shape (the layers):
    ``rho_i = sum_layers |M|_row i / (layers * n)``, likewise for columns."""
    out: dict[str, Profile] = {}
    by_type: dict[str, list[ParamInfo]] = {}
    for p in run.params:
        if p.role == "linear":
            by_type.setdefault(p.module_type, []).append(p)
    for name in ordered_types(by_type):
        shape = Counter(p.shape for p in by_type[name]).most_common(1)[0][0]
        members = [p for p in by_type[name] if p.shape == shape]
        rows = sum(_stored_row(run, ROWS_PREFIX, p, t) for p in members)
        cols = sum(_stored_row(run, COLS_PREFIX, p, t) for p in members)
        m, n = shape
        out[name] = Profile(
            name=name,
            rows=ratio(rows, len(members) * n),
            cols=ratio(cols, len(members) * m),
            row_heads=head_boundaries(members[0], head_size, "rows"),
            col_heads=head_boundaries(members[0], head_size, "cols"),
            matrices=len(members),
        )
    return out


@dataclass(frozen=True)
class MaskImages:
    """Images of one matrix's mask at a snapshot (Fig. 2 style), each (h, w) float64 in [0, 1].

    ``changed`` is M (vs W0), ``flips`` is M_t xor M_t-1; for matrices larger than the image,
    each pixel is the block mean over ``block`` = (rows, cols) weights. ``changed_fraction`` and
    ``flipped_fraction`` are the exact fractions of the whole matrix.
    """

    name: str
    step: int
    changed: np.ndarray
    flips: np.ndarray
    block: tuple[float, float]
    changed_fraction: float
    flipped_fraction: float


def reduce_image(values: np.ndarray, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """``values`` (m, n) as an image of at most ``max_side`` pixels a side (block means, aspect kept),
    float64, with the weights per pixel (rows, cols)."""
    m, n = values.shape
    scale = max(m, n) / max_side
    rows, cols = (m, n) if scale <= 1 else (max(1, round(m / scale)), max(1, round(n / scale)))
    return block_density(values, rows, cols).astype(np.float64), (m / rows, n / cols)


def mask_images(run: Run, info: ParamInfo, t: int, *, max_side: int = 256) -> MaskImages:
    """Decode the masks of ``info`` at snapshots t and t-1 (only these) and reduce them to at most ``max_side`` pixels a side."""
    t = t % run.num_snapshots
    mask = run.mask(info, t)
    previous = run.mask(info, t - 1) if t > 0 else np.zeros_like(mask)
    flips = mask ^ previous
    changed, block = reduce_image(mask, max_side)
    return MaskImages(
        name=info.name,
        step=int(run.steps[t]),
        changed=changed,
        flips=reduce_image(flips, max_side)[0],
        block=block,
        changed_fraction=float(np.count_nonzero(mask)) / info.numel,
        flipped_fraction=float(np.count_nonzero(flips)) / info.numel,
    )


@dataclass(frozen=True)
class SpectralSeries:
    """Spectral drift (Sec. 4.1) per module type over the snapshots that carry it.

    Attributes:
        steps: (S,) steps with spectral diagnostics.
        by_type: module type -> field -> (S,): NSS and top-k energy change averaged over the
            type's matrices (layers), principal angles their maximum (left or right subspace).
        final_layers: module type -> (layers (L,), field -> (L,)) at the last spectral snapshot.
        k: the subspace size recorded in the run's config (``spectral_k``), or None.
    """

    steps: np.ndarray
    by_type: dict[str, dict[str, np.ndarray]]
    final_layers: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]
    k: int | None


SPECTRAL_VIEWS = ("nss", "max_angle_deg", "topk_energy_rel_change")


def _spectral_views(values: np.ndarray) -> dict[str, np.ndarray]:
    """(..., F) stored fields -> the three views: NSS, larger of the two angles, energy change."""
    f = {name: values[..., j] for j, name in enumerate(SPECTRAL_FIELDS)}
    angle = np.fmax(f["max_angle_left_deg"], f["max_angle_right_deg"])
    return {"nss": f["nss"], "max_angle_deg": angle, "topk_energy_rel_change": f["topk_energy_rel_change"]}


def spectral_series(run: Run) -> SpectralSeries | None:
    """None when the run stored no spectral diagnostics."""
    values = run.spectral_metrics
    if values is None or not np.isfinite(values).any():
        return None
    present = np.isfinite(values).any(axis=(1, 2))
    steps = np.asarray(run.steps)[present]
    values = values[present]
    by_type: dict[str, dict[str, np.ndarray]] = {}
    final: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    groups: dict[str, list[ParamInfo]] = {}
    for p in run.params:
        groups.setdefault(by_module_type(p) or p.role, []).append(p)
    for name in ordered_types(groups):
        idx = [p.index for p in groups[name]]
        views = _spectral_views(values[:, idx, :])
        if not np.isfinite(views["nss"]).any():
            continue
        with np.errstate(all="ignore"):
            by_type[name] = {
                "nss": _nan_reduce(np.nanmean, views["nss"]),
                "max_angle_deg": _nan_reduce(np.nanmax, views["max_angle_deg"]),
                "topk_energy_rel_change": _nan_reduce(np.nanmean, views["topk_energy_rel_change"]),
            }
        layers = np.array([p.layer for p in groups[name]])
        order = np.argsort(layers, kind="stable")
        final[name] = (layers[order], {key: v[-1][order] for key, v in views.items()})
    k = run.config.get("spectral_k")
    return SpectralSeries(steps, by_type, final, int(k) if isinstance(k, int) else None)


def _nan_reduce(fn: Any, values: np.ndarray) -> np.ndarray:
    """Reduce over matrices (axis 1), NaN where every matrix is NaN (no RuntimeWarning)."""
    out = np.full(values.shape[0], np.nan)
    ok = np.isfinite(values).any(axis=1)
    if ok.any():
        out[ok] = fn(values[ok], axis=1)
    return out


def choose_matrices(run: Run, names: list[str] | None = None, *, limit: int = 3) -> list[ParamInfo]:
    """The matrices whose profiles and masks the report draws: ``names`` if given, else the most
    changed (at the last snapshot) q, o and down matrices (the paper's Fig. 2/3 examples), else the
    most changed linear matrices.

    Raises:
        KeyError: a name is not a monitored matrix of the run.
    """
    if names:
        return [run.param(name) for name in names]
    if run.num_snapshots == 0:
        return []
    changed = ratio(run.count("changed")[-1], np.array([p.numel for p in run.params]))
    linear = [p for p in run.params if p.role == "linear"] or list(run.params)
    chosen: list[ParamInfo] = []
    for kind in ("q", "o", "down"):
        of_kind = [p for p in linear if p.module_type == kind]
        if of_kind:
            chosen.append(max(of_kind, key=lambda p: np.nan_to_num(changed[p.index], nan=-1.0)))
    for p in sorted(linear, key=lambda p: -np.nan_to_num(changed[p.index], nan=-1.0)):
        if len(chosen) >= limit:
            break
        if p not in chosen:
            chosen.append(p)
    return chosen[:limit]
