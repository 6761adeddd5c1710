"""Ratios and group aggregates derived from a run's stored counts.

The store keeps raw counts; every ratio a report shows is derived here, so the
definitions live in one place:

* update sparsity ``1 - |M| / n`` (Def. 2.2), per group ``1 - sum|M| / sum n``;
* overlap ``|X ∩ M| / |M|`` (Sec. 4.2), per group ``sum|X ∩ M| / sum|M|``;
* random baseline of an overlap: the density of X (alpha for the principal and
  low masks), per group weighted by each matrix's ``|M|``, i.e. the overlap if
  every matrix's changes fell uniformly at random inside it;
* precision null (``precision_null``), per group weighted the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .store import Run, ParamInfo
from .store.schema import COUNT_FIELDS, REFERENCE_MASKS
from .vocabulary import INTERSECTION_FIELDS as _INTERSECTION_FIELDS

__all__ = ["GroupStats", "aggregate_counts", "group_stats", "scalars", "spectral_scalars", "by_module_type", "by_role", "by_layer", "everything_linear"]


@dataclass(frozen=True)
class GroupStats:
    """Per-snapshot statistics of a group of matrices; arrays have shape (T,)."""

    name: str
    num_matrices: int
    numel: int
    changed: np.ndarray
    sparsity: np.ndarray
    flips_since_previous: np.ndarray
    overlap: dict[str, np.ndarray]
    random_baseline: dict[str, np.ndarray]
    null: dict[str, np.ndarray]


def by_module_type(p: Any) -> str | None:
    """Linear matrices by module type (q, k, v, o, gate, up, down); other roles by role."""
    return p.module_type if p.role == "linear" else p.role


def by_role(p: Any) -> str | None:
    return p.role


def by_layer(p: Any) -> str | None:
    """Linear matrices by block index; matrices outside blocks are left out."""
    return f"layer {p.layer}" if p.role == "linear" and p.layer >= 0 else None


def everything_linear(p: Any) -> str | None:
    """All linear matrices as one group (the paper's global numbers)."""
    return "all linear" if p.role == "linear" else None


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def group_stats(run: Run, key: Callable[[ParamInfo], str | None]) -> dict[str, GroupStats]:
    """Aggregate a run's counts over the groups that ``key`` assigns (None leaves a matrix out)."""
    return aggregate_counts(
        params=run.params,
        counts=run.counts,
        null=run.null_overlap,
        mask_sizes=run.base_class_counts[:, 1:, :].sum(axis=2),
        key=key,
    )


def aggregate_counts(
    *,
    params: Sequence[Any],
    counts: np.ndarray,
    null: np.ndarray,
    mask_sizes: np.ndarray,
    key: Callable[[Any], str | None],
) -> dict[str, GroupStats]:
    """Group aggregates from raw arrays.

    Args:
        params: objects with ``shape``, ``role``, ``module_type``, ``layer``
            (``ParamInfo`` or ``ParamSpec``), in store order.
        counts: (T, P, F) counts in ``COUNT_FIELDS`` order.
        null: (T, P, 3) precision-null overlaps.
        mask_sizes: (P, 3) sizes of the reference masks.
        key: group name of a parameter, or None to leave it out.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        name = key(p)
        if name is not None:
            groups.setdefault(name, []).append(i)
    counts = np.asarray(counts, dtype=np.float64)
    numel = np.array([p.shape[0] * p.shape[1] for p in params], dtype=np.float64)
    mask_sizes = np.asarray(mask_sizes, dtype=np.float64)
    changed_all = counts[:, :, COUNT_FIELDS.index("changed")]
    result = {}
    for name, idx in groups.items():
        changed = changed_all[:, idx]
        total_changed = changed.sum(axis=1)
        n = numel[idx].sum()
        overlap, baseline, null_g = {}, {}, {}
        for j, (mask, field) in enumerate(zip(REFERENCE_MASKS, _INTERSECTION_FIELDS)):
            inter = counts[:, idx, COUNT_FIELDS.index(field)].sum(axis=1)
            overlap[mask] = _ratio(inter, total_changed)
            density = mask_sizes[idx, j] / numel[idx]
            baseline[mask] = _ratio((changed * density).sum(axis=1), total_changed)
            null_g[mask] = _ratio(np.nansum(changed * null[:, idx, j], axis=1), total_changed)
        result[name] = GroupStats(
            name=name,
            num_matrices=len(idx),
            numel=int(n),
            changed=total_changed,
            sparsity=1.0 - total_changed / n,
            flips_since_previous=counts[:, idx, COUNT_FIELDS.index("flips_since_previous")].sum(axis=1),
            overlap=overlap,
            random_baseline=baseline,
            null=null_g,
        )
    return result


def scalars(stats: dict[str, GroupStats], *, prefix: str = "compass", index: int = -1) -> dict[str, float]:
    """Flat ``{name: value}`` scalars of one snapshot, for loggers (wandb, TensorBoard, ...).

    Keys: ``{prefix}/{group}/sparsity``, ``.../overlap_{mask}``, ``.../rand_{mask}``,
    ``.../null_{mask}`` and ``.../flips`` (the fraction of the group's weights whose
    changed bit flipped since the previous snapshot, like every other scalar a fraction).
    """
    out: dict[str, float] = {}
    for name, s in stats.items():
        base = f"{prefix}/{name.replace(' ', '_')}"
        out[f"{base}/sparsity"] = float(s.sparsity[index])
        out[f"{base}/flips"] = float(s.flips_since_previous[index] / s.numel) if s.numel else float("nan")
        for mask in REFERENCE_MASKS:
            out[f"{base}/overlap_{mask}"] = float(s.overlap[mask][index])
            out[f"{base}/rand_{mask}"] = float(s.random_baseline[mask][index])
            out[f"{base}/null_{mask}"] = float(s.null[mask][index])
    return out


def spectral_scalars(
    params: Sequence[Any], spectral: np.ndarray, *, key: Callable[[Any], str | None], prefix: str = "compass"
) -> dict[str, float]:
    """Per-group spectral scalars of one spectral snapshot, for loggers.

    Args:
        params: the monitored matrices, in store order.
        spectral: (P, len(SPECTRAL_FIELDS)) float64, NaN where not computed.
        key: group name of a matrix, or None to leave it out.

    Keys ``{prefix}/{group}/{field}``: the mean over the group's matrices (NaN ones
    left out) of each spectral field, except angles, which take the group's maximum.
    """
    from .store.schema import SPECTRAL_FIELDS

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        name = key(p)
        if name is not None:
            groups.setdefault(name, []).append(i)
    out: dict[str, float] = {}
    for name, idx in groups.items():
        block = np.asarray(spectral, dtype=np.float64)[idx]
        base = f"{prefix}/{name.replace(' ', '_')}"
        for j, field in enumerate(SPECTRAL_FIELDS):
            column = block[:, j][np.isfinite(block[:, j])]
            if column.size:
                out[f"{base}/{field}"] = float(column.max() if "angle" in field else column.mean())
    return out
