"""The probe on one whole matrix (capture_base / measure, world size 1) and base_fingerprint against a numpy reference.

The reference is written out here: bf16 rounding by round-to-nearest-even on
the fp32 bits, the paper's changed rule ``|w'-w| > 1e-3 max(|w|,|w'|)`` in
float64 (with the documented conventions for NaN/Inf), masks by stable argsort
(and a float64 SVD for the principal mask), counts, profiles and packing with
numpy, and the fingerprint formula from its docstring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compass_monitor.exact_selection import select_count
from compass_monitor.matrix_probe import base_fingerprint
from compass_monitor.precision_null import NUM_CLASSES
from compass_monitor.sharding import ShapeChangedError, _whole
from whole_probe import capture_base, measure
from compass_monitor.selection import ParamSpec

P31 = 2**31 - 1
MULTIPLIERS = (48271, 16807)
EPS32 = float(np.finfo(np.float32).eps)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ----------------------------------------------------------------------------- numpy reference


def decode(codes: np.ndarray) -> np.ndarray:
    u = (np.asarray(codes).astype(np.int64) & 0xFFFF).astype(np.uint32) << 16
    with np.errstate(invalid="ignore"):
        return u.view(np.float32).astype(np.float64)


def rne_codes(x32: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 codes (uint16), round-to-nearest-even; NaN -> 0x7FC0."""
    x32 = np.asarray(x32, dtype=np.float32)
    u = x32.view(np.uint32).astype(np.uint64)
    codes = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x32), np.uint16(0x7FC0), codes)


def oracle_changed(base: np.ndarray, cur: np.ndarray) -> np.ndarray:
    finite = np.isfinite(base) & np.isfinite(cur)
    out = np.ones(base.shape, dtype=bool)
    b, c = base[finite], cur[finite]
    out[finite] = ~(np.abs(c - b) <= 1e-3 * np.maximum(np.abs(b), np.abs(c)))
    both_inf = np.isinf(base) & np.isinf(cur)
    out[both_inf] = base[both_inf] != cur[both_inf]
    return out


def canonical(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.uint16).copy()
    codes[codes == 0x8000] = 0
    return codes


def stable_mask(order: np.ndarray, count: int, shape) -> np.ndarray:
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(shape)


def my_class(codes: np.ndarray) -> np.ndarray:
    u = np.asarray(codes).astype(np.int64) & 0xFFFF
    return 2 * ((u >> 7) & 0xFF) + ((u & 0x7F) == 0)


def fingerprint_numpy(codes: np.ndarray, start: int = 0) -> np.ndarray:
    """``sum_i v_i w(i) mod p``, ``w(i) = (i a mod p) + 1``, i the flat index starting at ``start``."""
    v = np.asarray(codes, dtype=np.uint16).ravel().astype(np.int64)
    i = np.arange(start, start + v.size, dtype=np.int64)
    out = []
    for a in MULTIPLIERS:
        w = (i * a) % P31 + 1
        out.append(int(((v * w) % P31).sum() % P31))
    return np.array(out, dtype=np.int64)


