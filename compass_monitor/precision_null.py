"""The precision null: overlap expected from bf16 rounding alone (DESIGN sec. 6).

Small weights flip first under *any* update, because the bf16 spacing grows
with magnitude (paper Lemma D.2). So an overlap of the changed mask M with the
low-magnitude mask above alpha, or with the principal mask below alpha, is
partly a property of the precision lens, not of the optimizer. The null asks:
if the same number of bf16 flips in this matrix came from i.i.d. Gaussian noise
``N(0, s^2)`` added to every base weight (the original values, fp32 masters
included), ignoring geometry, what overlap ``|X ∩ M| / |M|`` would we expect?

A weight ``w`` flips iff ``bf16(w + noise) != bf16(w)``: iff the noise takes it
out of the rounding cell of ``bf16(w)`` (round to nearest even, as
``Tensor.to(torch.bfloat16)``). With ``d_near <= d_far`` its distances to the
cell's two boundaries,

    p(w; s) = Q(d_near / s) + Q(d_far / s),   Q(x) = erfc(x / sqrt 2) / 2.

With ``c = bf16(w)``, the cell's half-gaps ``h_toward``, ``h_away`` (toward and
away from zero) depend only on the spacing class of ``c`` (exponent field and
whether the mantissa is zero: just above a power of two the spacing below is
halved). A weight at distance ``g`` from ``c`` on side ``σ`` (the other side:
``σ'``) has ``d_near = h_σ - g`` and ``d_far = h_σ' + g``. So weights are
counted, once at base capture, in classes of spacing x position
(:data:`NUM_CLASSES`, index ``bin * 512 + spacing``):

* bin 0, **on the grid** (``w == c``, ``g = 0``): exact. A bf16 base has only
  these, and its null is the former 512-class closed form, term for term.
* bin 1, **a tie** (``w`` exactly on a rounding boundary): exact.
* bins 60..65: ``g / h_σ`` exactly 1/4, 1/2 or 3/4 on either side, where values
  with 3 more mantissa bits than bf16 sit (fp16, tf32): exact. The pooler of the
  shipped all-MiniLM-L6-v2 holds only such positions.
* bins 2..30 (toward zero) and 31..59 (away from zero): any other ``g / h_σ``, in one of
  29 intervals, octaves both toward the grid point and toward the boundary:
  ``(0, 2^-15], (2^-15, 2^-14], ..., (2^-2, 2^-1], (1/2, 1 - 2^-2], ...,
  (1 - 2^-13, 1 - 2^-14], (1 - 2^-14, 1)`` (:data:`POSITION_EDGES`). Such a class's
  flip probability is ``p`` averaged over ``g`` uniform in its interval (closed
  form via ``G(x) = x Q(x) - phi(x)``, the antiderivative of ``Q``). The fine
  octaves at both ends resolve what matters at small noise: weights next to a
  boundary (they flip first) and weights just off the grid (fp32 masters that
  moved a little since a bf16 checkpoint). fp32 resolves ``2^-15`` of a half-gap
  (float64 weights are rounded to float32 first, as the probe rounds them), so
  the outermost intervals hold one fp32 position each.

Then, for each matrix, solve ``sum_c n_c p_c(s) = |M|`` for ``s`` (monotone;
Newton's method in log2 s inside a bisection bracket) and

    null overlap(X) = sum_c n_c^X p_c(s) / sum_c n_c p_c(s).

**Error the binning adds.** Every weight of a position class has a flip
probability between the class's values at its two edges; :func:`null_bounds`
turns that into an interval that holds the exact (per-weight) null whatever the
positions inside the classes are. Where positions are spread evenly inside their
intervals (the 16 bits that fp32 carries below bf16 are close to uniform) the
binned null is the exact one up to that unevenness: on the fp32 MiniLM base it
is within 3e-3 of the per-weight null wherever ``|M|`` is at least 1% of the
matrix, within 1e-3 from 10% on (for the reference masks and for random ones:
what is left is the sampling spread of the positions inside each class) (``tests/test_precision_null.py`` checks both statements, and the null
against Monte Carlo).

Non-finite base values (exponent 255, or fp32 values that round to Inf) are
left out: noise never moves an Inf, and NaNs are reported separately.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .bf16 import canonical_bits

__all__ = [
    "NUM_SPACING_CLASSES",
    "POSITION_BINS",
    "NUM_CLASSES",
    "POSITION_EDGES",
    "spacing_class",
    "class_half_gaps",
    "base_classes",
    "class_counts",
    "class_layout",
    "base_case",
    "class_attributes",
    "null_overlaps",
    "null_bounds",
]

#: exponent field (256 values) x (mantissa == 0)
NUM_SPACING_CLASSES = 512
ON_GRID_BIN, TIE_BIN = 0, 1
#: Edges of the position intervals, as fractions of the half-gap on the weight's side (float64, exact).
POSITION_EDGES = np.concatenate([[0.0], np.exp2(np.arange(-15.0, 0.0)), 1.0 - np.exp2(np.arange(-2.0, -15.0, -1.0)), [1.0]])
_INTERVALS = len(POSITION_EDGES) - 1  # 29 per side
#: Positions g / h that get a class of their own on each side: where values of 3 more
#: mantissa bits than bf16 sit (fp16 or tf32 checkpoints; the pooler of all-MiniLM-L6-v2).
QUARTERS = (0.25, 0.5, 0.75)
_QUARTER_EDGES = tuple(int(np.flatnonzero(POSITION_EDGES == q)[0]) for q in QUARTERS)
#: on the grid, a tie, the intervals of each side (toward zero, away from zero), the quarters of each side
POSITION_BINS = 2 + 2 * _INTERVALS + 2 * len(QUARTERS)
NUM_CLASSES = NUM_SPACING_CLASSES * POSITION_BINS
_CHUNK = 1 << 22
_LOG2_LO, _LOG2_HI = -160.0, 140.0
# Below this width (in units of s) an interval is evaluated by the trapezoid rule:
# relative error <= (width/s)^2 x^2 / 12, where the closed form would cancel digits.
_MIDPOINT_WIDTH = 1e-5


def spacing_class(bits: torch.Tensor) -> torch.Tensor:
    """Spacing class of each bf16 code: ``2 * exponent_field + (mantissa == 0)`` (int64)."""
    b = bits.to(torch.int32) & 0x7FFF
    return (((b >> 7) << 1) | ((b & 0x7F) == 0).to(torch.int32)).to(torch.int64)


def class_half_gaps() -> tuple[np.ndarray, np.ndarray]:
    """Half-gaps (away from zero, toward zero) of every spacing class, (512,) float64; 0 if non-finite.

    A value on the grid is this far from the two boundaries of its rounding cell.
    """
    up = np.zeros(NUM_SPACING_CLASSES)
    down = np.zeros(NUM_SPACING_CLASSES)
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


def base_classes(weights: torch.Tensor) -> torch.Tensor:
    """Spacing x position class of each base weight (int64, same shape, on its device).

    Args:
        weights: the original base values (any float dtype; float64 is rounded
            to float32 first, as ``Tensor.to(torch.bfloat16)`` does).

    Returns:
        ``bin * 512 + spacing`` in [0, :data:`NUM_CLASSES`); non-finite bf16
        values are in bin 0 of spacing classes 510/511.
    """
    if not weights.is_floating_point():
        raise TypeError(f"base weights must be floating point, got {weights.dtype}")
    w = weights.detach().to(torch.float32)
    bits = canonical_bits(w.to(torch.bfloat16).view(torch.int16))
    spacing = spacing_class(bits)
    grid = bits.view(torch.bfloat16).to(torch.float32)
    up_t, down_t = (torch.from_numpy(g.astype(np.float32)).to(w.device) for g in class_half_gaps())
    # |w| - |c|, exact in float32 (Sterbenz); > 0 is the side away from zero. The cell of 0 is symmetric.
    offset = torch.where(grid == 0, w.abs(), (w - grid) * torch.sign(grid))
    away = offset > 0
    half_gap = torch.where(away, up_t[spacing], down_t[spacing])
    g = offset.abs()
    b = half_gap - g  # exact: both are multiples of w's float32 spacing, below 2^17 of it
    # Octave of g / h (near the grid) or b / h (near the boundary); h is a power of two, so frexp is exact.
    g_mantissa, g_exponent = torch.frexp(g / half_gap)
    b_mantissa, b_exponent = torch.frexp(b / half_gap)
    # Interval i is (edges[i], edges[i+1]]: g/h in (2^(k-16), 2^(k-15)] is interval k; b/h in [2^(e-1), 2^e), 14 - e.
    near_grid = (g_exponent - (g_mantissa == 0.5).to(g_exponent.dtype) + 15).clamp(min=0)
    near_boundary = (14 - b_exponent).clamp(max=_INTERVALS - 1)
    interval = torch.where(g <= b, near_grid, near_boundary).to(torch.int64)
    bins = 2 + away.to(torch.int64) * _INTERVALS + interval
    quarter = g / half_gap * 4
    is_quarter = (quarter == quarter.round()) & (quarter > 0) & (quarter < 4)
    bins = torch.where(is_quarter, 2 + 2 * _INTERVALS + away.to(torch.int64) * len(QUARTERS) + quarter.to(torch.int64) - 1, bins)
    bins = torch.where(b == 0, TIE_BIN, bins)
    bins = torch.where((g == 0) | (spacing >= 510), ON_GRID_BIN, bins)
    return bins * NUM_SPACING_CLASSES + spacing


def class_counts(weights: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Class counts of the base weights overall and inside each mask, for :func:`null_overlaps`.

    The probe calls this at base capture with the *original* local weights (a
    shard's slice is fine: counts of disjoint shards add up, the class layout
    is fixed).

    Args:
        weights: original base values, any shape, any float dtype.
        masks: bool tensors with ``weights.numel()`` elements (flat order).

    Returns:
        (1 + len(masks), :data:`NUM_CLASSES`) int64 on the weights' device.
    """
    flat = weights.reshape(-1)
    rows = torch.zeros((1 + len(masks), NUM_CLASSES), dtype=torch.int64, device=flat.device)
    flat_masks = [m.reshape(-1) for m in masks]
    for m in flat_masks:
        if m.numel() != flat.numel():
            raise ValueError(f"a mask has {m.numel()} elements, the weights {flat.numel()}")
    for start in range(0, flat.numel(), _CHUNK):  # bounds the temporaries of a huge matrix
        classes = base_classes(flat[start : start + _CHUNK])
        rows[0] += torch.bincount(classes, minlength=NUM_CLASSES)
        for j, m in enumerate(flat_masks):
            rows[j + 1] += torch.bincount(classes[m[start : start + _CHUNK]], minlength=NUM_CLASSES)
    return rows


