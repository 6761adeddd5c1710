"""The paper's Table-1 row of a base / checkpoint pair, from its run store.

Every ratio comes from ``compass_monitor.aggregates`` (the functions the
``summary`` command uses): update sparsity ``1 - |M|/n`` globally and per
module type (Def. 2.2), the overlaps ``|X ∩ M| / |M|`` with the principal, low
and principal-not-low masks with their random baseline and precision null
(Sec. 4.2, App. D), and, when the store has them, the spectral diagnostics
(Sec. 4.1: NSS, largest principal angles, top-k energy change) over the linear matrices.
"""

from __future__ import annotations

import numpy as np

from ..aggregates import by_module_type, everything_linear, group_stats
from ..store import Run
from ..store.schema import SPECTRAL_FIELDS

__all__ = ["table_row"]

_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other", "embedding", "lm_head", "norm", "bias")
_MASKS = (("principal", "principal"), ("low", "low"), ("principal_not_low", "principal-not-low"))


def table_row(run: Run, *, index: int = -1, spectral: bool = False) -> str:
    """The Table-1 row of snapshot ``index`` (default: the last) as a few readable lines.

    Raises:
        ValueError: the store has no committed snapshot, or no linear matrix.
    """
    if run.num_snapshots == 0:
        raise ValueError(f"run store {run.path} has no committed snapshot")
    overall = group_stats(run, everything_linear).get("all linear")
    if overall is None:
        raise ValueError(f"run store {run.path} monitors no linear matrix; the Table-1 row is over linear layers")
    types = group_stats(run, by_module_type)
    ordered = [t for t in _ORDER if t in types] + sorted(t for t in types if t not in _ORDER)
    t = index % run.num_snapshots
    lines = [
        f"Table-1 row at step {int(run.steps[t])}: {overall.num_matrices} linear {'matrix' if overall.num_matrices == 1 else 'matrices'}, "
        f"{overall.numel / 1e6:.2f}M weights",
        f"  update sparsity (1 - |M|/n): all {overall.sparsity[t]:.4f}; " + ", ".join(f"{name} {types[name].sparsity[t]:.4f}" for name in ordered),
        "  overlap |X∩M|/|M| (random baseline, precision null):",
    ]
    for mask, label in _MASKS:
        lines.append(f"    {label:<18} {overall.overlap[mask][t]:.4f}  (random {overall.random_baseline[mask][t]:.4f}, null {overall.null[mask][t]:.4f})")
    if spectral:
        lines += _spectral(run, t)
    return "\n".join(lines)


def _spectral(run: Run, t: int) -> list[str]:
    values = run.spectral_metrics
    linear = [p.index for p in run.params if p.role == "linear"]
    if values is None or not np.isfinite(values[t, linear, 0]).any():
        return ["  spectral: not computed for this snapshot (run with --spectral)"]
    v = values[t, linear]
    field = {name: i for i, name in enumerate(SPECTRAL_FIELDS)}
    k = run.config.get("spectral_k", "?")
    return [
        f"  spectral (k={k}, over linear matrices): NSS mean {np.nanmean(v[:, field['nss']]):.3e} max {np.nanmax(v[:, field['nss']]):.3e}; "
        f"largest principal angle left {np.nanmax(v[:, field['max_angle_left_deg']]):.3f} deg, right {np.nanmax(v[:, field['max_angle_right_deg']]):.3f} deg; "
        f"top-k energy change mean {np.nanmean(v[:, field['topk_energy_rel_change']]):.3e}"
    ]
