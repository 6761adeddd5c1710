"""The exact bf16 change probe against the paper's tolerance rule (Def. 2.1, App. D).

The probe under test is ``changed_from_bits(bf16_bits(cur), canonical_bits(bf16_bits(base)))``.
The oracle is written out here, independently of the library:

* bf16 values are decoded to float64 with numpy only:
  ``(code.astype(uint32) << 16).view(float32).astype(float64)``;
* finite pairs follow the paper's rule ``|w' - w| <= 1e-3 max(|w|, |w'|)``
  evaluated in float64 (``changed`` is its negation);
* where the paper is silent (non-finite values) the library's documented
  conventions apply: Inf equals the same Inf, +Inf != -Inf, Inf != any finite
  value, and a NaN on either side is a change.

fp32 -> bf16 rounding is checked against round-to-nearest-even on the uint32
bit patterns, ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compass_monitor.bf16 import bf16_bits, canonical_bits, changed_from_bits, paper_rule_changed

ETA = 1e-3
MAX_FINITE_MAG = 0x7F7F  # largest finite bf16 magnitude code
INF_CODE = 0x7F80

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ----------------------------------------------------------------------------- oracle


def decode(codes: np.ndarray) -> np.ndarray:
    """bf16 codes (any integer dtype, taken mod 2^16) -> float64, numpy only."""
    u = (np.asarray(codes).astype(np.int64) & 0xFFFF).astype(np.uint32) << 16
    with np.errstate(invalid="ignore"):
        return u.view(np.float32).astype(np.float64)


def paper_rule(base: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """``changed`` by eq. (1) in float64 (meaningful for finite inputs)."""
    with np.errstate(invalid="ignore", over="ignore"):
        unchanged = np.abs(cur - base) <= ETA * np.maximum(np.abs(base), np.abs(cur))
    return ~unchanged


def oracle_changed(base: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Paper rule on finite pairs; documented conventions elsewhere (float64 values)."""
    base = np.asarray(base, dtype=np.float64)
    cur = np.asarray(cur, dtype=np.float64)
    finite = np.isfinite(base) & np.isfinite(cur)
    out = np.ones(base.shape, dtype=bool)  # any NaN, or finite vs Inf: changed
    out[finite] = paper_rule(base[finite], cur[finite])
    both_inf = np.isinf(base) & np.isinf(cur)
    out[both_inf] = base[both_inf] != cur[both_inf]
    return out


