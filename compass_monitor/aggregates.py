"""Ratios and group aggregates derived from a run's stored counts.

The store keeps raw counts; every ratio a report shows is derived here, so the
definitions live in one place:

* update sparsity ``1 - |M| / n`` (Def. 2.2), per group ``1 - sum|M| / sum n``;
* overlap ``|X ∩ M| / |M|`` (Sec. 4.2), per group ``sum|X ∩ M| / sum|M|``;
* random baseline of an overlap: the density of X (alpha for the principal and
  low masks), per group weighted by each matrix's ``|M|``, i.e. the overlap if
  every matrix's changes fell uniformly at random inside it;
* precision null (``precision_null``), per group weighted the same way;
* across runs (Sec. 2.2, Fig. 2, Fig. 8): Jaccard ``|A ∩ B| / |A ∪ B|`` of two
  runs' masks, its independent-Bernoulli baseline ``pq / (p + q - pq)``, pooled
  over a group of matrices, and the distribution of the consensus ratio
  ``C = mean_r M^(r)`` expected if runs changed weights independently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .store import Run, ParamInfo
from .store.schema import COUNT_FIELDS, REFERENCE_MASKS
from .vocabulary import INTERSECTION_FIELDS as _INTERSECTION_FIELDS

__all__ = [
    "GroupStats",
    "aggregate_counts",
    "group_stats",
    "scalars",
    "spectral_scalars",
    "by_module_type",
    "by_role",
    "by_layer",
    "everything_linear",
    "ratio",
    "jaccard",
    "pooled_jaccard",
    "independent_jaccard",
    "pooled_independent_jaccard",
    "consensus_distribution",
]


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


def ratio(num: Any, den: Any) -> np.ndarray:
    """``num / den`` elementwise as float64, NaN where ``den`` is 0 (a ratio of nothing is undefined, not 0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
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
            overlap[mask] = ratio(inter, total_changed)
            # An empty matrix (Linear(0, 8)) changes nothing: it weighs 0 in the baseline, not NaN.
            density = np.divide(mask_sizes[idx, j], numel[idx], out=np.zeros(len(idx)), where=numel[idx] > 0)
            baseline[mask] = ratio((changed * density).sum(axis=1), total_changed)
            null_g[mask] = ratio(np.nansum(changed * null[:, idx, j], axis=1), total_changed)
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


# -- across runs (Sec. 2.2) ---------------------------------------------------------------
def independent_jaccard(p: Any, q: Any) -> np.ndarray:
    """Expected Jaccard of two independent Bernoulli masks of densities ``p`` and ``q``: ``pq / (p + q - pq)``.

    The paper's baseline (Sec. 2.2); NaN where both densities are 0.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return ratio(p * q, p + q - p * q)


def jaccard(mask_a: np.ndarray, mask_b: np.ndarray) -> tuple[float, float]:
    """Jaccard index ``|A ∩ B| / |A ∪ B|`` of two boolean masks of one shape and its independent
    baseline ``pq / (p + q - pq)`` (p, q the masks' densities); NaN for two empty masks."""
    inter = np.count_nonzero(mask_a & mask_b)
    union = np.count_nonzero(mask_a | mask_b)
    n = mask_a.size
    p, q = np.count_nonzero(mask_a) / n, np.count_nonzero(mask_b) / n
    return float(ratio(inter, union)), float(independent_jaccard(p, q))


def pooled_jaccard(intersections: Any, changed_a: Any, changed_b: Any) -> float:
    """Jaccard of a group of matrices taken as one set of weights: ``sum|A∩B| / sum(|A| + |B| - |A∩B|)``.

    Args: per-matrix counts, arrays of shape (P,).
    """
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(changed_a, dtype=np.float64) + np.asarray(changed_b, dtype=np.float64) - inter
    return float(ratio(inter.sum(), union.sum()))


def pooled_independent_jaccard(numel: Any, changed_a: Any, changed_b: Any) -> float:
    """Independent baseline of :func:`pooled_jaccard`: each matrix's masks drawn independently with
    its own densities p_i, q_i, the ratio of expected sizes ``sum n_i p_i q_i / sum n_i (p_i + q_i - p_i q_i)``.

    For one matrix this is ``pq / (p + q - pq)``; for a group it does not mix a dense
    matrix with a sparse one as if their changes were interchangeable.
    """
    n = np.asarray(numel, dtype=np.float64)
    p = ratio(changed_a, n)
    q = ratio(changed_b, n)
    inter = n * p * q
    union = n * (p + q - p * q)
    return float(ratio(np.nansum(inter), np.nansum(union)))


def consensus_distribution(densities: Any, numel: Any) -> np.ndarray:
    """Expected number of weights changed in exactly k of R runs, k = 0..R, if each run r changed each
    weight of matrix i independently with probability ``densities[r, i]`` (a Poisson-binomial law per matrix).

    Args:
        densities: (R, P) changed fractions ``|M|/n`` per run and matrix.
        numel: (P,) weights per matrix.

    Returns:
        (R + 1,) float64 expected counts summed over the matrices; divide by ``sum(numel)`` for fractions.
        The consensus ratio of a weight changed in k runs is ``C = k / R`` (Sec. 2.2).
    """
    p = np.asarray(densities, dtype=np.float64)
    n = np.asarray(numel, dtype=np.float64)
    r, num = p.shape
    law = np.zeros((r + 1, num))
    law[0] = 1.0
    for j in range(r):  # add one run at a time: P_k <- P_k (1 - p) + P_{k-1} p
        shifted = np.vstack([np.zeros((1, num)), law[:-1]])
        law = law * (1.0 - p[j]) + shifted * p[j]
    return (law * n[None, :]).sum(axis=1)
