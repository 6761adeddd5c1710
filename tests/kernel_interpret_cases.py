"""Cases for the fused Triton mask pass under Triton's interpreter (run by ``test_kernels_interpret.py``).

Triton chooses the interpreter when it is imported and its functions decorated,
so these cases run in their own pytest process with ``TRITON_INTERPRET=1`` (the
file is not named ``test_*`` and is not collected by the main run). Each case
compares the kernel on CPU tensors, bit for bit, with the probe's own numpy
measurement (``matrix_probe.measure_range(backend="numpy")``, i.e.
``matrix_probe.changed_np`` / ``counts_np`` and ``pack_aligned``) on odd shapes,
edge values (+-0, subnormals, NaN, Inf, fp32 halfway between bf16 neighbours)
and row-sharded / mid-row / mid-byte ranges. The interpreter is slow: shapes stay small.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; run these cases in a fresh process")
os.environ["TRITON_INTERPRET"] = "1"

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from compass_monitor import kernels  # noqa: E402
from compass_monitor.bf16 import bf16_bits, canonical_bits  # noqa: E402
from compass_monitor.matrix_probe import measure_range as _measure_range  # noqa: E402
from compass_monitor.kernels import triton_mask  # noqa: E402
from compass_monitor.matrix_probe import changed_np, counts_np  # noqa: E402


@pytest.fixture
def tm():
    """The kernel module, its kernels decorated in interpreter mode."""
    return triton_mask


def _state(values: torch.Tensor, base_bits: torch.Tensor, start: int, rng: np.random.Generator) -> SimpleNamespace:
    """A ShardState stand-in: random reference and previous bytes (every bit, pads included)."""
    nbytes = (start + values.numel() + 7) // 8 - start // 8
    reference = torch.from_numpy(rng.integers(0, 256, (3, nbytes), dtype=np.uint8))
    previous = torch.from_numpy(rng.integers(0, 256, nbytes, dtype=np.uint8))
    shard = SimpleNamespace(local=lambda: values)
    return SimpleNamespace(shard=shard, start=start, numel=values.numel(), base_bits=base_bits, reference_packed=reference, previous_packed=previous)


def _assert_equal(state: SimpleNamespace, shape: tuple[int, int], fused: tuple[torch.Tensor, ...]) -> None:
    counts, rows, cols, packed = _measure_range(state, shape, backend="numpy")
    got_counts, got_rows, got_cols, got_packed = (t.numpy() for t in fused)
    assert got_counts.dtype == np.int64 and got_rows.dtype == np.int32 and got_cols.dtype == np.int32
    np.testing.assert_array_equal(got_packed, packed.numpy())
    np.testing.assert_array_equal(got_counts, counts)
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got_cols, cols)


def _run(tm, state: SimpleNamespace, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    return tm.fused_mask_pass(
        state.shard.local(), state.base_bits, state.reference_packed, state.previous_packed, start=state.start, shape=shape
    )


def _drifted(numel: int, rng: np.random.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W0 (canonical bf16 codes) and current weights with about a third of the entries moved."""
    w0 = torch.from_numpy(rng.standard_normal(numel).astype(np.float32))
    base = canonical_bits(bf16_bits(w0).clone())
    current = w0.clone()
    moved = torch.from_numpy(rng.random(numel) < 0.35)
    current[moved] += torch.from_numpy(rng.standard_normal(int(moved.sum())).astype(np.float32)) * 0.02
    return current.to(dtype), base


