"""Bit packing and population counts on the parameters' device.

Masks are packed row-major, eight elements per byte, most significant bit
first, zero-padded at the end: byte-for-byte the layout of ``np.packbits(
mask.ravel())``, so a stored mask reads back with ``np.unpackbits(buf,
count=m * n).reshape(m, n)``. torch has no packbits, hence this module; on the
host we use numpy's.
"""

from __future__ import annotations

import torch

__all__ = ["packed_nbytes", "pack_bits", "popcount", "unpack_bits"]

def packed_nbytes(numel: int) -> int:
    """Bytes needed to pack ``numel`` booleans."""
    return (numel + 7) // 8


def _bit_weights(device: torch.device) -> torch.Tensor:
    # Built on the device (no host-to-device copy): 128, 64, ..., 1.
    shifts = 7 - torch.arange(8, device=device, dtype=torch.uint8)
    return torch.bitwise_left_shift(torch.ones_like(shifts), shifts)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (flattened row-major) into uint8, ``np.packbits`` order."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8).to(torch.uint8)
    # Each byte is a dot product with the bit weights; sum of distinct powers of
    # two never exceeds 255, so uint8 accumulation is exact.
    return (groups * _bit_weights(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` elements."""
    bits = (packed.reshape(-1, 1) & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:numel]


def popcount(packed: torch.Tensor) -> torch.Tensor:
    """Number of set bits in a uint8 tensor, as a 0-d int64 tensor (no host sync)."""
    x = packed
    # SWAR popcount per byte: pairs, nibbles, byte. uint8 shifts are logical.
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    return x.sum(dtype=torch.int64)
