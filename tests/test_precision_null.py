"""The precision null (DESIGN sec. 6) against independent references.

* spacing classes and half-gaps against actual bf16 neighbours decoded in numpy;
* ``null_overlaps`` against (a) the element-wise flip probabilities written out
  from those neighbours at a known noise scale, and (b) a Monte-Carlo
  simulation: real Gaussian noise added in float64 to bf16 weights, rounded back
  to bf16, flips counted overall and inside masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from compass_monitor.precision_null import NUM_CLASSES, class_counts, class_half_gaps, null_overlaps, spacing_class
from references import low_magnitude_mask, principal_mask

MAX_FINITE_MAG = 0x7F7F

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ----------------------------------------------------------------------------- independent helpers


def decode(codes: np.ndarray) -> np.ndarray:
    u = (np.asarray(codes).astype(np.int64) & 0xFFFF).astype(np.uint32) << 16
    with np.errstate(invalid="ignore"):
        return u.view(np.float32).astype(np.float64)


def my_class(codes: np.ndarray) -> np.ndarray:
    u = np.asarray(codes).astype(np.int64) & 0xFFFF
    exponent = (u >> 7) & 0xFF
    mantissa = u & 0x7F
    return 2 * exponent + (mantissa == 0)


def neighbour_half_gaps(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half distances to the next bf16 value away from / toward zero (finite codes).

    Above the largest finite value the next 'value' is 2^128 (where rounding
    overflows to Inf); below zero the next value is the smallest subnormal of the
    other sign.
    """
    mag = np.asarray(codes).astype(np.int64) & 0x7FFF
    assert mag.max(initial=0) <= MAX_FINITE_MAG
    here = decode(mag)
    above = np.where(mag + 1 > MAX_FINITE_MAG, 2.0**128, decode(np.minimum(mag + 1, MAX_FINITE_MAG)))
    below = np.where(mag == 0, -decode(np.ones_like(mag)), decode(np.maximum(mag - 1, 0)))
    return (above - here) / 2, (here - below) / 2


def flip_probability(codes: np.ndarray, s: float) -> np.ndarray:
    """P(bf16(w + N(0, s^2)) != w) for bf16 codes w, from their actual neighbours."""
    up, down = neighbour_half_gaps(codes)
    return ndtr(-up / s) + ndtr(-down / s)


