"""Float64 references of the masks computed once from the base weights W0 (paper Sec. 4.2), for the tests.

* principal mask ``M_princ = Top_alpha(|W0^(k)|)``, where ``W0^(k)`` is the
  rank-k SVD reconstruction of W0 ("principal weights", Liu et al. 2025c);
* low-magnitude mask ``M_low = Bottom_alpha(|W0|)``;
* ``M_princ ∩ M_low^c``, the principal weights that are not small.

Selections are exact: ``floor(alpha * n)`` elements, chosen by a ``kthvalue``
threshold and, among elements equal to the threshold, the lowest flat
(row-major) indices first. That is the order of a stable sort, so the numpy
reference ``np.argsort(-score, kind="stable")[:count]`` selects the same
elements. ``torch.quantile`` is not used: it refuses inputs over 2^24 elements.
"""

from __future__ import annotations

import torch

from compass_monitor.exact_selection import select_count, top_count_mask

__all__ = ["low_rank_reconstruction", "low_magnitude_mask", "principal_mask", "select_count", "top_count_mask"]


def low_rank_reconstruction(w0: torch.Tensor, rank: int) -> torch.Tensor:
    """``W0^(k) = U_k diag(s_k) V_k^T``, the best rank-k approximation.

    Returned in float32 (float64 for float64 input).

    Computed as the projection of W0 onto its top-k singular subspace of the
    smaller side, found from the float64 Gram matrix of that side
    (``torch.linalg.eigh``): exact up to float64 rounding, and much cheaper
    than a full SVD for tall matrices and on GPUs. If ``rank >= min(m, n)`` the
    reconstruction is W0 itself.
    """
    out_dtype = torch.float64 if w0.dtype == torch.float64 else torch.float32
    work = w0.detach().to(out_dtype)
    m, n = work.shape
    if rank <= 0:
        return torch.zeros_like(work)
    if rank >= min(m, n):
        return work
    # Orient so that the Gram matrix is of the smaller side.
    a = work.double() if m >= n else work.double().T
    _, vectors = torch.linalg.eigh(a.T @ a)  # ascending eigenvalues
    top = vectors[:, -rank:]
    projected = (a @ top) @ top.T
    return (projected if m >= n else projected.T).to(out_dtype)


def principal_mask(w0: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """``M_princ``: top-alpha of ``|rank-k reconstruction of W0|`` (Sec. 4.2)."""
    score = low_rank_reconstruction(w0, rank).abs()
    return top_count_mask(score, select_count(score.numel(), alpha))


def low_magnitude_mask(w0: torch.Tensor, alpha: float) -> torch.Tensor:
    """``M_low``: bottom-alpha of ``|W0|`` (Sec. 4.2); ties at the threshold by lowest index."""
    w = w0.detach()
    magnitude = (w if w.dtype == torch.float64 else w.float()).abs()
    # Bottom-alpha of |w| is top-alpha of -|w|; the tie order (lowest index) is kept.
    return top_count_mask(-magnitude, select_count(magnitude.numel(), alpha))
