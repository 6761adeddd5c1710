"""The precision null: overlap expected from bf16 rounding alone (DESIGN sec. 6).

Small weights flip first under *any* update, because the bf16 spacing grows
with magnitude (paper Lemma D.2). So an overlap of the changed mask M with the
low-magnitude mask above alpha, or with the principal mask below alpha, is
partly a property of the precision lens, not of the optimizer. The null asks:
if the same number of bf16 flips in this matrix came from i.i.d. Gaussian noise
``N(0, s^2)`` added to every weight, ignoring geometry, what overlap
``|X ∩ M| / |M|`` would we expect?

Under such noise a weight ``w`` flips iff the noise leaves its rounding
interval, so its flip probability is

    p(w; s) = Q(g_up(w) / s) + Q(g_down(w) / s),   Q(x) = erfc(x / sqrt 2) / 2,

where ``g_up`` / ``g_down`` are the half-gaps to the next bf16 value away from /
toward zero. They depend only on the exponent field and on whether the
mantissa is zero (just above a power of two the spacing below is halved), so
512 *spacing classes* taken once from W0, counted overall and inside each mask,
give the null in closed form: solve ``sum_c n_c p_c(s) = |M|`` for ``s``
(monotone, bisection in log2 s), then

    null overlap(X) = sum_c n_c^X p_c(s) / sum_c n_c p_c(s).

Non-finite base values (exponent 255) are left out: noise never moves an Inf,
and NaNs are reported separately.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["NUM_CLASSES", "spacing_class", "class_half_gaps", "class_counts", "null_overlaps"]

#: exponent field (256 values) x (mantissa == 0)
NUM_CLASSES = 512
_LOG2_LO, _LOG2_HI, _ITERATIONS = -160.0, 140.0, 64


def spacing_class(bits: torch.Tensor) -> torch.Tensor:
    """Spacing class of each bf16 code: ``2 * exponent_field + (mantissa == 0)`` (int64)."""
    b = bits.to(torch.int32) & 0x7FFF
    return (((b >> 7) << 1) | ((b & 0x7F) == 0).to(torch.int32)).to(torch.int64)


def class_half_gaps() -> tuple[np.ndarray, np.ndarray]:
    """Half-gaps (up, down) of every spacing class, float64; 0 for non-finite classes."""
    up = np.zeros(NUM_CLASSES)
    down = np.zeros(NUM_CLASSES)
    for exponent in range(255):
        # Subnormals and zero (exponent field 0) are spaced like exponent field 1.
        ulp = math.ldexp(1.0, max(exponent, 1) - 127 - 7)
        for mantissa_zero in (0, 1):
            c = 2 * exponent + mantissa_zero
            up[c] = ulp / 2
            # At an exact power of two (not the smallest normal) the next value
            # toward zero is in the binade below, half the spacing away.
            halved = mantissa_zero and exponent >= 2
            down[c] = ulp / 4 if halved else ulp / 2
    return up, down


def class_counts(classes: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Counts per spacing class overall and inside each mask: shape (1 + len(masks), 512), int64."""
    flat = classes.reshape(-1)
    rows = [torch.bincount(flat, minlength=NUM_CLASSES)]
    for mask in masks:
        rows.append(torch.bincount(flat[mask.reshape(-1)], minlength=NUM_CLASSES))
    return torch.stack(rows)


def _flip_probabilities(log2_s: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """p_c(s) for each matrix (rows of log2_s) and class: shape (P, 512)."""
    s = np.exp2(log2_s)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_up = torch.special.erfc(torch.from_numpy(up[None, :] / (s * math.sqrt(2.0)))).numpy()
        tail_down = torch.special.erfc(torch.from_numpy(down[None, :] / (s * math.sqrt(2.0)))).numpy()
    p = 0.5 * (tail_up + tail_down)
    p[:, up == 0] = 0.0  # non-finite classes never flip
    return p


def null_overlaps(counts: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Expected overlap of each mask with a geometry-blind change mask of the observed size.

    Args:
        counts: (P, 1 + X, 512) spacing-class counts per matrix, overall then
            inside each of X masks (from :func:`class_counts`).
        changed: (P,) observed changed counts ``|M|`` (NaN-changed included).

    Returns:
        (P, X) float64: ``E|X ∩ M| / E|M|`` at the noise scale that flips
        ``|M|`` weights in expectation; NaN where ``|M| = 0``. If ``|M|``
        reaches the number of finite weights, every finite weight flips and the
        null is the mask's share of finite weights.
    """
    counts = np.asarray(counts, dtype=np.float64)
    changed = np.asarray(changed, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[2] != NUM_CLASSES or counts.shape[0] != changed.shape[0]:
        raise ValueError(f"counts must be (P, 1+X, {NUM_CLASSES}) matching changed (P,), got {counts.shape} and {changed.shape}")
    up, down = class_half_gaps()
    finite = counts[:, 0, :] * (up > 0)
    # Only classes that hold weights contribute (a trained matrix uses a few dozen of
    # the 512): evaluating the others, at n_c = 0, was 90% of a snapshot's CPU time.
    used = np.flatnonzero((finite > 0).any(axis=0))
    up, down, finite, counts = up[used], down[used], finite[:, used], counts[:, :, used]
    target = np.minimum(changed, finite.sum(axis=1))
    lo = np.full(changed.shape, _LOG2_LO)
    hi = np.full(changed.shape, _LOG2_HI)
    for _ in range(_ITERATIONS):
        mid = 0.5 * (lo + hi)
        expected = (finite * _flip_probabilities(mid, up, down)).sum(axis=1)
        too_many = expected > target
        hi = np.where(too_many, mid, hi)
        lo = np.where(too_many, lo, mid)
    p = _flip_probabilities(0.5 * (lo + hi), up, down)
    expected_total = (finite * p).sum(axis=1)
    expected_in = (counts[:, 1:, :] * p[:, None, :]).sum(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = expected_in / expected_total[:, None]
    result[changed <= 0] = np.nan
    return result