def class_layout() -> dict[str, Any]:
    """The class layout, JSON-ready, for the store attributes."""
    return {
        "num_classes": NUM_CLASSES,
        "index": "position_bin * 512 + spacing_class",
        "spacing_class": "2 * exponent field of bf16(w0) + [mantissa == 0]",
        "position": "g = |w0 - bf16(w0)| / h, h the half-gap of the cell on w0's side (toward / away from zero)",
        "position_bins": "0: on the bf16 grid; 1: tie (w0 on a rounding boundary); 2 + 29 * side + i: g in (edges[i], edges[i+1]] "
        "(except the quarters; the last interval open at 1), side 0 toward zero, 1 away from zero; "
        "60 + 3 * side + q - 1: g = q / 4 exactly",
        "edges": [float(e) for e in POSITION_EDGES],
    }


def base_case(counts: np.ndarray) -> dict[str, Any]:
    """Which case the base is: ``on-grid`` (every finite W0 on the bf16 grid) or ``off-grid``.

    Args:
        counts: (P, 1 + X, C) class counts (C = 512 for stores that predate positions).

    Returns:
        ``{"case": ..., "on_grid_fraction": float}`` over all finite base weights.
    """
    total = _by_bin(np.asarray(counts, dtype=np.int64))[:, 0, :, :510]
    finite = int(total.sum())
    on_grid = int(total[:, ON_GRID_BIN].sum())
    return {"case": "on-grid" if on_grid == finite else "off-grid", "on_grid_fraction": on_grid / finite if finite else 1.0}


