"""The principal mask's score, computed so that any row partition gives the same bits.

``M_princ = Top_alpha(|W0^(k)|)`` (paper Sec. 4.2) needs the rank-k
reconstruction of the whole base matrix. Under FSDP each rank holds a block of
rows, and the monitor must store exactly the mask a single process would. Two
steps of the reconstruction reduce over the partitioned axis, and floating-point
sums depend on their order, so both are made order-free here. The single-process
monitor uses these same functions, so a run on 1, 2 or 3 ranks stores the same
mask, bit for bit.

Orientation: ``a`` is W0 (m >= n) or W0^T (m < n), so that the Gram matrix
``G = a^T a`` is of the smaller side and is a sum over the rows of ``a``.

1. **Exact Gram.** With ``M = max|a|`` and ``M < 2^E``, each entry is split on
   a fixed-point grid: ``a = 2^h q_hi + 2^(h-b) q_lo + e`` with integers
   ``|q_hi| <= 2^b``, ``|q_lo| <= 2^b``, ``h = E - b`` and ``b`` chosen from the
   number of rows L so that every partial sum of ``q_hi^T q_hi`` and
   ``q_hi^T q_lo`` is an integer below 2^53. Both products are then *exact* in
   float64 whatever the summation order (BLAS blocking, FMA, a sum over ranks),
   and ``G' = q_hi^T q_hi + 2^-b (X + X^T)`` with ``X = q_hi^T q_lo`` is
   ``G / 2^2h`` up to one final rounding and the dropped ``q_lo^T q_lo`` term
   (< 2^-2b of ``M^2`` per entry). bf16 entries at or above ``2^(h-b+7)`` are
   represented exactly (``e = 0``); smaller ones to ``2^(h-b-1)``, about
   ``M * 2^-(2b+1)`` (b = 19 for L = 4096 rows: 1e-12 of M). The scale ``2^2h``
   does not change eigenvectors and is never applied.
2. **Row-position-invariant projection.** ``|(a V_k) V_k^T|`` is computed in
   float64 in chunks of ``CHUNK_ROWS`` rows aligned to the *global* row index
   of ``a`` (chunk c holds rows [c R, c R + R), zero rows where a process does
   not hold the row). Every GEMM has the same shape and every row the same
   position in it, so each output row gets the same sequence of operations in
   any partition. The score stays in float64 and is selected in float64
   (``exact_selection``): rounding it to float32 would merge scores a few
   1e-9 apart into ties, which the tie rule then settles by index.

The eigenvectors come from ``torch.linalg.eigh`` of the float64 ``G'`` (the
top-k of the smaller side), as in the float64 reference of the tests;
under sharding one rank computes them and the others receive the same bits.
Identical bits across processes assume the same BLAS/LAPACK and thread count on
every rank, as in any data-parallel job.
"""

from __future__ import annotations

import math

import torch

from .exact_selection import select_count, top_count_mask

__all__ = [
    "CHUNK_ROWS",
    "fixed_point_bits",
    "scale_exponent",
    "gram_parts",
    "gram_from_parts",
    "gram_from_symmetric",
    "top_basis",
    "project_rows",
    "principal_scores",
    "principal_mask",
]

#: Rows of ``a`` per projection GEMM (chunks aligned to multiples of this global row index).
CHUNK_ROWS = 256


