"""Exact top-count selection, on one rank or over the ranks that hold a score.

A top/bottom-alpha mask selects exactly ``floor(alpha * n)`` elements: those
above a threshold and, among elements equal to it, the lowest flat
(row-major) indices first, the order of a stable sort (so the numpy reference
``np.argsort(-score, kind="stable")[:count]`` selects the same elements).
``torch.quantile`` is not used: it refuses inputs over 2^24 elements.

:func:`top_count_masks` is the one entry point. On one rank it uses
``kthvalue`` (one pass over the score); spread over several ranks it runs a
radix select on the order-preserving bits of the float64 score
(histogram all-reduces). Both select the same elements (tested on random partitions);
the single-rank path exists because it is several times faster.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .collectives import Comm

__all__ = ["select_count", "top_count_mask", "radix_select", "top_count_masks"]


def select_count(numel: int, alpha: float) -> int:
    """Number of elements a top/bottom-alpha mask selects: ``floor(alpha * n)``.

    ``alpha`` is taken as the decimal it prints as (``repr``), in exact
    rational arithmetic: ``0.7 * 90`` is 62.999... in binary floating point,
    but a user who asks for alpha = 0.7 of 90 weights means 63.
    """
    return math.floor(Fraction(repr(float(alpha))) * numel)


def top_count_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` largest entries of ``score`` (ties: lowest index first).

    Args:
        score: any-shaped floating tensor without NaN.
        count: 0 <= count <= score.numel().
    """
    flat = score.reshape(-1)
    n = flat.numel()
    if not 0 <= count <= n:
        raise ValueError(f"count must be in [0, {n}], got {count}")
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if count == 0:
        return mask.view(score.shape)
    if count == n:
        return mask.fill_(True).view(score.shape)
    # The count-th largest is the (n - count + 1)-th smallest.
    threshold = flat.kthvalue(n - count + 1).values
    above = flat > threshold
    missing = count - int(above.sum())
    ties = torch.nonzero(flat == threshold).reshape(-1)[:missing]
    mask |= above
    mask[ties] = True
    return mask.view(score.shape)


def _order_keys(score: torch.Tensor) -> torch.Tensor:
    """Order-preserving signed int64 keys of float64 values (no NaN; -0 and +0 equal).

    Non-negative floats keep their bit pattern; for negative ones the magnitude
    bits are flipped, so that integer order is float order.
    """
    bits = (score.to(torch.float64) + 0.0).view(torch.int64)  # -0 + 0 = +0
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)


def _byte(keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Byte ``shift / 8`` of ``key + 2^63`` (the key as an unsigned, order-preserving integer)."""
    byte = (keys >> shift) & 255
    return byte ^ 128 if shift == 56 else byte


def _high(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """``(key + 2^63) >> bits`` for 8 <= bits <= 56, without overflow."""
    return (keys >> bits) + (1 << (63 - bits))


def radix_select(comm: Comm, scores: list[torch.Tensor], counts: list[int], starts: list[list[int]]) -> list[torch.Tensor]:
    """Exact global top-``count`` masks of scores spread over ranks; ties by lowest global flat index.

    Args:
        scores: per selection, this rank's scores (1-D, in global flat order of its
            range; may be empty). Compared as float64 (float32 inputs exactly).
        counts: per selection, how many elements to select globally.
        starts: per selection, every rank's range start (``starts[s][r]``), to
            order ranks along the flat index.

    Returns the local bool masks: together, exactly :func:`top_count_mask` of the
    whole score. Collectives: 8 all-reduces of (S, 256) int64 histograms (8 bits
    of the 64-bit key per pass, most significant first) and one of the (W, S)
    per-rank tie counts.
    """
    S = len(scores)
    keys = [_order_keys(s.reshape(-1)) if s.numel() else None for s in scores]
    prefix = [0] * S  # the threshold's unsigned key bits found so far
    need = list(counts)
    for shift in range(56, -8, -8):
        hist = torch.zeros((S, 256), dtype=torch.int64)
        for i, k in enumerate(keys):
            if k is None or need[i] == 0:
                continue
            cand = k if shift == 56 else k[_high(k, shift + 8) == prefix[i]]
            if cand.numel():
                hist[i] = torch.bincount(_byte(cand, shift), minlength=256).cpu()
        comm.all_reduce(hist)
        table = hist.numpy()
        for i in range(S):
            if need[i] == 0:
                continue
            above = 0
            for b in range(255, -1, -1):
                if above + table[i, b] >= need[i]:
                    break
                above += int(table[i, b])
            else:  # pragma: no cover - counts exceed the elements: a caller bug
                raise ValueError(f"selection {i}: cannot select {counts[i]} elements")
            need[i] -= above
            prefix[i] = (prefix[i] << 8) | b
    thresholds = [p - (1 << 63) for p in prefix]  # back to signed keys
    ties = torch.zeros((comm.world_size, S), dtype=torch.int64)
    local_eq: list[torch.Tensor | None] = []
    for i, k in enumerate(keys):
        if k is None or counts[i] == 0:
            local_eq.append(None)
            continue
        eq = k == thresholds[i]
        ties[comm.rank, i] = int(eq.sum())
        local_eq.append(eq)
    comm.all_reduce(ties)
    masks = []
    for i, k in enumerate(keys):
        if k is None:
            masks.append(torch.zeros(scores[i].numel(), dtype=torch.bool, device=scores[i].device))
            continue
        if counts[i] == 0:
            masks.append(torch.zeros(k.numel(), dtype=torch.bool, device=k.device))
            continue
        mine = starts[i][comm.rank]
        before = sum(int(ties[r, i]) for r in range(comm.world_size) if r != comm.rank and starts[i][r] < mine)
        take = max(0, min(int(ties[comm.rank, i]), need[i] - before))
        eq = local_eq[i]
        mask = k > thresholds[i]
        if take:
            mask |= eq & (torch.cumsum(eq.to(torch.int64), 0) <= take)
        masks.append(mask)
    return masks


def top_count_masks(comm: Comm, scores: list[torch.Tensor], counts: list[int], starts: list[list[int]]) -> list[torch.Tensor]:
    """Local bool masks of the global top-``counts[i]`` of each score (ties: lowest global flat index).

    Args as :func:`radix_select`. On one rank each score is the whole matrix and
    the selection is :func:`top_count_mask`; a collective otherwise.
    """
    if comm.world_size == 1:
        return [top_count_mask(s.reshape(-1), c) for s, c in zip(scores, counts)]
    return radix_select(comm, scores, counts, starts)