def class_attributes(counts: np.ndarray) -> dict[str, Any]:
    """What the store keeps next to the class counts: the :func:`base_case` and the :func:`class_layout`."""
    return {**base_case(counts), "layout": class_layout()}


def _by_bin(counts: np.ndarray) -> np.ndarray:
    """(P, R, C) -> (P, R, bins, 512); a 512-class array (older stores) is all on the grid."""
    if counts.shape[-1] == NUM_SPACING_CLASSES:
        return counts[..., None, :]
    return counts.reshape(*counts.shape[:-1], POSITION_BINS, NUM_SPACING_CLASSES)


class _Model:
    """Flip probabilities of the occupied spacing classes of P matrices, every position bin.

    The closed form of an interval needs ``Q``, ``phi`` and ``G`` only at its two
    edges, which it shares with its neighbours: they are evaluated once per
    (matrix, spacing class, side, edge). float64 numpy; ``erfc`` from torch.
    """

    def __init__(self, counts: np.ndarray, changed: np.ndarray):
        counts = np.asarray(counts)
        changed = np.asarray(changed, dtype=np.float64)
        if counts.ndim != 3 or counts.shape[2] not in (NUM_CLASSES, NUM_SPACING_CLASSES) or counts.shape[0] != changed.shape[0]:
            raise ValueError(
                f"counts must be (P, 1+X, {NUM_CLASSES}) (or {NUM_SPACING_CLASSES} classes, from older stores) "
                f"matching changed (P,), got {counts.shape} and {changed.shape}"
            )
        by_bin = _by_bin(counts)[..., :510]  # non-finite classes (exponent 255) never flip
        # Only spacing classes that hold weights are evaluated (a matrix uses a few dozen of 512).
        used = np.flatnonzero(by_bin[:, 0].any(axis=(0, 1)))
        self.off_grid = bool(by_bin.shape[2] > 1 and by_bin[:, 0, 1:].any())
        if not self.off_grid:  # a bf16 base: the former closed form, and the same sums
            by_bin = by_bin[:, :, :1]
        self.counts = np.ascontiguousarray(by_bin[..., used], dtype=np.float64)  # (P, R, bins, S)
        self.changed = changed
        self.up, self.down = _UP[used], _DOWN[used]
        edges = POSITION_EDGES[:, None]
        # Per side (toward zero: h = down; away: h = up), the near and far distances at each edge,
        # stacked: (2 [near, far], 2 [side], 31 [edge], S).
        g = np.stack([edges * self.down, edges * self.up])
        near = np.stack([self.down, self.up])[:, None, :] - g
        far = np.stack([self.up, self.down])[:, None, :] + g
        self.distances = np.stack([near, far])
        self.span = g[:, 1:] - g[:, :-1]  # (2, 30, S)

    def probabilities(self, log2_s: np.ndarray, mode: str = "mean") -> tuple[np.ndarray, np.ndarray]:
        """p_c(s) and s dp_c/ds, each (P, bins, S).

        ``mode``: ``mean`` (the class's flip probability), or the ``high`` /
        ``low`` value over its interval (the larger / smaller edge value; p is
        monotone inside every interval, whose edges include the point where a
        power-of-two cell's nearer boundary changes side).
        """
        s = np.exp2(log2_s)[:, None]
        scale = s * math.sqrt(2.0)
        up, down = self.up[None, :] / scale, self.down[None, :] / scale
        # On the grid: the former closed form, term for term.
        grid = 0.5 * (_erfc(up) + _erfc(down))
        grid_slope = _slope(up * math.sqrt(2.0)) + _slope(down * math.sqrt(2.0))
        if not self.off_grid:
            return grid[:, None, :], grid_slope[:, None, :]
        s5 = s.reshape(-1, 1, 1, 1, 1)
        x = self.distances[None] / s5  # (P, 2, 2, 31, S): near / far, side, edge
        q = 0.5 * _erfc(x / math.sqrt(2.0))
        phi = np.exp(-0.5 * x * x) / _SQRT_2PI
        edge_p = q[:, 0] + q[:, 1]
        edge_slope = (x * phi).sum(axis=1)
        left, right = edge_p[:, :, :-1], edge_p[:, :, 1:]
        if mode == "high" or mode == "low":
            take_left = (left >= right) if mode == "high" else (left <= right)
            interval = np.where(take_left, left, right)
            interval_slope = np.where(take_left, edge_slope[:, :, :-1], edge_slope[:, :, 1:])
        else:
            gee = x * q - phi
            span = self.span[None] / s.reshape(-1, 1, 1, 1)
            # Mean over g of Q((h - g)/s) + Q((h' + g)/s): integrals of Q via G.
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = (gee[:, 0, :, :-1] - gee[:, 0, :, 1:] + gee[:, 1, :, 1:] - gee[:, 1, :, :-1]) / span
                mean_slope = (phi[:, 0, :, 1:] - phi[:, 0, :, :-1] + phi[:, 1, :, :-1] - phi[:, 1, :, 1:]) / span
            wide = span > _MIDPOINT_WIDTH  # else the trapezoid rule
            interval = np.where(wide, mean, 0.5 * (left + right))
            interval_slope = np.where(wide, mean_slope, 0.5 * (edge_slope[:, :, :-1] + edge_slope[:, :, 1:]))
        # A tie: half the noise leaves at once, the other half must cross the whole cell.
        P, S = grid.shape
        quarters = list(_QUARTER_EDGES)
        p = np.concatenate([grid[:, None], edge_p[:, 0, -1:], interval.reshape(P, -1, S), edge_p[:, :, quarters].reshape(P, -1, S)], axis=1)
        slope = np.concatenate(
            [grid_slope[:, None], edge_slope[:, 0, -1:], interval_slope.reshape(P, -1, S), edge_slope[:, :, quarters].reshape(P, -1, S)],
            axis=1,
        )
        return p, slope

    def solve(self, target: np.ndarray, mode: str = "mean") -> np.ndarray:
        """log2 s (P,) at which the expected flip count is ``target``: Newton in log2 s inside a bisection bracket."""
        n = self.counts[:, 0]
        lo = np.full(target.shape, _LOG2_LO)
        hi = np.full(target.shape, _LOG2_HI)
        # Start where a typical weight's spacing is: the count-weighted mean log2 half-gap, 2 octaves down.
        weight = n.sum(axis=1)
        total = weight.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(total > 0, (weight * np.log2(self.up)).sum(axis=1) / np.maximum(total, 1.0) - 2.0, 0.5 * (lo + hi))
        for _ in range(_MAX_ITERATIONS):
            p, slope = self.probabilities(y, mode)
            f = (n * p).sum(axis=(1, 2)) - target
            fprime = (n * slope).sum(axis=(1, 2)) * math.log(2.0)
            above = f > 0
            hi = np.where(above, y, hi)
            lo = np.where(above, lo, y)
            done = (np.abs(f) <= _RTOL * np.maximum(target, 1.0)) | (hi - lo <= _YTOL)
            if done.all():
                break
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                step = y - f / fprime
            inside = np.isfinite(step) & (step > lo) & (step < hi)
            y = np.where(done, y, np.where(inside, step, 0.5 * (lo + hi)))
        return y


