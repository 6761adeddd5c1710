"""Reference masks (paper Sec. 4.2) against numpy float64 references.

* top-count selection == ``np.argsort(-score, kind="stable")[:count]`` (ties:
  lowest flat index first), on data with many ties;
* ``M_low`` == ``np.argsort(|w|, kind="stable")[:floor(alpha n)]``;
* ``M_princ``: the rank-k reconstruction against a float64 numpy SVD, and the
  mask against the float64 reference mask, allowing disagreement only where the
  float64 score is within the reconstruction's rounding of the threshold.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from compass_monitor.exact_selection import select_count, top_count_mask
from references import low_magnitude_mask, low_rank_reconstruction, principal_mask

EPS32 = float(np.finfo(np.float32).eps)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ----------------------------------------------------------------------------- references


def ref_top(score: np.ndarray, count: int) -> np.ndarray:
    order = np.argsort(-score.ravel(), kind="stable")[:count]
    mask = np.zeros(score.size, dtype=bool)
    mask[order] = True
    return mask.reshape(score.shape)


def ref_bottom(values: np.ndarray, count: int) -> np.ndarray:
    order = np.argsort(values.ravel(), kind="stable")[:count]
    mask = np.zeros(values.size, dtype=bool)
    mask[order] = True
    return mask.reshape(values.shape)


def to_bf16_values(x: np.ndarray) -> np.ndarray:
    """Round to bf16 (RNE on the fp32 bits, numpy only) and return float32 values."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    code = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)
    return (code << 16).view(np.float32)


def svd_rank_k(w64: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(w64, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], s


def tie_heavy_scores(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    if kind == "bf16":
        return to_bf16_values(rng.standard_normal(shape) * 0.02)
    if kind == "int":
        return rng.integers(0, 5, size=shape).astype(np.float32)
    if kind == "signed_zeros":
        return rng.choice(np.array([-0.0, 0.0, 1.0, -1.0], dtype=np.float32), size=shape)
    if kind == "inf":
        return rng.choice(np.array([-np.inf, np.inf, 0.0, 2.0, 2.0], dtype=np.float32), size=shape)
    if kind == "continuous":
        return rng.standard_normal(shape).astype(np.float32)
    raise ValueError(kind)


SCORE_KINDS = ["bf16", "int", "signed_zeros", "inf", "continuous"]


# ----------------------------------------------------------------------------- top_count_mask


@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (37, 1), (13, 7), (31, 17)], ids=str)
def test_top_count_mask_every_count(rng, kind, shape):
    score = tie_heavy_scores(rng, shape, kind)
    n = score.size
    t = torch.from_numpy(score)
    for count in range(n + 1):
        got = top_count_mask(t, count)
        assert got.shape == shape and got.dtype == torch.bool
        expected = ref_top(score, count)
        assert np.array_equal(got.numpy(), expected), f"count={count}, score={score.ravel().tolist()}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_count_mask_larger_tie_heavy(rng, dtype):
    shape = (int(rng.integers(100, 300)), int(rng.integers(100, 300)))
    for kind in SCORE_KINDS:
        score = tie_heavy_scores(rng, shape, kind).astype(dtype)
        t = torch.from_numpy(score)
        n = score.size
        counts = {0, 1, n - 1, n, n // 2} | set(rng.integers(0, n + 1, size=12).tolist())
        for count in sorted(counts):
            assert np.array_equal(top_count_mask(t, count).numpy(), ref_top(score, count)), (kind, count)


def test_top_count_mask_empty_and_invalid(rng):
    empty = torch.zeros(0, 5)
    assert top_count_mask(empty, 0).shape == (0, 5)
    score = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32))
    for bad in (-1, 13):
        with pytest.raises(ValueError):
            top_count_mask(score, bad)


# ----------------------------------------------------------------------------- select_count


