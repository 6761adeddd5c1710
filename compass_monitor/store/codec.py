"""Mask frames and block previews of the run store (schema version 2), in numpy.

A *frame* is one matrix's mask at one snapshot, stored either whole (a *key*
frame) or as the XOR with the previous stored snapshot (a *delta* frame). Its
payload is one of two bit streams (layout in ``docs/store-schema.md``):

* ``packed``: ``np.packbits`` of the flat bit vector (8 bits per byte, most
  significant bit first, zero-padded);
* ``rice``: the sorted positions of the set bits (or of the clear bits, for a
  dense key frame: the *complement* flag), gap-coded with a Rice code of
  parameter k and split into two byte-aligned sections: the *unary* section
  (per gap ``g``: ``g >> k`` one-bits, then a zero-bit) followed by the *low*
  section (per gap its low k bits, most significant first).

For positions of i.i.d. bits with rate p, gaps are geometric and a Rice code
with the best k is within a few tenths of a percent to a few percent of the
binary entropy ``H(p)`` per position (the Golomb family is optimal for
geometric sources); zstd over packed bits, by contrast, stays 1.7-1.9x above it
at 0.1-1% (``bench/bench_store.py``). The writer picks ``rice`` only when it
is smaller than ``packed``, so a frame never exceeds ``ceil(numel / 8)`` bytes.

Everything here is plain numpy on host arrays; nothing imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DELTA",
    "RICE",
    "COMPLEMENT",
    "Frame",
    "encode_frame",
    "decode_frame",
    "apply_frame",
    "check_header",
    "set_positions",
    "rice_encode",
    "rice_decode",
    "rice_bits",
    "positions_to_packed",
    "xor_positions",
    "preview_edges",
    "preview_counts",
    "binary_entropy",
]

#: Encoding flags of a frame (``masks/frames[t, p, 0]``); 0 = key frame, packed bits.
DELTA = 1  # the frame is M_t xor M_prev (else M_t itself)
RICE = 2  # the payload is the Rice code of set positions (else packed bits)
COMPLEMENT = 4  # (key + rice only) the positions listed are those of the clear bits

# Stop searching for a Rice frame once it cannot beat packed bits (fraction of set bits).
_RICE_MAX_DENSITY = 0.45


@dataclass(frozen=True)
class Frame:
    """An encoded frame: flags, bit count listed, Rice parameter, unary section length, payload."""

    encoding: int
    ones: int
    k: int
    split: int
    payload: np.ndarray  # uint8

    def header(self) -> list[int]:
        """The frame's row of ``masks/frames``: [encoding, ones, k, split]."""
        return [self.encoding, self.ones, self.k, self.split]


