"""Bit packing against numpy's packbits/unpackbits, popcount against a plain count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compass_monitor.bitpack import pack_bits, packed_nbytes, popcount, unpack_bits

SHAPES = [(1, 1), (1, 13), (13, 1), (7, 9), (8, 8), (3, 5, 7), (64, 65), (1, 8), (1, 7), (2, 4), (0, 5), (5, 0), (0,)]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def random_mask(rng: np.random.Generator, shape, density=None) -> np.ndarray:
    density = rng.uniform(0.05, 0.95) if density is None else density
    return rng.random(shape) < density


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [None, 0.0, 1.0])
def test_pack_bits_matches_numpy_packbits(rng, shape, density):
    mask = random_mask(rng, shape, density)
    expected = np.packbits(mask.ravel())
    packed = pack_bits(torch.from_numpy(mask))
    assert packed.dtype == torch.uint8
    assert packed.shape == (packed_nbytes(mask.size),)
    assert packed_nbytes(mask.size) == -(-mask.size // 8)
    assert np.array_equal(packed.numpy(), expected)
    # Reads back with numpy, as the store documents.
    assert np.array_equal(np.unpackbits(packed.numpy(), count=mask.size).astype(bool).reshape(shape), mask)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unpack_bits_inverts_pack_bits(rng, shape):
    mask = random_mask(rng, shape)
    flat = unpack_bits(pack_bits(torch.from_numpy(mask)), mask.size)
    assert flat.dtype == torch.bool
    assert flat.shape == (mask.size,)
    assert np.array_equal(flat.numpy(), mask.ravel())
    # And unpacks numpy-packed bytes too.
    flat_np = unpack_bits(torch.from_numpy(np.packbits(mask.ravel())), mask.size)
    assert np.array_equal(flat_np.numpy(), mask.ravel())


def test_pack_bits_of_non_contiguous_mask_is_row_major(rng):
    base = random_mask(rng, (37, 29))
    t = torch.from_numpy(base).t()  # (29, 37), not contiguous
    assert not t.is_contiguous()
    assert np.array_equal(pack_bits(t).numpy(), np.packbits(base.T.ravel()))
    sliced = torch.from_numpy(base)[::3, 1::2]
    assert np.array_equal(pack_bits(sliced).numpy(), np.packbits(base[::3, 1::2].ravel()))


def test_popcount_matches_numpy_count(rng):
    n = int(rng.integers(1, 5000))
    data = rng.integers(0, 256, size=n, dtype=np.uint8)
    data = np.concatenate([data, np.arange(256, dtype=np.uint8), np.array([0, 255, 0, 255], dtype=np.uint8)])
    rng.shuffle(data)
    expected = int(np.unpackbits(data).sum())
    assert expected == sum(bin(int(b)).count("1") for b in data)  # the reference itself
    got = popcount(torch.from_numpy(data))
    assert got.dtype == torch.int64 and got.dim() == 0
    assert int(got) == expected
    # Byte-wise: each of the 256 byte values alone.
    for value in range(256):
        assert int(popcount(torch.tensor([value], dtype=torch.uint8))) == bin(value).count("1")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_popcount_of_packed_mask_equals_mask_sum(rng, shape):
    mask = random_mask(rng, shape)
    assert int(popcount(pack_bits(torch.from_numpy(mask)))) == int(mask.sum())


def test_popcount_edge_inputs():
    assert int(popcount(torch.zeros(0, dtype=torch.uint8))) == 0
    assert int(popcount(torch.full((1000,), 255, dtype=torch.uint8))) == 8000
    # A 2-D packed array (as reference masks are stored: (3, nbytes)) is counted in full.
    two_d = torch.tensor([[255, 1], [128, 0]], dtype=torch.uint8)
    assert int(popcount(two_d)) == 10


def test_bitwise_ops_on_packed_masks_count_intersections(rng):
    """popcount(pack(a) & pack(b)) is |a & b| and xor is |a ^ b|, with odd sizes (padding stays 0)."""
    for shape in [(1, 13), (7, 9), (31, 17), (64, 65)]:
        a, b = random_mask(rng, shape), random_mask(rng, shape)
        pa, pb = pack_bits(torch.from_numpy(a)), pack_bits(torch.from_numpy(b))
        assert int(popcount(pa & pb)) == int((a & b).sum())
        assert int(popcount(pa ^ pb)) == int((a ^ b).sum())
        # ~pb sets pb's padding bits, but pa's padding is zero, so they do not count.
        assert int(popcount(pa & ~pb)) == int((a & ~b).sum())