def test_select_count_is_floor_alpha_n(rng):
    for _ in range(2000):
        n = int(rng.integers(0, 10**8))
        alpha = float(rng.random())
        c = select_count(n, alpha)
        assert isinstance(c, int)
        assert 0 <= c <= n
        assert c <= alpha * n < c + 1
    for n in (0, 1, 7, 64 * 65):
        assert select_count(n, 0.0) == 0
        assert select_count(n, 1.0) == n
        assert select_count(n, 0.5) == n // 2  # 0.5 is exact in binary
    # Monotone in alpha.
    n = 12345
    alphas = np.sort(rng.random(500))
    counts = [select_count(n, float(a)) for a in alphas]
    assert all(a <= b for a, b in zip(counts, counts[1:]))


# ----------------------------------------------------------------------------- low-magnitude mask


@pytest.mark.parametrize("shape", [(1, 1), (1, 13), (13, 1), (13, 7), (31, 17), (200, 300)], ids=str)
@pytest.mark.parametrize("as_bf16", [True, False])
def test_low_magnitude_mask_matches_stable_argsort(rng, shape, as_bf16):
    w = to_bf16_values(rng.standard_normal(shape) * 0.02)
    # Edge values: +-0, subnormals, large outliers, duplicates of opposite sign.
    flat = w.ravel()
    k = max(1, flat.size // 10)
    idx = rng.choice(flat.size, size=min(k, flat.size), replace=False)
    specials = to_bf16_values(np.array([0.0, -0.0, 1e-40, -1e-40, 9.2e-41, 30.0, -30.0], dtype=np.float32))
    flat[idx] = rng.choice(specials, size=idx.size)
    flat[: flat.size // 2] *= np.where(rng.random(flat.size // 2) < 0.5, -1, 1).astype(np.float32)
    t = torch.from_numpy(w)
    if as_bf16:
        t = t.to(torch.bfloat16)  # exact: the values are bf16 already
    for alpha in {0.0, 0.5, 1.0, float(rng.random()), float(rng.random())}:
        count = select_count(w.size, alpha)
        got = low_magnitude_mask(t, alpha)
        assert got.shape == shape
        assert int(got.sum()) == count
        assert np.array_equal(got.numpy(), ref_bottom(np.abs(w.astype(np.float64)), count)), alpha


def test_low_magnitude_mask_float64_input_is_not_downcast(rng):
    """Bottom-alpha of |W0| for a float64 W0 must rank by the float64 magnitudes.

    Library bug (reference_masks.py, low_magnitude_mask): ``w0.detach().float()``
    rounds float64 input to float32, so magnitudes that differ only beyond
    float32 precision tie, and the lowest index wins instead of the smaller
    value. (principal_mask keeps float64; the monitor itself only passes
    bf16-decoded float32, so this affects direct users of the function.)
    """
    base = rng.uniform(0.5, 1.0, size=200)
    # Pairs that are distinct in float64 but equal after rounding to float32:
    # the larger one comes first, so a float32 tie-break picks the wrong one.
    w = np.empty(400)
    w[0::2] = base + 1e-12
    w[1::2] = base
    w = w.reshape(20, 20)
    assert np.array_equal(w.astype(np.float32)[:, 0::2], w.astype(np.float32)[:, 1::2])  # ties in float32
    # An odd count splits a tied pair at the threshold: the smaller (odd-index) one belongs in.
    alpha = 201.5 / 400
    assert select_count(w.size, alpha) == 201
    got = low_magnitude_mask(torch.from_numpy(w), alpha).numpy()
    expected = ref_bottom(np.abs(w), select_count(w.size, alpha))
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} of {w.size} entries differ"


# ----------------------------------------------------------------------------- principal mask


def _gapped_matrix(rng, m, n, k):
    """A matrix with a clear spectral gap after the k-th singular value, rounded to bf16."""
    r = min(m, n)
    s = np.sort(rng.uniform(0.5, 1.0, size=r))[::-1] * 0.05
    s[:k] *= 4.0
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return to_bf16_values((u * s) @ v.T)


def _realistic_matrix(rng, m, n):
    w = rng.standard_normal((m, n)) * 0.02
    outliers = rng.random((m, n)) < 0.01
    w[outliers] *= 25.0
    w[:, rng.integers(0, n)] *= 5.0  # a heavy column
    return to_bf16_values(w)


def _check_principal(w: np.ndarray, k: int, alpha: float, dtype=torch.float32):
    """Reconstruction vs float64 SVD within a gap-aware float32 bound; mask vs float64 reference."""
    w64 = w.astype(np.float64)
    m, n = w.shape
    t = torch.from_numpy(w64).to(dtype)
    rec64, s = svd_rank_k(w64, k)
    got = low_rank_reconstruction(t, k)
    assert got.shape == (m, n)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    got64 = got.double().numpy()
    err = float(np.abs(got64 - rec64).max())
    # Perturbation of a rank-k truncation: ~ eps * sigma_1 * (1 + sigma_1 / gap_k).
    eps = EPS32 if dtype != torch.float64 else float(np.finfo(np.float64).eps)
    gap = s[k - 1] - s[k]
    tol = 16 * eps * s[0] * (1 + s[0] / gap)
    assert err <= tol, f"max |W_k(lib) - W_k(float64)| = {err:.3g} > {tol:.3g} (sigma1={s[0]:.3g}, gap={gap:.3g})"

    count = select_count(w.size, alpha)
    score64 = np.abs(rec64)
    expected = ref_top(score64, count)
    mask = principal_mask(t, k, alpha).numpy()
    assert mask.shape == (m, n) and int(mask.sum()) == count
    differ = mask != expected
    if count == 0 or count == w.size:
        assert not differ.any()
        return int(differ.sum())
    threshold = np.sort(score64.ravel())[::-1][count - 1]
    # Each float32 score is within err of its float64 value, so an element can only
    # be ranked differently if its float64 score is within 2*err of the threshold.
    near = np.abs(score64 - threshold) <= 2 * err * (1 + 1e-6) + 1e-300
    assert not (differ & ~near).any(), (
        f"{int((differ & ~near).sum())} mask disagreements far from the threshold "
        f"(threshold {threshold:.6g}, err {err:.3g})"
    )
    assert differ.sum() <= max(2, 1e-3 * w.size), f"{int(differ.sum())} disagreements"
    return int(differ.sum())


@pytest.mark.parametrize("shape, k", [((200, 300), 8), ((31, 17), 4), ((64, 65), 16), ((1, 40), 1), ((40, 1), 1), ((13, 7), 2)], ids=str)
def test_principal_mask_realistic_vs_float64(rng, shape, k):
    w = _realistic_matrix(rng, *shape)
    alpha = float(rng.choice([0.5, rng.uniform(0.05, 0.95)]))
    if k >= min(shape):
        # rank >= min(m, n): the score is |W0| itself, exact, so the mask matches exactly.
        got = principal_mask(torch.from_numpy(w), k, alpha).numpy()
        assert np.array_equal(got, ref_top(np.abs(w.astype(np.float64)), select_count(w.size, alpha)))
    else:
        _check_principal(w, k, alpha)


@pytest.mark.parametrize("shape, k", [((120, 90), 8), ((90, 120), 3), ((300, 200), 32)], ids=str)
def test_principal_mask_gapped_vs_float64(rng, shape, k):
    w = _gapped_matrix(rng, *shape, k)
    for alpha in (0.5, float(rng.uniform(0.05, 0.95))):
        _check_principal(w, k, alpha)


def test_principal_float64_input_stays_float64(rng):
    w = rng.standard_normal((40, 30))
    rec64, s = svd_rank_k(w, 5)
    got = low_rank_reconstruction(torch.from_numpy(w), 5)
    assert got.dtype == torch.float64
    assert np.abs(got.numpy() - rec64).max() <= 64 * np.finfo(np.float64).eps * s[0] * (1 + s[0] / (s[4] - s[5]))


@pytest.mark.parametrize("orientation", ["tall", "wide"])
@pytest.mark.parametrize("decay", [1e-1, 1e-4, 1e-7])
def test_reconstruction_matches_documented_float64_accuracy(rng, orientation, decay):
    """Decaying spectra, both orientations: the documented accuracy ("exact up to float64
    rounding", returned in the input's precision) against numpy's float64 SVD.

    float64 input: within an SVD-level bound 64 eps64 sigma1 (1 + sigma1/gap_k).
    float32 input: within one float32 ulp of the float64 reconstruction, plus that bound.
    """
    m, n = (120, 80) if orientation == "tall" else (80, 120)
    r = min(m, n)
    sv = np.geomspace(1.0, decay, r) * 0.05
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    k = int(rng.integers(1, r))
    eps64 = float(np.finfo(np.float64).eps)
    for dtype in (np.float64, np.float32):
        w = ((u * sv) @ v.T).astype(dtype)
        rec64, s = svd_rank_k(w.astype(np.float64), k)
        bound64 = 64 * eps64 * s[0] * (1 + s[0] / (s[k - 1] - s[k]))
        got = low_rank_reconstruction(torch.from_numpy(w), k)
        assert got.dtype == (torch.float64 if dtype == np.float64 else torch.float32)
        err = np.abs(got.double().numpy() - rec64)
        allowed = bound64 + (0.0 if dtype == np.float64 else np.spacing(np.abs(rec64).astype(np.float32)).astype(np.float64))
        worst = int(np.argmax(err - allowed))
        assert np.all(err <= allowed), f"k={k}: error {err.ravel()[worst]:.3g} > allowed {np.ravel(allowed * np.ones_like(err))[worst]:.3g}"


def test_rank_at_least_min_dim_is_w0_itself(rng):
    for shape in [(1, 1), (1, 9), (9, 1), (7, 5), (5, 7), (31, 17)]:
        w = _realistic_matrix(rng, *shape)
        for rank in (min(shape), min(shape) + 1, 64):
            t = torch.from_numpy(w)
            rec = low_rank_reconstruction(t.to(torch.bfloat16), rank)
            assert rec.dtype == torch.float32
            assert np.array_equal(rec.numpy(), w)  # exactly W0, no SVD round-off
            alpha = float(rng.uniform(0, 1))
            got = principal_mask(t.to(torch.bfloat16), rank, alpha).numpy()
            assert np.array_equal(got, ref_top(np.abs(w.astype(np.float64)), select_count(w.size, alpha)))


def test_rank_zero_reconstruction_is_zero(rng):
    w = _realistic_matrix(rng, 9, 7)
    rec = low_rank_reconstruction(torch.from_numpy(w), 0)
    assert rec.shape == (9, 7)
    assert not rec.numpy().any()


# ----------------------------------------------------------------------------- large input


def test_low_magnitude_mask_above_2_pow_24_elements(rng):
    """5000 x 4000 = 2e7 > 2^24 elements (torch.quantile's limit), with massive bf16 ties.

    Reference by numpy partition: all entries below the count-th smallest |w|, then
    the lowest-index entries equal to it.
    """
    m, n = 5000, 4000
    assert m * n > 2**24
    w = to_bf16_values(rng.standard_normal((m, n), dtype=np.float32) * 0.02)
    alpha = float(rng.uniform(0.2, 0.8))
    count = select_count(m * n, alpha)
    got = low_magnitude_mask(torch.from_numpy(w), alpha).numpy().ravel()

    a = np.abs(w).ravel()
    threshold = np.partition(a, count - 1)[count - 1]
    expected = a < threshold
    need = count - int(expected.sum())
    ties = np.flatnonzero(a == threshold)
    assert need >= 1 and ties.size > need  # ties at the threshold really are broken
    expected[ties[:need]] = True
    assert int(got.sum()) == count
    assert np.array_equal(got, expected)


def test_select_count_uses_alpha_as_written():
    # 0.7 * 90 == 62.99999999999999 in binary floating point; the user means 63.
    assert select_count(90, 0.7) == 63
    assert select_count(10, 0.3) == 3