def binary_entropy(p: float | np.ndarray) -> float | np.ndarray:
    """H(p) in bits, with H(0) = H(1) = 0."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    h = np.where((p <= 0) | (p >= 1), 0.0, h)
    return float(h) if h.ndim == 0 else h


def popcount(packed: np.ndarray) -> int:
    return int(np.bitwise_count(packed).sum(dtype=np.int64))


def _bit_table() -> np.ndarray:
    """(256 * 8,) int64: for byte value v, the positions (0 = most significant) of its set bits, in order."""
    table = np.zeros((256, 8), dtype=np.int64)
    for value in range(256):
        bits = [i for i in range(8) if value & (128 >> i)]
        table[value, : len(bits)] = bits
    return table.ravel()


_BIT_TABLE = _bit_table()


def set_positions(packed: np.ndarray, numel: int, *, complement: bool = False) -> np.ndarray:
    """Sorted flat positions (int64) of the set bits (or clear bits) of a packed vector."""
    data = packed if not complement else np.bitwise_not(packed)
    nonzero = np.flatnonzero(data != 0)
    if nonzero.size == 0:
        return np.zeros(0, dtype=np.int64)
    if nonzero.size * 3 > data.size:  # dense: one pass over the unpacked bits is cheaper
        positions = np.flatnonzero(np.unpackbits(data)).astype(np.int64)
    else:
        values = data[nonzero]
        counts = np.bitwise_count(values).astype(np.intp)
        which = np.repeat(np.arange(nonzero.size), counts)
        rank = np.arange(which.size) - (np.cumsum(counts) - counts)[which]
        positions = nonzero[which].astype(np.int64) * 8 + _BIT_TABLE[values[which].astype(np.intp) * 8 + rank]
    if complement:  # the zero padding of the last byte turned into ones
        positions = positions[positions < numel]
    return positions


def positions_to_packed(positions: np.ndarray, numel: int) -> np.ndarray:
    """Packed bit vector (``np.packbits`` layout) with exactly ``positions`` set (unique)."""
    nbytes = (numel + 7) // 8
    if positions.size == 0:
        return np.zeros(nbytes, dtype=np.uint8)
    if positions.size * 16 < nbytes:
        out = np.zeros(nbytes, dtype=np.uint8)
        np.bitwise_or.at(out, positions >> 3, (128 >> (positions & 7)).astype(np.uint8))
        return out
    bits = np.zeros(nbytes * 8, dtype=bool)
    bits[positions] = True
    return np.packbits(bits)


def xor_positions(packed: np.ndarray, positions: np.ndarray) -> None:
    """Flip the bits at ``positions`` (unique) of ``packed`` in place."""
    if positions.size == 0:
        return
    if positions.size * 16 < packed.size:
        np.bitwise_xor.at(packed, positions >> 3, (128 >> (positions & 7)).astype(np.uint8))
    else:
        np.bitwise_xor(packed, positions_to_packed(positions, packed.size * 8), out=packed)


def rice_bits(gaps: np.ndarray, k: int) -> int:
    """Length in bits of the Rice code of ``gaps`` with parameter k (both sections, unpadded)."""
    return int(gaps.size * (k + 1) + (gaps >> k).sum(dtype=np.int64))


def _best_k(gaps: np.ndarray) -> int:
    mean = float(gaps.mean()) if gaps.size else 0.0
    guess = max(0, int(math.floor(math.log2(max(mean * math.log(2), 1.0)))))
    candidates = [k for k in (guess - 1, guess, guess + 1, guess + 2) if 0 <= k <= 62]
    return min(candidates, key=lambda k: rice_bits(gaps, k))


def rice_encode(positions: np.ndarray, k: int | None = None) -> tuple[np.ndarray, int, int]:
    """Rice-code sorted unique positions. Returns (payload uint8, k, split = unary section bytes)."""
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    if k is None:
        k = _best_k(gaps)
    n = gaps.size
    high = gaps >> k
    unary = np.ones(n + int(high.sum(dtype=np.int64)), dtype=bool)
    unary[np.cumsum(high + 1) - 1] = False
    unary_packed = np.packbits(unary)
    if k:
        low = gaps & ((1 << k) - 1)
        shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
        low_packed = np.packbits(((low[:, None] >> shifts) & 1).astype(np.uint8).ravel())
    else:
        low_packed = np.zeros(0, dtype=np.uint8)
    return np.concatenate([unary_packed, low_packed]), k, int(unary_packed.size)


def rice_decode(payload: np.ndarray, ones: int, k: int, split: int) -> np.ndarray:
    """Inverse of :func:`rice_encode`: the ``ones`` sorted positions (int64)."""
    if ones == 0:
        return np.zeros(0, dtype=np.int64)
    if not (0 < ones and 0 <= k <= 62 and 0 <= split <= payload.size and ones * k <= (payload.size - split) * 8):
        raise ValueError(f"damaged Rice frame header: {ones} positions, k={k}, split={split} for a {payload.size}-byte payload")
    unary = np.unpackbits(payload[:split])
    ends = np.flatnonzero(unary == 0)[:ones]
    if ends.size != ones:
        raise ValueError(f"damaged Rice frame: {ends.size} of {ones} unary terminators found")
    high = np.diff(ends, prepend=-1) - 1
    gaps = high << k
    if k:
        low_bits = np.unpackbits(payload[split:], count=ones * k).reshape(ones, k)
        weights = (1 << np.arange(k - 1, -1, -1, dtype=np.int64))
        gaps |= low_bits.astype(np.int64) @ weights
    return np.cumsum(gaps + 1) - 1


def _expected_rice_bits_per_one(p: float) -> float:
    """Expected Rice bits per listed position for i.i.d. bits of rate p (best k)."""
    best = math.inf
    for k in range(0, 40):
        r = (1.0 - p) ** (2**k)
        best = min(best, k + 1 + r / (1.0 - r))
        if 2**k * p > 4:
            break
    return best


def encode_frame(packed: np.ndarray, numel: int, *, delta: bool) -> Frame:
    """Encode one frame (a mask, or an XOR delta) as the smaller of packed bits and Rice positions."""
    ones = popcount(packed)
    encoding = DELTA if delta else 0
    complement = False
    listed = ones
    if not delta and ones * 2 > numel:
        complement, listed = True, numel - ones
    density = listed / numel if numel else 0.0
    raw_bits = packed.size * 8
    if listed == 0:
        flags = encoding | RICE | (COMPLEMENT if complement else 0)
        return Frame(flags, 0, 0, 0, np.zeros(0, dtype=np.uint8))
    if density <= _RICE_MAX_DENSITY and listed * _expected_rice_bits_per_one(density) < 0.98 * raw_bits:
        positions = set_positions(packed, numel, complement=complement)
        payload, k, split = rice_encode(positions)
        if payload.size < packed.size:
            flags = encoding | RICE | (COMPLEMENT if complement else 0)
            return Frame(flags, int(listed), k, split, payload)
    return Frame(encoding, ones, 0, 0, np.ascontiguousarray(packed, dtype=np.uint8))


def check_header(header: np.ndarray | list[int], numel: int) -> tuple[int, int, int, int]:
    """The four fields of a frame header, checked against the matrix size.

    Raises:
        ValueError: unknown flags, or counts out of range (a damaged store).
    """
    encoding, ones, k, split = (int(x) for x in header[:4])
    if not (0 <= encoding <= DELTA | RICE | COMPLEMENT and 0 <= ones <= numel and 0 <= k <= 62 and 0 <= split <= (numel + 7) // 8):
        raise ValueError(f"damaged frame header {[encoding, ones, k, split]} for a matrix of {numel} weights")
    return encoding, ones, k, split


def decode_frame(header: np.ndarray | list[int], payload: np.ndarray, numel: int) -> np.ndarray:
    """The packed bit vector a frame holds (the mask for a key frame, the XOR delta otherwise).

    Raises:
        ValueError: a damaged header or payload.
    """
    encoding, ones, k, split = check_header(header, numel)
    nbytes = (numel + 7) // 8
    if not encoding & RICE:
        out = np.array(payload[:nbytes], dtype=np.uint8)
        if out.size < nbytes:  # an all-zero payload may be stored as nothing
            out = np.concatenate([out, np.zeros(nbytes - out.size, dtype=np.uint8)])
        if ones and popcount(out) != ones:  # (schema 1 headers are all zero: nothing to check)
            raise ValueError(f"damaged packed frame: {popcount(out)} bits set, its header says {ones}")
        return out
    positions = rice_decode(payload, ones, k, split)
    if positions.size and positions[-1] >= numel:
        raise ValueError(f"damaged Rice frame: position {positions[-1]} beyond {numel} elements")
    out = positions_to_packed(positions, numel)
    if encoding & COMPLEMENT:
        out = np.bitwise_not(out)
        pad = nbytes * 8 - numel
        if pad:
            out[-1] &= np.uint8((0xFF << pad) & 0xFF)
    return out


def apply_frame(previous: np.ndarray | None, header: np.ndarray | list[int], payload: np.ndarray, numel: int) -> np.ndarray:
    """The packed mask after a frame: the frame itself if it is a key, else ``previous xor delta``.

    Raises:
        ValueError: a damaged header or payload, or a delta without a previous mask.
    """
    encoding, ones, k, split = check_header(header, numel)
    if not encoding & DELTA:
        return decode_frame(header, payload, numel)
    if previous is None:
        raise ValueError("a delta frame needs the previous snapshot's mask")
    out = np.array(previous, dtype=np.uint8, copy=True)
    if encoding & RICE:
        xor_positions(out, rice_decode(payload, ones, k, split))
    else:
        np.bitwise_xor(out, decode_frame(header, payload, numel), out=out)
    return out


# -- previews -----------------------------------------------------------------------
def preview_edges(m: int, n: int, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column block edges of a matrix's preview grid.

    ``bh = min(max_blocks, m)`` row blocks with edges ``(i * m) // bh``; when n
    is a multiple of 8 and ``n / 8 >= bw = min(max_blocks, n)``, column edges are
    ``8 * ((j * (n // 8)) // bw)`` (whole bytes of the packed rows), else
    ``(j * n) // bw``. Edges are int64 arrays of length bh + 1 and bw + 1.
    """
    bh, bw = min(max_blocks, m), min(max_blocks, n)
    if bh == 0 or bw == 0:  # an empty matrix (e.g. Linear(0, 8)): no blocks along an empty axis
        return (np.arange(bh + 1, dtype=np.int64) * (m // max(bh, 1)), np.arange(bw + 1, dtype=np.int64) * (n // max(bw, 1)))
    rows = (np.arange(bh + 1, dtype=np.int64) * m) // bh
    if n % 8 == 0 and n // 8 >= bw:
        cols = 8 * ((np.arange(bw + 1, dtype=np.int64) * (n // 8)) // bw)
    else:
        cols = (np.arange(bw + 1, dtype=np.int64) * n) // bw
    return rows, cols


def preview_counts(packed: np.ndarray, shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Set bits per block (bh, bw) int32 of a packed (m, n) mask, for the given edges."""
    m, n = shape
    if m == 0 or n == 0:
        return np.zeros((rows.size - 1, cols.size - 1), dtype=np.int32)
    if n % 8 == 0 and np.all(cols % 8 == 0):
        per_byte = np.bitwise_count(packed[: m * n // 8].reshape(m, n // 8))
        by_col = np.add.reduceat(per_byte, cols[:-1] // 8, axis=1, dtype=np.int32)
    else:
        bits = np.unpackbits(packed, count=m * n).reshape(m, n)
        by_col = np.add.reduceat(bits, cols[:-1], axis=1, dtype=np.int32)
    return np.add.reduceat(by_col, rows[:-1], axis=0, dtype=np.int32)