def rne_fp32_to_bf16(x32: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 code (uint16) on the bit pattern, finite inputs."""
    u = np.asarray(x32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def probe(base: torch.Tensor, cur: torch.Tensor) -> np.ndarray:
    return changed_from_bits(bf16_bits(cur), canonical_bits(bf16_bits(base))).numpy()


def probe_codes(base_codes: np.ndarray, cur_codes: np.ndarray) -> np.ndarray:
    as_bf16 = lambda c: torch.from_numpy((np.asarray(c).astype(np.int64) & 0xFFFF).astype(np.uint16).view(np.int16)).view(torch.bfloat16)
    return probe(as_bf16(base_codes), as_bf16(cur_codes))


def finite_codes() -> np.ndarray:
    """All 65280 finite bf16 codes (as uint16), both signs."""
    mags = np.arange(MAX_FINITE_MAG + 1, dtype=np.uint32)
    return np.concatenate([mags, mags | 0x8000]).astype(np.uint16)


def random_finite_codes(rng: np.random.Generator, size: int) -> np.ndarray:
    mags = rng.integers(0, MAX_FINITE_MAG + 1, size=size, dtype=np.uint32)
    signs = rng.integers(0, 2, size=size, dtype=np.uint32) << 15
    return (mags | signs).astype(np.uint16)


def assert_same(expected: np.ndarray, got: np.ndarray, base_codes, cur_codes, what: str) -> None:
    bad = np.flatnonzero(expected != got)
    if bad.size:
        examples = ", ".join(
            f"(base {int(base_codes[i]):#06x}={decode(base_codes[i])!r}, cur {int(cur_codes[i]):#06x}={decode(cur_codes[i])!r}: "
            f"expected changed={bool(expected[i])}, got {bool(got[i])})"
            for i in bad[:5]
        )
        pytest.fail(f"{what}: {bad.size} of {expected.size} pairs disagree, e.g. {examples}")


# ----------------------------------------------------------------------------- the oracle itself


def test_decode_is_value_preserving_for_bf16():
    """The numpy decode agrees with torch's own bf16 -> float64 conversion on all 65536 codes."""
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = decode(codes)
    theirs = torch.from_numpy(codes.view(np.int16)).view(torch.bfloat16).to(torch.float64).numpy()
    nan = np.isnan(ours)
    assert np.array_equal(nan, np.isnan(theirs))
    assert nan.sum() == 2 * 127  # exponent 255 with nonzero mantissa, both signs
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.array_equal(np.signbit(ours[~nan]), np.signbit(theirs[~nan]))


# ----------------------------------------------------------------------------- exhaustive neighbours


def test_every_finite_code_against_neighbours_negation_and_zeros():
    """Each finite code vs code+-1 (raw, wrapping), same-sign magnitude+-1, its negation, +0 and -0; both orders."""
    codes = finite_codes().astype(np.int64)
    mag = codes & 0x7FFF
    sign = codes & 0x8000
    partners = [
        (codes + 1) & 0xFFFF,
        (codes - 1) & 0xFFFF,
        sign | np.minimum(mag + 1, 0x7FFF),
        sign | np.maximum(mag - 1, 0),
        codes ^ 0x8000,
        np.zeros_like(codes),
        np.full_like(codes, 0x8000),
    ]
    base = np.concatenate([np.tile(codes, len(partners)), np.concatenate(partners)])
    cur = np.concatenate([np.concatenate(partners), np.tile(codes, len(partners))])
    expected = oracle_changed(decode(base), decode(cur))
    got = probe_codes(base, cur)
    assert_same(expected, got, base, cur, "exhaustive neighbour pairs")

    # Sanity of the oracle on this set: it is not trivially all-changed or all-unchanged.
    assert 0 < expected.sum() < expected.size
    # The library's float64 rule agrees with ours on the finite pairs.
    vb, vc = decode(base), decode(cur)
    finite = np.isfinite(vb) & np.isfinite(vc)
    assert np.array_equal(paper_rule_changed(vb[finite], vc[finite]), paper_rule(vb[finite], vc[finite]))


def test_paper_rule_equals_value_inequality_on_finite_bf16():
    """Cor. D.4 for the oracle itself: on finite bf16 pairs eq. (1) is exactly value inequality."""
    codes = finite_codes().astype(np.int64)
    for partner in ((codes + 1) & 0xFFFF, codes ^ 0x8000, np.zeros_like(codes)):
        b, c = decode(codes), decode(partner)
        finite = np.isfinite(c)
        assert np.array_equal(paper_rule(b[finite], c[finite]), b[finite] != c[finite])


# ----------------------------------------------------------------------------- random pairs


def _random_pair_chunk(rng: np.random.Generator, kind: str, size: int):
    """Returns (base tensor, current tensor, expected changed, base codes, current codes)."""
    if kind == "uniform":
        b, c = random_finite_codes(rng, size), random_finite_codes(rng, size)
    elif kind == "close_raw":
        b = random_finite_codes(rng, size)
        c = ((b.astype(np.int64) + rng.integers(-4, 5, size=size)) & 0xFFFF).astype(np.uint16)
    elif kind == "close_magnitude":
        b = random_finite_codes(rng, size).astype(np.int64)
        mag = np.clip((b & 0x7FFF) + rng.integers(-3, 4, size=size), 0, MAX_FINITE_MAG + 1)
        flip_sign = (rng.random(size) < 0.1).astype(np.int64) << 15
        c = (((b & 0x8000) ^ flip_sign) | mag).astype(np.uint16)
        b = b.astype(np.uint16)
    else:
        b = c = None
    if b is not None:
        to_t = lambda x: torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        return to_t(b), to_t(c), oracle_changed(decode(b), decode(c)), b, c

    # fp32 values rounded to bf16 by the probe; our oracle rounds them with numpy RNE.
    if kind == "fp32_bits":
        # Uniform over finite fp32 bit patterns (all binades, subnormals, +-0 rare).
        u = rng.integers(0, 0x7F800000, size=size, dtype=np.uint32) | (rng.integers(0, 2, size=size, dtype=np.uint32) << 31)
        x = u.view(np.float32)
    else:  # "fp32_drift": realistic weights drifting by small relative amounts
        x = (rng.standard_normal(size) * 10.0 ** rng.uniform(-8, 2, size=size)).astype(np.float32)
    rel = rng.choice([0.0, 1.0], size=size, p=[0.1, 0.9]) * np.where(rng.random(size) < 0.5, -1, 1) * 10.0 ** rng.uniform(-9, -1, size=size)
    with np.errstate(over="ignore"):
        y = (x.astype(np.float64) * (1.0 + rel)).astype(np.float32)
    # 10% exact copies come from rel == 0; add some sign flips (changed unless zero).
    negate = rng.random(size) < 0.01
    y[negate] = -x[negate]
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    b, c = rne_fp32_to_bf16(x), rne_fp32_to_bf16(y)
    return torch.from_numpy(x), torch.from_numpy(y), oracle_changed(decode(b), decode(c)), b, c


def test_ten_million_random_pairs(rng):
    plan = [("uniform", 3), ("close_raw", 2), ("close_magnitude", 2), ("fp32_bits", 2), ("fp32_drift", 2)]
    chunk = 1_000_000
    total = 0
    changed_fraction = {}
    for kind, n_chunks in plan:
        hits = 0
        count = 0
        for _ in range(n_chunks):
            base, cur, expected, b, c = _random_pair_chunk(rng, kind, chunk)
            got = probe(base, cur)
            assert_same(expected, got, b, c, f"random pairs ({kind})")
            total += expected.size
            hits += int(expected.sum())
            count += expected.size
        changed_fraction[kind] = hits / count
    assert total >= 10_000_000
    # Every family must exercise both outcomes, or it tests nothing.
    for kind, frac in changed_fraction.items():
        assert 0.0 < frac < 1.0 or kind == "uniform", (kind, frac)
    assert 0.05 < changed_fraction["fp32_drift"] < 0.95, changed_fraction


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize(
    "base_code, cur_code, changed, why",
    [
        (0x0000, 0x8000, False, "+0 vs -0"),
        (0x8000, 0x0000, False, "-0 vs +0"),
        (0x8000, 0x8000, False, "-0 vs -0"),
        (0x0000, 0x0001, True, "zero vs smallest subnormal"),
        (0x8000, 0x0001, True, "-0 vs smallest subnormal"),
        (0x0001, 0x8000, True, "smallest subnormal vs -0"),
        (0x0000, 0x8001, True, "zero vs -smallest subnormal"),
        (0x0001, 0x8001, True, "subnormal vs its negation"),
        (0x7F80, 0x7F80, False, "+Inf vs +Inf"),
        (0xFF80, 0xFF80, False, "-Inf vs -Inf"),
        (0x7F80, 0xFF80, True, "+Inf vs -Inf"),
        (0x7F7F, 0x7F80, True, "max finite vs +Inf"),
        (0x7F80, 0x7F7F, True, "+Inf vs max finite"),
        (0x7FC0, 0x7FC0, True, "NaN vs the same NaN"),
        (0x3F80, 0x7FC0, True, "1.0 vs NaN"),
        (0x7F80, 0xFFC1, True, "+Inf vs negative NaN"),
        (0x0000, 0x7F81, True, "0 vs signalling-pattern NaN"),
        (0x7FC0, 0x3F80, True, "base NaN vs 1.0"),
        (0x7FC0, 0x0000, True, "base NaN vs 0"),
        (0x7FC0, 0x7F80, True, "base NaN vs +Inf"),
    ],
)
def test_conventions(base_code, cur_code, changed, why):
    got = probe_codes(np.array([base_code]), np.array([cur_code]))
    assert bool(got[0]) is changed, why
    # The convention oracle used by the pair tests says the same.
    assert bool(oracle_changed(decode(np.array([base_code])), decode(np.array([cur_code])))[0]) is changed, why


def test_conventions_through_fp32_rounding(rng):
    """Zero handling survives rounding: tiny fp32 values round to +-0 and stay 'unchanged' vs 0."""
    smallest_sub = float(decode(np.array([1]))[0])
    tiny = rng.uniform(0, smallest_sub / 2, size=1000) * rng.choice([-1, 1], size=1000)  # round to +-0 (ties to even 0)
    tiny = np.append(tiny, [smallest_sub / 2, -smallest_sub / 2, 0.0, -0.0])
    base = torch.zeros(tiny.size, dtype=torch.bfloat16)
    cur = torch.from_numpy(tiny.astype(np.float32))
    assert not probe(base, cur).any()
    assert not probe(-base, cur).any()
    # Just above half the smallest subnormal rounds to it: changed vs zero.
    half = np.float32(smallest_sub / 2)
    above = torch.from_numpy(np.array([np.nextafter(half, np.float32(1)), -smallest_sub * 0.75, smallest_sub], dtype=np.float32))
    assert probe(torch.zeros(3, dtype=torch.bfloat16), above).all()
    # NaN and Inf in fp32 master weights.
    cur = torch.tensor([float("nan"), float("inf"), float("-inf"), float("inf")])
    base = torch.tensor([float("nan"), float("inf"), float("inf"), 1.0], dtype=torch.bfloat16)
    assert probe(base, cur).tolist() == [True, False, True, True]


# ----------------------------------------------------------------------------- fp32 -> bf16 rounding


def test_fp32_rounding_is_round_to_nearest_even(rng):
    n = 400_000
    u_all = rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)
    upper = rng.integers(0, 1 << 16, size=n, dtype=np.uint32) << 16
    low_specials = np.array([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF, 0x0001], dtype=np.uint32)
    ties_and_near = upper | rng.choice(low_specials, size=n)
    subnormal = (rng.integers(0, 1 << 23, size=n, dtype=np.uint32)) | (rng.integers(0, 2, size=n, dtype=np.uint32) << 31)
    near_max = np.uint32(0x7F7F0000) + rng.integers(0, 0x10000, size=1000, dtype=np.uint32)
    edges = np.array([0x00000000, 0x80000000, 0x00008000, 0x00018000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F808000, 0x3F818000], dtype=np.uint32)
    u = np.concatenate([u_all, ties_and_near, subnormal, near_max, near_max | np.uint32(0x80000000), edges])
    x = u.view(np.float32)
    finite = np.isfinite(x)
    assert (ties_and_near & 0xFFFF == 0x8000).sum() > 10_000  # exact ties are exercised

    got = bf16_bits(torch.from_numpy(x[finite])).numpy().view(np.uint16)
    expected = rne_fp32_to_bf16(x[finite])
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, [(hex(int(u[finite][i])), hex(int(expected[i])), hex(int(got[i]))) for i in bad[:5]]
    # Overflow to Inf is exercised and correct.
    assert (expected == INF_CODE).sum() > 0 and (expected == (INF_CODE | 0x8000)).sum() > 0

    # Non-finite fp32 inputs stay non-finite with the same class.
    nan_in = np.concatenate([x[np.isnan(x)], np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FFFFFFF], dtype=np.uint32).view(np.float32)])
    nan_bits = bf16_bits(torch.from_numpy(nan_in)).numpy().view(np.uint16)
    assert np.all((nan_bits & 0x7FFF) > INF_CODE), nan_bits