_SQRT_2PI = math.sqrt(2.0 * math.pi)
_MAX_ITERATIONS = 200
_RTOL, _YTOL = 1e-13, 1e-12
_UP, _DOWN = class_half_gaps()
_UP.flags.writeable = _DOWN.flags.writeable = False


def _erfc(x: np.ndarray) -> np.ndarray:
    """erfc of a float64 array (torch's, on a zero-copy view: numpy has none)."""
    return torch.special.erfc(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _slope(x: np.ndarray) -> np.ndarray:
    """s dQ(d/s)/ds = x phi(x) at x = d/s."""
    return x * np.exp(-0.5 * x * x) / _SQRT_2PI


def null_overlaps(counts: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Expected overlap of each mask with a geometry-blind change mask of the observed size.

    Args:
        counts: (P, 1 + X, C) class counts per matrix, overall then inside each
            of X masks (from :func:`class_counts`; C = :data:`NUM_CLASSES`, or
            512 spacing classes from stores that predate positions, read as on the grid).
        changed: (P,) observed changed counts ``|M|`` (NaN-changed included).

    Returns:
        (P, X) float64: ``E|X ∩ M| / E|M|`` at the noise scale that flips
        ``|M|`` weights in expectation; NaN where ``|M| = 0``. If ``|M|``
        reaches the number of finite weights, every finite weight flips and the
        null is the mask's share of finite weights.

    Raises:
        ValueError: shapes that do not match.
    """
    model = _Model(counts, changed)
    n = model.counts
    target = np.minimum(model.changed, n[:, 0].sum(axis=(1, 2)))
    p, _ = model.probabilities(model.solve(target))
    expected_total = (n[:, 0] * p).sum(axis=(1, 2))
    expected_in = (n[:, 1:] * p[:, None]).sum(axis=(2, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        result = expected_in / expected_total[:, None]
    result[model.changed <= 0] = np.nan
    return result


def null_bounds(counts: np.ndarray, changed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An interval that holds the exact per-weight null, whatever the positions inside the classes.

    Each weight's flip probability lies between its class's values at the two
    edges of its position interval (``p`` falls as ``u`` grows). The exact noise
    scale then lies between the scales at which the upper and the lower
    edge values flip ``|M|`` weights, and the exact null between the extreme
    mixes of edge values at those scales. Not on the per-snapshot path. (Where
    ``|M|`` is below half the ties, which flip at any scale, both give the
    s -> 0 limit, as :func:`null_overlaps` does.)

    Returns:
        (lower, upper), each (P, X) float64; NaN where ``|M| = 0``.
    """
    model = _Model(counts, changed)
    n = model.counts
    target = np.minimum(model.changed, n[:, 0].sum(axis=(1, 2)))
    y_small, y_large = model.solve(target, "high"), model.solve(target, "low")  # the scales the data allow
    low_small, high_large = model.probabilities(y_small, "low")[0], model.probabilities(y_large, "high")[0]
    # Below half the ties no scale flips as few as |M|: the exact null is then its s -> 0 limit.
    reached = np.minimum((n[:, 0] * model.probabilities(y_small, "high")[0]).sum(axis=(1, 2)), (n[:, 0] * low_small).sum(axis=(1, 2)))
    target = np.maximum(target, reached)
    inside = n[:, 1:]
    outside = n[:, :1] - inside
    goal = target[:, None]
    lower = np.maximum((inside * low_small[:, None]).sum(axis=(2, 3)), goal - (outside * high_large[:, None]).sum(axis=(2, 3)))
    upper = np.minimum((inside * high_large[:, None]).sum(axis=(2, 3)), goal - (outside * low_small[:, None]).sum(axis=(2, 3)))
    with np.errstate(divide="ignore", invalid="ignore"):
        lower, upper = np.clip(lower / goal, 0.0, 1.0), np.clip(upper / goal, 0.0, 1.0)
    lower[model.changed <= 0] = np.nan
    upper[model.changed <= 0] = np.nan
    return lower, upper