def realistic_codes(rng: np.random.Generator, shape) -> np.ndarray:
    w = rng.standard_normal(shape) * 0.02
    outliers = rng.random(shape) < 0.01
    w[outliers] *= 25.0
    w[rng.random(shape) < 0.003] = 0.0
    w[rng.random(shape) < 0.002] = rng.choice([-1, 1]) * 3e-39  # subnormal in bf16
    return torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def my_counts(codes: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    cls = my_class(codes).ravel()
    rows = [np.bincount(cls, minlength=NUM_CLASSES)]
    rows += [np.bincount(cls[m.ravel()], minlength=NUM_CLASSES) for m in masks]
    return np.stack(rows)


def reference_masks(rng, codes: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    w0 = torch.from_numpy(decode(codes).astype(np.float32))
    principal = principal_mask(w0, 8, 0.5).numpy()
    low = low_magnitude_mask(w0, 0.5).numpy()
    random = rng.random(codes.shape) < 0.3
    return ["principal", "low", "principal_not_low", "random"], [principal, low, principal & ~low, random]


# ----------------------------------------------------------------------------- classes and gaps


def test_spacing_class_against_numpy_decode():
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = spacing_class(torch.from_numpy(codes.view(np.int16)))
    assert got.dtype == torch.int64
    assert np.array_equal(got.numpy(), my_class(codes))
    assert got.min() >= 0 and got.max() < NUM_CLASSES
    two_d = spacing_class(torch.from_numpy(codes.view(np.int16).reshape(256, 256)))
    assert two_d.shape == (256, 256)


def test_class_half_gaps_against_actual_neighbours():
    up, down = class_half_gaps()
    assert up.shape == down.shape == (NUM_CLASSES,) and up.dtype == np.float64
    mags = np.arange(MAX_FINITE_MAG + 1)
    codes = np.concatenate([mags, mags | 0x8000])
    ref_up, ref_down = neighbour_half_gaps(codes)
    cls = my_class(codes)
    # Every finite code's actual half-gaps equal its class's (so the class really determines them).
    bad_up = np.flatnonzero(up[cls] != ref_up)
    bad_down = np.flatnonzero(down[cls] != ref_down)
    assert bad_up.size == 0, [(hex(int(codes[i])), up[cls[i]], ref_up[i]) for i in bad_up[:5]]
    assert bad_down.size == 0, [(hex(int(codes[i])), down[cls[i]], ref_down[i]) for i in bad_down[:5]]
    # All 510 finite classes occur; the two non-finite classes (exponent 255) have no gaps.
    assert np.unique(cls).size == NUM_CLASSES - 2
    assert up[510] == up[511] == down[510] == down[511] == 0.0
    assert np.all(up[:510] > 0) and np.all(down[:510] > 0)


def test_class_counts_against_bincount(rng):
    codes = realistic_codes(rng, (37, 53))
    codes.ravel()[:3] = [0x7F80, 0xFFC0, 0x8000]  # Inf, NaN, -0
    masks = [rng.random(codes.shape) < p for p in (0.0, 0.3, 1.0)]
    got = class_counts(spacing_class(torch.from_numpy(codes.view(np.int16))), [torch.from_numpy(m) for m in masks])
    assert got.shape == (4, NUM_CLASSES) and got.dtype == torch.int64
    assert np.array_equal(got.numpy(), my_counts(codes, masks))


# ----------------------------------------------------------------------------- null vs element-wise model


def test_null_overlaps_equals_elementwise_model_at_known_scale(rng):
    codes = realistic_codes(rng, (200, 300))
    names, masks = reference_masks(rng, codes)
    counts = my_counts(codes, masks)[None]
    for s in (1e-40, 1e-9, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        p = flip_probability(codes, s)
        expected_changed = p.sum()
        expected = np.array([p[m].sum() / expected_changed for m in masks])
        got = null_overlaps(counts, np.array([expected_changed]))
        assert got.shape == (1, len(masks)) and got.dtype == np.float64
        assert np.allclose(got[0], expected, rtol=1e-9, atol=1e-12), (s, dict(zip(names, got[0])), dict(zip(names, expected)))


def test_null_overlaps_monte_carlo(rng):
    """Observed overlaps under real Gaussian noise agree with the null within ~4 standard errors."""
    codes = realistic_codes(rng, (200, 300))
    names, masks = reference_masks(rng, codes)
    counts = my_counts(codes, masks)[None]
    w0 = decode(codes)
    n = codes.size
    trials = 16

    def scale_for_density(target: float) -> float:
        lo, hi = -40.0, 0.0  # log10 s
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if flip_probability(codes, 10.0**mid).mean() < target else (lo, mid)
        return 10.0 ** (0.5 * (lo + hi))

    densities = []
    for target in (0.05, 0.2, 0.5, 0.9):
        s = scale_for_density(target)
        p = flip_probability(codes, s)
        obs, null, sizes = [], [], []
        for _ in range(trials):
            noisy = w0 + rng.standard_normal(w0.shape) * s
            rounded = torch.from_numpy(noisy.astype(np.float32)).to(torch.bfloat16).to(torch.float64).numpy()
            flips = rounded != w0  # value compare: -0 == +0
            size = int(flips.sum())
            sizes.append(size)
            obs.append([(flips & m).sum() / size for m in masks])
            null.append(null_overlaps(counts, np.array([size]))[0])
        obs, null, sizes = np.array(obs), np.array(null), np.array(sizes)
        density = sizes.mean() / n
        densities.append(density)

        # The element-wise model predicts the flip count itself (checks the model, not the library).
        sd_total = np.sqrt((p * (1 - p)).sum() / trials)
        assert abs(sizes.mean() - p.sum()) <= 4.5 * sd_total + 1, (target, sizes.mean(), p.sum())

        diff = obs - null
        # Given |X| = N flips out of n, the count inside a mask of null share q has
        # (at most) hypergeometric variance N q (1-q) (n-N)/(n-1); cross-checked
        # against the spread over the trials.
        fpc = ((n - sizes) / (n - 1))[:, None]
        se_model = np.sqrt((null * (1 - null) / sizes[:, None] * fpc).mean(axis=0) / trials)
        se_emp = diff.std(axis=0, ddof=1) / np.sqrt(trials)
        se = np.maximum(se_model, se_emp)
        for j, name in enumerate(names):
            assert abs(diff[:, j].mean()) <= 4 * se[j] + 0.5 / sizes.mean(), (
                f"density {density:.3f} (s={s:.3g}), mask {name}: observed overlap {obs[:, j].mean():.5f} "
                f"vs null {null[:, j].mean():.5f}, 4 SE = {4 * se[j]:.5f}"
            )
        if target == 0.05:
            # The null is far from the mask share at low density: the check has power.
            low = names.index("low")
            share = masks[low].mean()
            assert null[:, low].mean() > share + 0.2, (null[:, low].mean(), share)
    assert min(densities) < 0.08 and max(densities) > 0.85, densities


# ----------------------------------------------------------------------------- edge cases


def test_null_overlaps_zero_changed_is_nan(rng):
    codes = realistic_codes(rng, (13, 7))
    counts = my_counts(codes, [rng.random(codes.shape) < 0.5, np.ones(codes.shape, bool)])[None]
    got = null_overlaps(counts, np.array([0]))
    assert got.shape == (1, 2) and np.isnan(got).all()


def test_null_overlaps_all_finite_changed_gives_mask_share(rng):
    codes = realistic_codes(rng, (31, 17))
    nonfinite = rng.choice(codes.size, size=5, replace=False)
    codes.ravel()[nonfinite] = [0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81]
    finite = np.isfinite(decode(codes))
    masks = [rng.random(codes.shape) < 0.4, ~finite | (rng.random(codes.shape) < 0.2), np.ones(codes.shape, bool)]
    counts = my_counts(codes, masks)[None]
    share = np.array([(m & finite).sum() / finite.sum() for m in masks])
    for changed in (finite.sum(), finite.sum() + 3, codes.size):
        got = null_overlaps(counts, np.array([changed]))[0]
        assert np.allclose(got, share, rtol=1e-12, atol=1e-12), (changed, got, share)


def test_null_overlaps_ignores_nonfinite_base_values(rng):
    codes = realistic_codes(rng, (40, 30))
    masks = [rng.random(codes.shape) < 0.5, rng.random(codes.shape) < 0.1]
    counts = my_counts(codes, masks)
    with_nonfinite = counts.copy()
    # Add Inf / NaN base entries overall and inside the masks.
    with_nonfinite[:, 510] += np.array([7, 3, 1])
    with_nonfinite[:, 511] += np.array([5, 5, 0])
    for changed in (10, 300, 1100):
        a = null_overlaps(counts[None], np.array([changed]))
        b = null_overlaps(with_nonfinite[None], np.array([changed]))
        assert np.allclose(a, b, rtol=1e-12, atol=0), (changed, a, b)


def test_null_overlaps_batches_independently(rng):
    all_counts, changed, singles = [], [], []
    for shape in [(13, 7), (31, 17), (1, 50), (60, 40)]:
        codes = realistic_codes(rng, shape)
        counts = my_counts(codes, [rng.random(shape) < 0.5, rng.random(shape) < 0.2])
        c = int(rng.integers(1, codes.size))
        all_counts.append(counts)
        changed.append(c)
        singles.append(null_overlaps(counts[None], np.array([c]))[0])
    changed[1] = 0
    singles[1] = np.full(2, np.nan)
    got = null_overlaps(np.stack(all_counts), np.array(changed))
    assert np.allclose(got, np.stack(singles), rtol=1e-12, atol=0, equal_nan=True)


def test_null_overlaps_rejects_bad_shapes():
    with pytest.raises(ValueError):
        null_overlaps(np.zeros((1, 2, 511)), np.array([1]))
    with pytest.raises(ValueError):
        null_overlaps(np.zeros((2, 2, NUM_CLASSES)), np.array([1]))
    with pytest.raises(ValueError):
        null_overlaps(np.zeros((2, NUM_CLASSES)), np.array([1, 1]))