def to_bf16_tensor(codes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


def unpack(packed: torch.Tensor, shape) -> np.ndarray:
    return np.unpackbits(packed.numpy(), count=int(np.prod(shape))).astype(bool).reshape(shape)


# ----------------------------------------------------------------------------- test data


def make_base(rng, shape, nonfinite_base=False) -> np.ndarray:
    w = rng.standard_normal(shape) * 0.02
    w[rng.random(shape) < 0.02] *= 25.0
    codes = rne_codes(w.astype(np.float32))
    flat = codes.ravel()
    k = max(1, flat.size // 15)
    flat[rng.choice(flat.size, size=k, replace=False)] = rng.choice(np.array([0x0000, 0x8000, 0x0001, 0x8003], dtype=np.uint16), size=k)
    if nonfinite_base and flat.size >= 3:
        flat[rng.choice(flat.size, size=3, replace=False)] = [0x7FC0, 0x7F80, 0xFF80]
    return codes


def drift(rng, base_codes: np.ndarray, inject=True) -> np.ndarray:
    """fp32 master weights near the base: exact copies, relative drift around the rounding edge,
    absolute noise, zero sign swaps, and (optionally) a NaN, +Inf and -Inf."""
    w0 = decode(base_codes)
    w = w0.copy()
    finite = np.isfinite(w0)
    kind = rng.integers(0, 4, size=w.shape)
    rel = rng.uniform(-6e-3, 6e-3, size=w.shape)
    w = np.where((kind == 1) & finite, w0 * (1 + rel), w)
    w = np.where((kind == 2) & finite, w0 + rng.standard_normal(w.shape) * 1e-4, w)
    zero = finite & (w0 == 0)
    w[zero & (kind == 3)] = np.copysign(0.0, -np.copysign(1.0, w0[zero & (kind == 3)]))
    w[zero & (kind == 1)] = rng.choice([1e-42, -1e-42, 5e-41, -5e-41], size=int((zero & (kind == 1)).sum()))
    w = w.astype(np.float32)
    if inject:
        flat = w.ravel()
        idx = rng.choice(flat.size, size=min(3, flat.size), replace=False)
        flat[idx] = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)[: idx.size]
    return w


def reference_low(base_codes: np.ndarray, alpha: float) -> np.ndarray:
    w0 = np.nan_to_num(decode(base_codes), nan=0.0, posinf=0.0, neginf=0.0)
    count = select_count(w0.size, alpha)
    return stable_mask(np.argsort(np.abs(w0).ravel(), kind="stable"), count, w0.shape)


def check_principal(base_codes: np.ndarray, principal: np.ndarray, rank: int, alpha: float) -> None:
    w0 = np.nan_to_num(decode(base_codes), nan=0.0, posinf=0.0, neginf=0.0)
    m, n = w0.shape
    count = select_count(w0.size, alpha)
    assert int(principal.sum()) == count
    if rank >= min(m, n):
        score = np.abs(w0)
        expected = stable_mask(np.argsort(-score.ravel(), kind="stable"), count, w0.shape)
        assert np.array_equal(principal, expected)
        return
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    score = np.abs((u[:, :rank] * s[:rank]) @ vt[:rank])
    expected = stable_mask(np.argsort(-score.ravel(), kind="stable"), count, w0.shape)
    differ = principal != expected
    if differ.any():
        tol = 16 * EPS32 * s[0] * (1 + s[0] / (s[rank - 1] - s[rank]))
        threshold = np.sort(score.ravel())[::-1][count - 1]
        assert np.all(np.abs(score[differ] - threshold) <= 2 * tol), "principal mask differs away from the threshold"
        assert differ.sum() <= 2


# ----------------------------------------------------------------------------- capture + measure


CASES = [
    # (shape, rank, inject nonfinite into W_t, nonfinite in W0)
    ((1, 37), 64, True, False),
    ((37, 1), 64, True, False),
    ((13, 7), 64, True, False),
    ((13, 7), 3, True, True),
    ((31, 17), 4, True, False),
    ((31, 17), 64, False, True),
    ((1, 1), 64, False, False),
    ((2, 3), 1, True, False),
    ((64, 65), 8, True, False),
]


BACKENDS = ["numpy", "torch", "auto"]


@pytest.mark.parametrize("shape, rank, inject, nonfinite_base", CASES, ids=[f"{c[0]}-r{c[1]}-inj{int(c[2])}-nfb{int(c[3])}" for c in CASES])
@pytest.mark.parametrize("base_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_and_measure_against_numpy(rng, shape, rank, inject, nonfinite_base, base_dtype, backend):
    m, n = shape
    alpha = float(rng.choice([0.5, rng.uniform(0.05, 0.95)]))
    base_codes = make_base(rng, shape, nonfinite_base)
    w0 = decode(base_codes)
    spec = ParamSpec(name="layers.0.q_proj.weight", role="linear", module_type="q", layer=0, shape=shape)
    base_weight = to_bf16_tensor(base_codes) if base_dtype == "bf16" else torch.from_numpy(w0.astype(np.float32))

    state, class_counts, fingerprint, base_nonfinite = capture_base(spec, base_weight, rank=rank, alpha=alpha)

    # --- base state
    canon = canonical(base_codes)
    got_bits = state.base_bits.numpy().view(np.uint16)
    nan = np.isnan(w0)
    # NaN payloads are not preserved through fp32 -> bf16 rounding (torch gives 0xFFFF): any NaN code will do.
    assert np.array_equal(got_bits[~nan], canon[~nan])
    assert np.all((got_bits[nan] & 0x7FFF) > 0x7F80)
    canon = got_bits if base_dtype == "fp32" else canon
    assert int(base_nonfinite) == int((~np.isfinite(w0)).sum())
    assert np.array_equal(fingerprint.numpy(), fingerprint_numpy(canon))
    assert state.reference_packed.shape == (3, (m * n + 7) // 8)
    principal = unpack(state.reference_packed[0], shape)
    low = unpack(state.reference_packed[1], shape)
    assert np.array_equal(low, reference_low(base_codes, alpha))
    check_principal(base_codes, principal, rank, alpha)
    assert np.array_equal(unpack(state.reference_packed[2], shape), principal & ~low)
    assert np.array_equal(state.reference_packed.numpy(), np.stack([np.packbits(x.ravel()) for x in (principal, low, principal & ~low)]))
    cls = my_class(canon).ravel()
    expected_classes = np.stack([np.bincount(cls, minlength=512)] + [np.bincount(cls[x.ravel()], minlength=512) for x in (principal, low, principal & ~low)])
    # The base is on the bf16 grid: all in position bin 0 (the first 512 classes) of the precision null.
    assert class_counts.shape == (4, NUM_CLASSES) and class_counts[:, 512:].sum() == 0
    assert np.array_equal(class_counts.numpy()[:, :512], expected_classes)

    # --- two snapshots
    previous = np.zeros(shape, dtype=bool)
    for snapshot in range(2):
        wt = drift(rng, base_codes, inject=inject)
        cur_codes = rne_codes(wt)
        changed = oracle_changed(w0, decode(cur_codes))
        result = measure(state, torch.from_numpy(wt), backend=backend)
        expected_counts = [
            changed.sum(),
            (changed & principal).sum(),
            (changed & low).sum(),
            (changed & principal & ~low).sum(),
            (changed ^ previous).sum(),
            (~np.isfinite(decode(cur_codes))).sum(),
        ]
        assert result.counts.dtype == torch.int64 and result.counts.shape == (6,)
        assert result.rows.dtype == result.cols.dtype == torch.int32
        assert result.packed.dtype == torch.uint8
        assert result.counts.tolist() == [int(c) for c in expected_counts], f"snapshot {snapshot}"
        assert np.array_equal(result.rows.numpy(), changed.sum(axis=1))
        assert np.array_equal(result.cols.numpy(), changed.sum(axis=0))
        assert result.rows.shape == (m,) and result.cols.shape == (n,)
        assert np.array_equal(result.packed.numpy(), np.packbits(changed.ravel()))
        if inject:
            assert expected_counts[0] >= 1 and expected_counts[5] >= 1
        previous = changed


def test_measure_distinguishes_both_outcomes(rng):
    """On a realistic drift the reference mask is neither empty nor full (the test has teeth)."""
    base_codes = make_base(rng, (31, 17))
    changed = oracle_changed(decode(base_codes), decode(rne_codes(drift(rng, base_codes, inject=False))))
    assert 0.1 < changed.mean() < 0.9


@pytest.mark.parametrize("shape", [(1, 13), (13, 1), (13, 7), (31, 17)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_change(rng, shape, backend):
    base_codes = make_base(rng, shape)
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=shape)
    state, *_ = capture_base(spec, to_bf16_tensor(base_codes), rank=2, alpha=0.5)
    w0 = decode(base_codes)
    flipped_zeros = base_codes.copy()
    flipped_zeros[(base_codes & 0x7FFF) == 0] ^= 0x8000  # +0 <-> -0
    for weight in (
        torch.from_numpy(w0.astype(np.float32)),
        to_bf16_tensor(base_codes),
        to_bf16_tensor(flipped_zeros),
        torch.from_numpy(w0),  # float64 master copy of the same values
    ):
        result = measure(state, weight, backend=backend)
        assert result.counts.tolist() == [0] * 6
        assert not result.rows.any() and not result.cols.any() and not result.packed.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_flips_since_previous_after_revert(rng, backend):
    shape = (13, 7)
    base_codes = make_base(rng, shape)
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=shape)
    state, *_ = capture_base(spec, to_bf16_tensor(base_codes), rank=64, alpha=0.5)
    w0 = decode(base_codes).astype(np.float32)
    wt = drift(rng, base_codes, inject=False)
    first = measure(state, torch.from_numpy(wt), backend=backend)
    # Back to the base: every change flips back.
    second = measure(state, torch.from_numpy(w0), backend=backend)
    assert int(second.counts[0]) == 0
    assert int(second.counts[4]) == int(first.counts[0])
    # Same weights twice: no flips.
    third = measure(state, torch.from_numpy(wt), backend=backend)
    fourth = measure(state, torch.from_numpy(wt), backend=backend)
    assert int(third.counts[4]) == int(first.counts[0])
    assert int(fourth.counts[4]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_parameter_as_row(rng, backend):
    base_codes = make_base(rng, (1, 29))
    spec = ParamSpec(name="norm.weight", role="norm", module_type="norm", layer=-1, shape=(1, 29))
    state, *_ = capture_base(spec, to_bf16_tensor(base_codes.ravel()), rank=64, alpha=0.5)
    wt = drift(rng, base_codes, inject=False).ravel()
    result = measure(state, torch.from_numpy(wt), backend=backend)
    changed = oracle_changed(decode(base_codes).ravel(), decode(rne_codes(wt)))
    assert int(result.counts[0]) == int(changed.sum())
    assert np.array_equal(result.cols.numpy(), changed.astype(np.int32))


def test_backends_agree_and_share_the_previous_mask(rng):
    """Alternating numpy and torch measurements on one state: identical results, flips chained."""
    shape = (31, 17)
    base_codes = make_base(rng, shape, nonfinite_base=True)
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=shape)
    state_np, *_ = capture_base(spec, to_bf16_tensor(base_codes), rank=4, alpha=0.5)
    state_t, *_ = capture_base(spec, to_bf16_tensor(base_codes), rank=4, alpha=0.5)
    state_mix, *_ = capture_base(spec, to_bf16_tensor(base_codes), rank=4, alpha=0.5)
    for step in range(4):
        wt = torch.from_numpy(drift(rng, base_codes, inject=bool(step % 2)))
        a = measure(state_np, wt, backend="numpy")
        b = measure(state_t, wt, backend="torch")
        c = measure(state_mix, wt, backend=("numpy", "torch")[step % 2])
        for r in (b, c):
            assert torch.equal(a.counts, r.counts) and torch.equal(a.rows, r.rows)
            assert torch.equal(a.cols, r.cols) and torch.equal(a.packed, r.packed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_measure_non_contiguous_and_bf16_weights(rng, backend):
    shape = (13, 7)
    base_codes = make_base(rng, shape)
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=shape)
    state, *_ = capture_base(spec, to_bf16_tensor(base_codes), rank=64, alpha=0.5)
    wt = drift(rng, base_codes)
    expected = oracle_changed(decode(base_codes), decode(rne_codes(wt)))
    transposed_storage = torch.from_numpy(np.ascontiguousarray(wt.T)).t()  # (13, 7), not contiguous
    assert not transposed_storage.is_contiguous()
    bf16_weight = transposed_storage.to(torch.bfloat16)
    for weight in (transposed_storage, bf16_weight, torch.nn.Parameter(torch.from_numpy(wt))):
        result = measure(state, weight, backend=backend)
        assert int(result.counts[0]) == int(expected.sum())
        assert np.array_equal(result.packed.numpy(), np.packbits(expected.ravel()))


def test_measure_rejects_unknown_backend(rng):
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=(3, 4))
    state, *_ = capture_base(spec, torch.zeros(3, 4), rank=1, alpha=0.5)
    with pytest.raises(ValueError):
        measure(state, torch.zeros(3, 4), backend="cuda")


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_matches_formula_and_decomposes_over_row_blocks(rng):
    for shape in [(1, 1), (1, 37), (37, 1), (13, 7), (31, 17), (257, 129)]:
        codes = canonical(rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16))
        expected = fingerprint_numpy(codes)
        got = base_fingerprint(torch.from_numpy(codes.view(np.int16)))
        assert got.dtype == torch.int64 and got.shape == (2,)
        assert np.array_equal(got.numpy(), expected)
        # Row blocks with global flat offsets add up mod p.
        m, n = shape
        cuts = np.sort(rng.choice(np.arange(1, m), size=min(3, m - 1), replace=False)) if m > 1 else np.array([], dtype=int)
        total = np.zeros(2, dtype=np.int64)
        for block_rows in np.split(np.arange(m), cuts):
            if block_rows.size:
                total = (total + fingerprint_numpy(codes[block_rows], start=int(block_rows[0]) * n)) % P31
        assert np.array_equal(total, expected)


def test_fingerprint_sees_value_and_position_changes(rng):
    codes = canonical(rng.integers(0, 1 << 16, size=(31, 17), dtype=np.uint32).astype(np.uint16))
    ref = base_fingerprint(torch.from_numpy(codes.view(np.int16))).numpy()
    changed = codes.copy()
    i = int(rng.integers(codes.size))
    changed.ravel()[i] ^= np.uint16(1 << int(rng.integers(16)))
    assert not np.array_equal(base_fingerprint(torch.from_numpy(changed.view(np.int16))).numpy(), ref)
    swapped = codes.copy().ravel()
    a, b = np.flatnonzero(swapped != swapped[0])[:1].tolist() + [0]
    swapped[[a, b]] = swapped[[b, a]]
    assert not np.array_equal(base_fingerprint(torch.from_numpy(swapped.reshape(codes.shape).view(np.int16))).numpy(), ref)


def test_fingerprint_across_internal_chunks(rng):
    """More than 2^22 elements: the library sums in chunks; the total must still match."""
    shape = (2100, 2100)
    assert shape[0] * shape[1] > 1 << 22
    codes = canonical(rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16))
    got = base_fingerprint(torch.from_numpy(codes.view(np.int16)))
    assert np.array_equal(got.numpy(), fingerprint_numpy(codes))