def test_fp64_input_is_rounded_through_fp32(rng):
    """Documents bf16_bits on float64: it follows ``Tensor.to(bfloat16)``, which rounds to fp32 first.

    This is double rounding, not RNE of the float64 value (e.g. 1 + 2^-8 + 2^-30
    becomes 1.0, though it lies above the tie). Frameworks keep fp32 masters, so
    this is the convention that matters; the test pins it down.
    """
    x = rng.standard_normal(100_000) * 10.0 ** rng.uniform(-30, 30, size=100_000)
    x = np.append(x, [1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30)])
    got = bf16_bits(torch.from_numpy(x)).numpy().view(np.uint16)
    expected = rne_fp32_to_bf16(x.astype(np.float32))
    assert np.array_equal(got, expected)


def test_bf16_bits_rejects_integers_and_keeps_bf16_exact(rng):
    with pytest.raises(TypeError):
        bf16_bits(torch.arange(4))
    codes = random_finite_codes(rng, 10_000)
    t = torch.from_numpy(codes.view(np.int16)).view(torch.bfloat16)
    assert np.array_equal(bf16_bits(t).numpy().view(np.uint16), codes)
    # Non-contiguous input: same codes as the contiguous copy.
    m = t.reshape(100, 100).t()
    assert np.array_equal(bf16_bits(m).numpy().view(np.uint16), codes.reshape(100, 100).T)


def test_canonical_bits_maps_only_negative_zero(rng):
    codes = np.concatenate([np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)])
    got = canonical_bits(torch.from_numpy(codes.view(np.int16))).numpy().view(np.uint16)
    expected = codes.copy()
    expected[codes == 0x8000] = 0
    assert np.array_equal(got, expected)