def fixed_point_bits(rows: int) -> int:
    """Bits b of the fixed-point split for a Gram matrix summed over ``rows`` rows.

    Every partial sum of ``q_hi^T q_hi`` and ``q_hi^T q_lo`` (|q| <= 2^b) is an
    integer of magnitude <= rows * 2^(2b) <= 2^51, so float64 adds it exactly,
    and ``X + X^T`` stays below 2^52.
    """
    lg = max(0, math.ceil(math.log2(max(int(rows), 1))))
    return max(1, (51 - lg) // 2)


def scale_exponent(max_abs: float) -> int:
    """E with ``max_abs < 2^E`` (``math.frexp``); 0 for a zero matrix."""
    if not math.isfinite(max_abs):
        raise ValueError(f"max |a| must be finite, got {max_abs!r}")
    if max_abs == 0.0:
        return 0
    return math.frexp(max_abs)[1]


def gram_parts(a: torch.Tensor, *, max_exponent: int, rows_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact integer-valued float64 ``(H, X) = (q_hi^T q_hi, q_hi^T q_lo)`` of some rows of ``a``.

    Args:
        a: (rows, r) float64, some rows of the oriented matrix (bf16 values, finite).
        max_exponent: E of the *whole* matrix (``scale_exponent(max|a|)``).
        rows_total: rows of the whole oriented matrix (fixes b).

    The parts of disjoint row sets add up exactly (in any order, e.g. an all-reduce).
    """
    b = fixed_point_bits(rows_total)
    h = max_exponent - b
    hi = torch.round(torch.ldexp(a, torch.tensor(-h, dtype=torch.float64, device=a.device)))
    rest = a - torch.ldexp(hi, torch.tensor(h, dtype=torch.float64, device=a.device))
    lo = torch.round(torch.ldexp(rest, torch.tensor(b - h, dtype=torch.float64, device=a.device)))
    return hi.T @ hi, hi.T @ lo


def gram_from_parts(hh: torch.Tensor, hl: torch.Tensor, *, rows_total: int) -> torch.Tensor:
    """``G' = H + 2^-b (X + X^T)``, the Gram matrix up to the scale 2^2h (float64)."""
    return gram_from_symmetric(hh, hl + hl.T, rows_total=rows_total)


def gram_from_symmetric(hh: torch.Tensor, cross: torch.Tensor, *, rows_total: int) -> torch.Tensor:
    """``G' = H + 2^-b S`` from ``H`` and ``S = X + X^T`` (both exact and symmetric; S's partial
    sums stay below 2^52, so sums of per-rank ``X_r + X_r^T`` are exact too)."""
    b = fixed_point_bits(rows_total)
    return hh + torch.ldexp(cross, torch.tensor(-b, dtype=torch.float64, device=hh.device))


def top_basis(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Eigenvectors of the ``rank`` largest eigenvalues of a symmetric float64 matrix, (r, rank)."""
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[:, gram.shape[0] - rank :].contiguous()


def project_rows(a: torch.Tensor, first_row: int, basis: torch.Tensor, *, rows_total: int) -> torch.Tensor:
    """``|(a V) V^T|`` for rows ``first_row ...`` of the oriented matrix, float64.

    Computed in float64 chunks of ``CHUNK_ROWS`` rows aligned to the global row
    index (zero rows elsewhere), so each row's result does not depend on which
    other rows a process holds.
    """
    count, r = a.shape
    out = torch.empty((count, r), dtype=torch.float64, device=a.device)
    if count == 0:
        return out
    R = CHUNK_ROWS
    chunk = torch.zeros((R, r), dtype=torch.float64, device=a.device)
    last = first_row + count
    for c in range(first_row // R, (last - 1) // R + 1):
        lo, hi = max(c * R, first_row), min((c + 1) * R, last, rows_total)
        chunk.zero_()
        chunk[lo - c * R : hi - c * R] = a[lo - first_row : hi - first_row]
        projected = (chunk @ basis) @ basis.T
        out[lo - first_row : hi - first_row] = projected[lo - c * R : hi - c * R].abs()
    return out


def principal_scores(w0: torch.Tensor, rank: int) -> torch.Tensor:
    """``|rank-k reconstruction of W0|`` in float64, partition-invariant (see module doc).

    ``w0``: (m, n) finite floating tensor of bf16 values. ``rank >= min(m, n)``
    gives ``|W0|`` itself (exact); ``rank <= 0`` gives zeros.
    """
    m, n = w0.shape
    if rank <= 0 or m == 0 or n == 0:
        return torch.zeros((m, n), dtype=torch.float64, device=w0.device)
    if rank >= min(m, n):
        return w0.detach().to(torch.float64).abs()
    a = w0.detach().double()
    if m < n:
        a = a.T
    rows = a.shape[0]
    exponent = scale_exponent(float(a.abs().max()))
    hh, hl = gram_parts(a, max_exponent=exponent, rows_total=rows)
    basis = top_basis(gram_from_parts(hh, hl, rows_total=rows), rank)
    score = project_rows(a, 0, basis, rows_total=rows)
    return score if m >= n else score.T.contiguous()


def principal_mask(w0: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """``M_princ``: top-alpha of the partition-invariant principal score; ties by lowest flat index."""
    score = principal_scores(w0, rank)
    return top_count_mask(score, select_count(score.numel(), alpha))