def test_capture_fingerprint_ignores_zero_sign(rng):
    codes = make_base(rng, (13, 7))
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=(13, 7))
    flipped = codes.copy()
    flipped[(codes & 0x7FFF) == 0] ^= 0x8000
    assert not np.array_equal(flipped, codes)
    fp_a = capture_base(spec, to_bf16_tensor(codes), rank=2, alpha=0.5)[2]
    fp_b = capture_base(spec, to_bf16_tensor(flipped), rank=2, alpha=0.5)[2]
    assert torch.equal(fp_a, fp_b)


# ----------------------------------------------------------------------------- shapes


def test_shape_changes_are_refused(rng):
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=(13, 7))
    w = torch.from_numpy(rng.standard_normal((13, 7)).astype(np.float32))
    assert torch.equal(_whole(spec, w).local(), w.reshape(-1))
    assert torch.equal(_whole(spec, w.reshape(-1)).local(), w.reshape(-1))  # a flat view of the same numel is accepted
    for bad in (torch.zeros(7, 13), torch.zeros(13, 8), torch.zeros(1, 91), torch.zeros(90), torch.zeros(13, 7, 1)[..., :0]):
        with pytest.raises(ShapeChangedError):
            _whole(spec, bad).local()
    state, *_ = capture_base(spec, w, rank=2, alpha=0.5)
    for backend in BACKENDS:
        with pytest.raises(ShapeChangedError):
            measure(state, torch.zeros(7, 13), backend=backend)
    with pytest.raises(ShapeChangedError):
        capture_base(spec, torch.zeros(14, 7), rank=2, alpha=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_matrix(backend):
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=(0, 5))
    state, class_counts, fingerprint, nonfinite = capture_base(spec, torch.zeros(0, 5), rank=2, alpha=0.5)
    assert class_counts.sum() == 0 and fingerprint.tolist() == [0, 0] and int(nonfinite) == 0
    result = measure(state, torch.zeros(0, 5), backend=backend)
    assert result.counts.tolist() == [0] * 6
    assert result.rows.shape == (0,) and result.cols.tolist() == [0] * 5 and result.packed.numel() == 0