@pytest.mark.parametrize("shape", [(1, 37), (29, 1), (7, 13), (9, 300), (17, 264), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_matrix_odd_shapes(tm, shape, dtype, rng):
    m, n = shape
    current, base = _drifted(m * n, rng, dtype)
    state = _state(current, base, 0, rng)
    _assert_equal(state, shape, _run(tm, state, shape))


def test_whole_matrix_matches_changed_np_counts_np(tm, rng):
    """Against the single-process probe's helpers directly, with all-zero previous mask (M_{-1} = empty)."""
    m, n = 11, 40
    current, base = _drifted(m * n, rng, torch.float32)
    changed, nonfinite = changed_np(bf16_bits(current).numpy().reshape(m, n), base.numpy().reshape(m, n))
    packed = np.packbits(changed)
    reference = torch.from_numpy(rng.integers(0, 256, (3, packed.size), dtype=np.uint8))
    previous = torch.zeros(packed.size, dtype=torch.uint8)
    counts, rows, cols, got = tm.fused_mask_pass(current, base, reference, previous, start=0, shape=(m, n))
    np.testing.assert_array_equal(got.numpy(), packed)
    np.testing.assert_array_equal(counts.numpy(), counts_np(packed, reference.numpy(), previous.numpy(), nonfinite))
    np.testing.assert_array_equal(rows.numpy(), changed.sum(axis=1))
    np.testing.assert_array_equal(cols.numpy(), changed.sum(axis=0))
    assert counts[0] == changed.sum() and counts[4] == changed.sum()


def _edge_fp32_bits() -> np.ndarray:
    """fp32 bit patterns at every rounding and classification boundary of bf16."""
    highs = np.array([0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x7FC0, 0x7F81, 0x4049], dtype=np.uint32)
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    bits = (highs[:, None] << 16 | lows[None, :]).ravel()  # halfway (0x8000) with even and odd kept bits
    return np.concatenate([bits, bits | 0x80000000]).astype(np.uint32)


def test_fp32_rounding_to_bf16_edges(tm, rng):
    """Halfway cases, subnormals, +-0, NaN payloads, the overflow to Inf: the codes and the probe agree with torch."""
    bits = _edge_fp32_bits()
    current = torch.from_numpy(bits.view(np.int32).copy()).view(torch.float32)
    numel = current.numel()
    # The base holds the round-to-nearest code of each value, its neighbour, or +0 / Inf:
    # pairs that must be equal and pairs one ulp apart.
    exact = bf16_bits(current).numpy().astype(np.int32)
    offsets = rng.integers(-1, 2, numel)
    base_codes = np.where(np.isin(exact & 0x7FFF, [0x7F80]) | ((exact & 0x7FFF) > 0x7F80), exact, exact + offsets)
    base = canonical_bits(torch.from_numpy((base_codes & 0xFFFF).astype(np.uint16).view(np.int16)))
    for start, shape in ((0, (1, numel)), (0, (numel // 6, 6)), (5, (1, numel + 11))):
        state = _state(current, base, start, rng)
        _assert_equal(state, shape, _run(tm, state, shape))
    # A vanishing base: every nonzero current value counts as changed, +-0 does not, NaN does.
    zero_base = torch.zeros(numel, dtype=torch.int16)
    state = _state(current, zero_base, 0, rng)
    counts = _run(tm, state, (1, numel))[0]
    rounded = bf16_bits(current).numpy()
    nan = (rounded & 0x7FFF) > 0x7F80
    assert counts[0] == np.count_nonzero((rounded & 0x7FFF) != 0)
    assert counts[5] == np.count_nonzero((rounded & 0x7FFF) >= 0x7F80) > np.count_nonzero(nan) > 0
    _assert_equal(state, (1, numel), _run(tm, state, (1, numel)))


def test_bf16_edge_codes(tm, rng):
    """bf16 currents: -0 against a +0 base, subnormal neighbours, Inf against Inf, NaN against NaN."""
    codes = np.array(
        [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x3F80, 0xBF80],
        dtype=np.uint16,
    )
    grid = np.stack(np.meshgrid(codes, codes, indexing="ij"), axis=-1).reshape(-1, 2)  # every (current, base) pair
    current = torch.from_numpy(grid[:, 0].view(np.int16).copy()).view(torch.bfloat16)
    base = canonical_bits(torch.from_numpy(grid[:, 1].view(np.int16).copy()))
    numel = current.numel()
    for start, shape in ((0, (codes.size, codes.size)), (3, (1, numel + 3)), (17, ((17 + numel + 6) // 7, 7))):
        state = _state(current, base, start, rng)
        _assert_equal(state, shape, _run(tm, state, shape))
    counts = _run(tm, _state(current, base, 0, rng), (codes.size, codes.size))[0]
    nan_rows = np.count_nonzero((codes & 0x7FFF) > 0x7F80) * codes.size
    assert counts[5] == np.count_nonzero((grid[:, 0] & 0x7FFF) >= 0x7F80)
    assert counts[0] >= nan_rows  # NaN is changed whatever the base held


@pytest.mark.parametrize(
    ("shape", "start", "numel"),
    [
        ((12, 24), 3 * 24, 5 * 24),  # row-sharded slice, byte-aligned: the grid kernel
        ((12, 24), 11 * 24, 24),  # the last row alone
        ((12, 24), 3 * 24 + 8, 4 * 24 - 3),  # mid-row start, aligned byte, ends mid-byte
        ((12, 24), 3 * 24 + 13, 5 * 24 - 2),  # FSDP1-style on a width % 8 == 0: mid-row, mid-byte (grid kernel)
        ((1, 264), 3, 250),  # one row, mid-byte both ends, two column tiles (grid kernel)
        ((12, 20), 2 * 20, 6 * 20),  # row-sharded, n % 8 != 0: the flat kernel
        ((12, 20), 45, 97),  # FSDP1-style: mid-row and mid-byte start and end
        ((12, 20), 3, 2),  # inside one byte
        ((1, 300), 7, 290),  # one row, mid-byte both ends, wider than a tile
        ((40, 1), 9, 30),  # a column vector
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranges(tm, shape, start, numel, dtype, rng):
    current, base = _drifted(numel, rng, dtype)
    state = _state(current, base, start, rng)
    _assert_equal(state, shape, _run(tm, state, shape))


def test_row_tiles_looped_per_program(tm, monkeypatch, rng):
    """Several row tiles per program (the large-matrix launch shape), on a small matrix."""
    monkeypatch.setattr(tm, "_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(tm, "_MAX_ROW_STEPS", 4)
    shape = (37, 264)
    for start, numel in ((0, 37 * 264), (264 * 5 + 16, 264 * 30 - 5), (264 * 2 + 131, 264 * 33 + 7)):
        current, base = _drifted(numel, rng, torch.float32)
        state = _state(current, base, start, rng)
        _assert_equal(state, shape, _run(tm, state, shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_round_through_torch(tm, dtype, rng):
    current, base = _drifted(6 * 10, rng, dtype)
    state = _state(current, base, 4, rng)
    _assert_equal(state, (7, 10), _run(tm, state, (7, 10)))


def test_fused_measure_range_and_the_torch_branch(tm, rng):
    """The integration point returns what the torch branch of _measure_range returns."""
    shape, start, numel = (9, 30), 37, 150
    current, base = _drifted(numel, rng, torch.float32)
    state = _state(current, base, start, rng)
    fused = kernels.fused_measure_range(state, shape)
    for got, want in zip(fused, _measure_range(state, shape, backend="torch")):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    _assert_equal(state, shape, fused)


def test_fused_available_only_on_cuda():
    assert not kernels.fused_available(torch.device("cpu"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 0, "shape": (3, 3)}, "outside the 3x3 matrix"),
        ({"start": 2, "shape": (4, 5)}, r"packed masks must be \(3, 3\)"),
    ],
)
def test_bad_arguments_name_the_problem(tm, kwargs, message):
    values = torch.zeros(16)
    base = torch.zeros(16, dtype=torch.int16)
    with pytest.raises(ValueError, match=message):
        tm.fused_mask_pass(values, base, torch.zeros(3, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), **kwargs)


def test_many_ranges_in_one_launch(tm, rng, monkeypatch):
    """fused_mask_pass_many: mixed shapes, starts and dtypes; each range's outputs equal the numpy path's."""
    monkeypatch.setattr(tm, "_TARGET_PROGRAMS", 2)  # several row tiles per program as well
    monkeypatch.setattr(tm, "_MAX_ROW_STEPS", 2)
    cases = [((17, 264), 0, 17 * 264), ((12, 24), 3 * 24 + 13, 5 * 24 - 2), ((9, 30), 37, 150), ((1, 40), 3, 30),
             ((40, 16), 16 * 7, 16 * 20), ((6, 8), 0, 48)]  # fmt: skip
    states, shapes = [], []
    for k, (shape, start, numel) in enumerate(cases):
        current, base = _drifted(numel, rng, torch.float32 if k % 2 else torch.bfloat16)
        states.append(_state(current, base, start, rng))
        shapes.append(shape)
    got = tm.fused_mask_pass_many(
        [(s.shard.local(), s.base_bits, s.reference_packed, s.previous_packed, s.start, shape) for s, shape in zip(states, shapes)]
    )
    assert len(got) == len(cases)
    for state, shape, fused in zip(states, shapes, got):
        _assert_equal(state, shape, fused)


def test_fused_measure_ranges_equals_one_by_one(tm, rng):
    shapes = [(9, 32), (5, 13), (7, 16)]
    states = []
    for m, n in shapes:
        current, base = _drifted(m * n - 3, rng, torch.float32)
        states.append(_state(current, base, 3, rng))
    together = kernels.fused_measure_ranges(states, shapes)
    for state, shape, got in zip(states, shapes, together):
        for a, b in zip(got, kernels.fused_measure_range(state, shape)):
            assert torch.equal(a, b)
        _assert_equal(state, shape, got)
