"""Float64 numpy/scipy reference for the spectral diagnostics (paper Sec. 4.1, Cor. 3.5).

The oracle that :mod:`compass_monitor.spectral` is tested and benchmarked
against. It follows the definitions literally, with LAPACK in float64:

* NSS from ``scipy.linalg.svdvals`` of both matrices (sorted descending);
* principal angles from ``scipy.linalg.subspace_angles`` between the top-k
  singular vectors of ``scipy.linalg.svd`` (that routine uses sines for small
  angles); degrees, descending;
* the Ky Fan k-norm change relative to the base's.

It needs scipy (a test dependency, not a runtime one) and costs two full SVDs
per call: use it for checks, not in a training loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

__all__ = ["spectral_drift_reference"]


def spectral_drift_reference(w0: np.ndarray, wt: np.ndarray, k: int) -> dict[str, Any]:
    """NSS, principal angles (degrees) and top-k energy change in float64.

    Args:
        w0: base matrix (m x n), anything ``np.asarray`` turns into floats.
        wt: current matrix, same shape.
        k: subspace rank; capped at min(m, n).

    Returns:
        A dict with the fields of :class:`compass_monitor.spectral.SpectralDrift`
        as Python floats / float64 arrays: ``nss``, ``max_angle_left_deg``,
        ``max_angle_right_deg``, ``angles_left_deg``, ``angles_right_deg``,
        ``topk_energy_rel_change``, plus ``k``.

    Raises:
        ValueError: on shape mismatch, a non-2-D input or k < 1.
    """
    a0 = np.asarray(w0, dtype=np.float64)
    at = np.asarray(wt, dtype=np.float64)
    if a0.ndim != 2 or a0.shape != at.shape:
        raise ValueError(f"w0 and wt must be 2-D of one shape, got {a0.shape} and {at.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    k = min(k, min(a0.shape))
    s0 = scipy.linalg.svdvals(a0)
    st = scipy.linalg.svdvals(at)
    u0, _, v0h = scipy.linalg.svd(a0, full_matrices=False)
    ut, _, vth = scipy.linalg.svd(at, full_matrices=False)
    left = np.degrees(scipy.linalg.subspace_angles(u0[:, :k], ut[:, :k]))
    right = np.degrees(scipy.linalg.subspace_angles(v0h[:k].T, vth[:k].T))
    kyfan0 = s0[:k].sum()
    return {
        "nss": float(np.linalg.norm(st - s0) / np.linalg.norm(s0)),
        "max_angle_left_deg": float(left.max()),
        "max_angle_right_deg": float(right.max()),
        "angles_left_deg": np.sort(left)[::-1],
        "angles_right_deg": np.sort(right)[::-1],
        "topk_energy_rel_change": float((st[:k].sum() - kyfan0) / kyfan0),
        "k": k,
    }