def test_a_failing_fused_kernel_falls_back_to_torch_once(rng, monkeypatch, caplog):
    """A kernel that cannot compile or launch on the user's GPU must not end the monitor: the range is measured
    with plain torch ops, the failure is logged once, and the kernel is not tried again for that range."""
    import logging

    import compass_monitor.matrix_probe as matrix_probe

    calls = []

    def broken(state, shape):
        calls.append(shape)
        raise RuntimeError("ptxas fatal: unsupported gpu architecture")

    spec = ParamSpec(name="layers.0.q_proj.weight", role="linear", module_type="q", layer=0, shape=(9, 13))
    base_codes = make_base(rng, (9, 13))
    state, *_ = capture_base(spec, to_bf16_tensor(base_codes), rank=2, alpha=0.5)
    wt = drift(rng, base_codes, inject=False)
    expected = measure(state, torch.from_numpy(wt), backend="numpy")
    state.previous_packed = torch.zeros_like(state.previous_packed)
    monkeypatch.setattr(matrix_probe, "fused_available", lambda device: True)
    monkeypatch.setattr(matrix_probe, "fused_measure_range", broken)
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        first = measure(state, torch.from_numpy(wt))
        state.previous_packed = torch.zeros_like(state.previous_packed)
        second = measure(state, torch.from_numpy(wt))
    assert len(calls) == 1 and caplog.text.count("fused mask kernel failed") == 1
    for got in (first, second):
        assert got.counts.tolist() == expected.counts.tolist()
        assert torch.equal(got.packed, expected.packed) and torch.equal(got.rows, expected.rows)
