"""The fused mask pass in Triton: one read of the current and base codes per matrix range.

Reads the current weights (fp32 masters, rounded to bf16 in the kernel exactly
as ``Tensor.to(torch.bfloat16)`` does, or bf16 codes) and the canonical bf16
base codes once, and writes the packed changed mask (``np.packbits`` order over
the global flat index), the row and column change counts and the count fields
(``schema.COUNT_FIELDS``). The semantics, bit for bit, are those of
``matrix_probe.changed_np`` / ``counts_np`` and of ``matrix_probe.measure_range``
for a flat range ``[start, start + numel)`` of an ``(m, n)`` matrix.

Kernels:

* ``_grid_kernel`` when ``n`` is a multiple of 8 (every byte of the packed mask
  is 8 consecutive columns of one row, whatever ``start`` is: row-sharded
  slices and FSDP1 ranges that start mid-row or mid-byte alike): 2-D tiles, row
  and column sums and counts reduced in registers, one atomic add per row /
  column / count field per program (rows: per row tile).
* ``_grid_group_kernel``: the same programs for many ranges in one launch
  (``fused_mask_pass_many``), each program finding its range in a device table
  of pointers and sizes; the host's cost per launch then stops mattering.
* ``_flat_kernel`` otherwise (odd widths): 1-D tiles of whole bytes; row and
  column sums by atomic adds of the changed elements only.

Every launch writes into buffers allocated here; nothing is read back to the
host. This module imports Triton; :mod:`compass_monitor.kernels` imports it
only when the fused pass is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["fused_mask_pass", "fused_mask_pass_many"]

# Tile shapes (elements). BN is a multiple of 8: whole packed bytes per tile row.
_GRID_BM = 8
_GRID_BN = 256
_FLAT_BYTES = 256
# Aim for at least this many programs per launch (several waves on a large GPU),
# then let each program loop over more row tiles to cut atomics per element.
_TARGET_PROGRAMS = 1024
_MAX_ROW_STEPS = 32


@triton.jit
def _bf16_codes(ptr, offsets, ok, IS_FP32: tl.constexpr):
    """bf16 codes (int32, 0..0xFFFF) of the loaded values; fp32 rounded to nearest even."""
    if IS_FP32:
        u = tl.load(ptr + offsets, mask=ok, other=0).to(tl.uint32, bitcast=True)
        # Round to nearest even on the bit pattern (c10::round_to_nearest_even):
        # add 0x7FFF plus the lowest kept bit, drop the low half. Carries roll
        # into the exponent, so the largest finite values round to Inf as in torch.
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int32)
        # Every NaN becomes the quiet NaN torch's scalar path writes (any NaN is "changed").
        code = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
    else:
        code = tl.load(ptr + offsets, mask=ok, other=0).to(tl.int32) & 0xFFFF
    return code


@triton.jit
def _changed(code, base, ok):
    """Def. 2.2 on codes: canonical current code differs from the base, or the current is NaN."""
    magnitude = code & 0x7FFF
    canonical = tl.where(magnitude == 0, 0, code)
    changed = (canonical != (base.to(tl.int32) & 0xFFFF)) | (magnitude > 0x7F80)
    return (changed & ok).to(tl.int32)


@triton.jit
def _popcount8(x):
    """Set bits of each byte value in an int32 tensor (SWAR, as ``bitpack.popcount``)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@triton.jit
def _tile_counts(byte, ref_ptr, prev_ptr, byte_index, byte_ok, nbytes, nonfinite):
    """This tile's six COUNT_FIELDS as an (8,) int32 vector (popcounts of whole bytes, as ``counts_np``)."""
    ref0 = tl.load(ref_ptr + byte_index, mask=byte_ok, other=0).to(tl.int32)
    ref1 = tl.load(ref_ptr + nbytes + byte_index, mask=byte_ok, other=0).to(tl.int32)
    ref2 = tl.load(ref_ptr + 2 * nbytes + byte_index, mask=byte_ok, other=0).to(tl.int32)
    prev = tl.load(prev_ptr + byte_index, mask=byte_ok, other=0).to(tl.int32)
    changed = tl.sum(tl.ravel(_popcount8(byte)), axis=0)
    principal = tl.sum(tl.ravel(_popcount8(byte & ref0)), axis=0)
    low = tl.sum(tl.ravel(_popcount8(byte & ref1)), axis=0)
    principal_not_low = tl.sum(tl.ravel(_popcount8(byte & ref2)), axis=0)
    flips = tl.sum(tl.ravel(_popcount8(byte ^ prev)), axis=0)
    field = tl.arange(0, 8)
    values = tl.where(field == 0, changed, 0)
    values = tl.where(field == 1, principal, values)
    values = tl.where(field == 2, low, values)
    values = tl.where(field == 3, principal_not_low, values)
    values = tl.where(field == 4, flips, values)
    return tl.where(field == 5, nonfinite, values)


@triton.jit
def _add_counts(counts_ptr, totals):
    field = tl.arange(0, 8)
    tl.atomic_add(counts_ptr + field, totals.to(tl.int64), mask=(field < 6) & (totals != 0))


@triton.jit
def _grid_program(
    cur_ptr, base_ptr, ref_ptr, prev_ptr, packed_ptr, rows_ptr, cols_ptr, counts_ptr,
    numel, n, nrows, lead, nbytes, pid_m, pid_n,
    IS_FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ROW_STEPS: tl.constexpr,
):  # fmt: skip
    # Touched rows form an (nrows, n) grid; local element = row * n + col - lead. With n % 8 == 0
    # every packed byte is 8 consecutive columns of one row, whatever start is.
    col = pid_n * BN + tl.arange(0, BN)
    col_ok = col < n
    byte_col = pid_n * BN + 8 * tl.arange(0, BN // 8)
    shifts = 7 - tl.arange(0, 8)
    col_sum = tl.zeros([BN], dtype=tl.int32)
    totals = tl.zeros([8], dtype=tl.int32)  # at most ROW_STEPS * BM * BN < 2^31 per field
    for step in range(ROW_STEPS):
        row = (pid_m * ROW_STEPS + step) * BM + tl.arange(0, BM)
        row64 = row.to(tl.int64)
        local = row64[:, None] * n + col[None, :] - lead
        ok = (local >= 0) & (local < numel) & col_ok[None, :] & (row[:, None] < nrows)
        code = _bf16_codes(cur_ptr, local, ok, IS_FP32)
        base = tl.load(base_ptr + local, mask=ok, other=0)
        changed = _changed(code, base, ok)
        nonfinite = tl.sum(tl.ravel(((code & 0x7FFF) >= 0x7F80) & ok).to(tl.int32), axis=0)
        byte = tl.sum(tl.reshape(changed, [BM, BN // 8, 8]) << shifts[None, None, :], axis=2)
        # A byte is stored if any of its 8 elements is in the range (the first and last may be
        # shared with another range: their outside bits are zero). Its index counts from the
        # byte holding element ``start``: (first + start % 8) // 8, as start % 8 == lead % 8.
        first = row64[:, None] * n + byte_col[None, :] - lead
        byte_ok = (first + 7 >= 0) & (first < numel) & (byte_col[None, :] < n) & (row[:, None] < nrows)
        byte_index = (first + lead % 8) // 8
        tl.store(packed_ptr + byte_index, byte.to(tl.uint8), mask=byte_ok)
        totals += _tile_counts(byte, ref_ptr, prev_ptr, byte_index, byte_ok, nbytes, nonfinite)
        row_sum = tl.sum(changed, axis=1)
        tl.atomic_add(rows_ptr + row, row_sum, mask=(row < nrows) & (row_sum != 0))
        col_sum += tl.sum(changed, axis=0)
    tl.atomic_add(cols_ptr + col, col_sum, mask=col_ok & (col_sum != 0))
    _add_counts(counts_ptr, totals)


@triton.jit
def _grid_kernel(
    cur_ptr, base_ptr, ref_ptr, prev_ptr, packed_ptr, rows_ptr, cols_ptr, counts_ptr,
    numel, n, nrows, lead, nbytes,
    IS_FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ROW_STEPS: tl.constexpr,
):  # fmt: skip
    _grid_program(
        cur_ptr, base_ptr, ref_ptr, prev_ptr, packed_ptr, rows_ptr, cols_ptr, counts_ptr,
        numel, n, nrows, lead, nbytes, tl.program_id(0), tl.program_id(1), IS_FP32, BM, BN, ROW_STEPS,
    )  # fmt: skip


@triton.jit
def _grid_group_kernel(table_ptr, starts_ptr, G, IS_FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       ROW_STEPS: tl.constexpr, SEARCH_STEPS: tl.constexpr):  # fmt: skip
    """Many ranges in one launch: row g of the table holds range g's pointers and sizes (_TABLE_FIELDS)."""
    pid = tl.program_id(0)
    # The range this program works on: starts[g] <= pid < starts[g + 1] (binary search, fixed steps).
    lo = pid * 0
    hi = lo + G
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(starts_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    entry = table_ptr + lo.to(tl.int64) * 16
    if IS_FP32:
        cur_ptr = tl.load(entry).to(tl.pointer_type(tl.int32))
    else:
        cur_ptr = tl.load(entry).to(tl.pointer_type(tl.int16))
    local = pid - tl.load(starts_ptr + lo)
    tiles_n = tl.load(entry + 13)
    _grid_program(
        cur_ptr,
        tl.load(entry + 1).to(tl.pointer_type(tl.int16)),
        tl.load(entry + 2).to(tl.pointer_type(tl.uint8)),
        tl.load(entry + 3).to(tl.pointer_type(tl.uint8)),
        tl.load(entry + 4).to(tl.pointer_type(tl.uint8)),
        tl.load(entry + 5).to(tl.pointer_type(tl.int32)),
        tl.load(entry + 6).to(tl.pointer_type(tl.int32)),
        tl.load(entry + 7).to(tl.pointer_type(tl.int64)),
        tl.load(entry + 8), tl.load(entry + 9), tl.load(entry + 10), tl.load(entry + 11), tl.load(entry + 12),
        local // tiles_n, local % tiles_n, IS_FP32, BM, BN, ROW_STEPS,
    )  # fmt: skip


@triton.jit
def _flat_kernel(
    cur_ptr, base_ptr, ref_ptr, prev_ptr, packed_ptr, rows_ptr, cols_ptr, counts_ptr,
    start, numel, n, first_row, nbytes,
    IS_FP32: tl.constexpr, BYTES: tl.constexpr,
):  # fmt: skip
    byte_index = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    byte_ok = byte_index < nbytes
    bit = tl.arange(0, 8)
    # Global flat index of each bit of the touched global bytes (the first may hold
    # another range's leading bits, which stay zero: pack_aligned's contract).
    flat = ((start // 8) + byte_index)[:, None] * 8 + bit[None, :]
    local = flat - start
    ok = (local >= 0) & (local < numel)
    code = _bf16_codes(cur_ptr, local, ok, IS_FP32)
    base = tl.load(base_ptr + local, mask=ok, other=0)
    changed = _changed(code, base, ok)
    nonfinite = tl.sum(tl.ravel(((code & 0x7FFF) >= 0x7F80) & ok).to(tl.int32), axis=0)
    byte = tl.sum(changed << (7 - bit)[None, :], axis=1)
    tl.store(packed_ptr + byte_index, byte.to(tl.uint8), mask=byte_ok)
    _add_counts(counts_ptr, _tile_counts(byte, ref_ptr, prev_ptr, byte_index, byte_ok, nbytes, nonfinite))
    hit = changed != 0
    ones = tl.full(changed.shape, 1, tl.int32)
    tl.atomic_add(rows_ptr + (flat // n - first_row), ones, mask=hit)
    tl.atomic_add(cols_ptr + flat % n, ones, mask=hit)


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: called from the host it goes through the JIT machinery (~10 us a call).
    return -(-a // b)


def _codes_operand(values: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The current values as the kernel reads them: fp32 bits (int32) or bf16 codes (int16)."""
    values = values.detach().reshape(-1)
    if values.dtype == torch.float32:
        return values.contiguous().view(torch.int32), True
    if values.dtype == torch.bfloat16:
        return values.contiguous().view(torch.int16), False
    if not values.is_floating_point():
        raise TypeError(f"expected floating-point weights, got {values.dtype}")
    # fp16 / fp64: torch's own rounding (fp64 goes through fp32, as bf16.bf16_bits documents).
    return values.to(torch.bfloat16).view(torch.int16), False


def fused_mask_pass(
    values: torch.Tensor,
    base_bits: torch.Tensor,
    reference_packed: torch.Tensor,
    previous_packed: torch.Tensor,
    *,
    start: int,
    shape: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Changed mask and counts of the flat range ``[start, start + numel)`` of an ``(m, n)`` matrix.

    Args:
        values: current weights of the range, 1-D (numel,), any floating dtype,
            on the base's device (fp32 and bf16 are read in place; others are
            rounded with ``Tensor.to(torch.bfloat16)`` first).
        base_bits: (numel,) int16, canonical bf16 codes of W0 (no -0).
        reference_packed: (3, nbytes) uint8, principal / low / principal-not-low
            packed over the global bytes the range touches (``pack_aligned``).
        previous_packed: (nbytes,) uint8, the previous changed mask, same packing.
        start: global row-major flat index of the range's first element.
        shape: (m, n) of the whole matrix.

    Returns:
        ``(counts, rows, cols, packed)`` on the base's device, not synchronised:
        counts (6,) int64 in ``schema.COUNT_FIELDS`` order; rows (nrows,) int32
        over the touched rows ``start // n .. (start + numel - 1) // n`` (partial
        rows count only the range's elements); cols (n,) int32; packed
        (nbytes,) uint8 with ``nbytes = (start + numel + 7) // 8 - start // 8``,
        the leading ``start % 8`` bits and the trailing pad zero.

    Raises:
        ValueError: inconsistent sizes, dtypes or devices.
    """
    r = _prepare(values, base_bits, reference_packed, previous_packed, start, shape)
    # One zeroed buffer for the three accumulated outputs: one memset per range.
    acc = torch.zeros(12 + r.nrows + r.n, dtype=torch.int32, device=r.device)
    counts, rows, cols = acc[:12].view(torch.int64), acc[12 : 12 + r.nrows], acc[12 + r.nrows :]
    packed = torch.empty(r.nbytes, dtype=torch.uint8, device=r.device)
    operands = (r.current, r.base, r.ref, r.prev, packed, rows, cols, counts)
    if r.n % 8 == 0:
        tiles_m, tiles_n = _cdiv(r.nrows, _GRID_BM), _cdiv(r.n, _GRID_BN)
        steps = _row_steps(tiles_m * tiles_n)
        _grid_kernel[(_cdiv(tiles_m, steps), tiles_n)](
            *operands, r.numel, r.n, r.nrows, r.lead, r.nbytes,
            IS_FP32=r.is_fp32, BM=_GRID_BM, BN=_GRID_BN, ROW_STEPS=steps,
        )  # fmt: skip
    else:
        grid = (_cdiv(r.nbytes, _FLAT_BYTES),)
        _flat_kernel[grid](*operands, r.start, r.numel, r.n, r.first_row, r.nbytes, IS_FP32=r.is_fp32, BYTES=_FLAT_BYTES)
    return counts, rows, cols, packed


def fused_mask_pass_many(
    ranges: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, tuple[int, int]]],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`fused_mask_pass` of many ranges, one launch per device and weight dtype.

    Args:
        ranges: ``(values, base_bits, reference_packed, previous_packed, start, shape)``
            per range, as :func:`fused_mask_pass` takes them.

    Returns:
        Per range, in order, what :func:`fused_mask_pass` returns (views into one
        buffer per launch). Ranges of a width that is not a multiple of 8 are
        launched one by one. The launch reads a table of pointers and sizes that
        is copied to the device without a host sync (pinned memory).

    Raises:
        ValueError: as :func:`fused_mask_pass`.
    """
    prepared = [_prepare(*r) for r in ranges]
    out: list[Any] = [None] * len(prepared)
    groups: dict[tuple[torch.device, bool], list[int]] = {}
    for i, r in enumerate(prepared):
        if r.n % 8:
            out[i] = fused_mask_pass(*ranges[i][:4], start=r.start, shape=ranges[i][5])
        else:
            groups.setdefault((r.device, r.is_fp32), []).append(i)
    for (device, is_fp32), members in groups.items():
        items = [prepared[i] for i in members]
        sizes = [12 + r.nrows + r.n + (r.nrows + r.n) % 2 for r in items]  # even: each count block 8-byte aligned
        acc = torch.zeros(sum(sizes), dtype=torch.int32, device=device)
        packed = torch.empty(sum(r.nbytes for r in items), dtype=torch.uint8, device=device)
        tiles = [(_cdiv(r.nrows, _GRID_BM), _cdiv(r.n, _GRID_BN)) for r in items]
        steps = _row_steps(sum(tm * tn for tm, tn in tiles))
        table: list[int] = []
        starts = [0]
        a_off = p_off = 0
        for i, r, (tiles_m, tiles_n), size in zip(members, items, tiles, sizes):
            block = acc[a_off : a_off + size]
            counts, rows, cols = block[:12].view(torch.int64), block[12 : 12 + r.nrows], block[12 + r.nrows : 12 + r.nrows + r.n]
            mask = packed[p_off : p_off + r.nbytes]
            out[i] = (counts, rows, cols, mask)
            a_off += size
            p_off += r.nbytes
            pointers = (r.current, r.base, r.ref, r.prev, mask, rows, cols, counts)
            table += [t.data_ptr() for t in pointers] + [r.numel, r.n, r.nrows, r.lead, r.nbytes, tiles_n, 0, 0]
            starts.append(starts[-1] + _cdiv(tiles_m, steps) * tiles_n)
        host = torch.tensor(table + starts, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        # The items' tensors stay referenced (out, prepared) until after the launch is queued.
        table_t = host.to(device, non_blocking=True)
        _grid_group_kernel[(starts[-1],)](
            table_t, table_t[len(table) :], len(items),
            IS_FP32=is_fp32, BM=_GRID_BM, BN=_GRID_BN, ROW_STEPS=steps, SEARCH_STEPS=len(items).bit_length(),
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class _Range:
    """A range's operands as the kernels read them, checked."""

    device: torch.device
    current: torch.Tensor  # fp32 bits (int32) or bf16 codes (int16), contiguous
    is_fp32: bool
    base: torch.Tensor
    ref: torch.Tensor
    prev: torch.Tensor
    start: int
    numel: int
    n: int
    first_row: int
    nrows: int
    lead: int  # start - first_row * n
    nbytes: int


def _prepare(values, base_bits, reference_packed, previous_packed, start: int, shape: tuple[int, int]) -> _Range:
    m, n = shape
    numel = base_bits.numel()
    device = base_bits.device
    if values.numel() != numel:
        raise ValueError(f"values has {values.numel()} elements but the base has {numel}")
    if base_bits.dtype != torch.int16:
        raise ValueError(f"base_bits must be int16 bf16 codes, got {base_bits.dtype}")
    if numel == 0 or start < 0 or start + numel > m * n:
        raise ValueError(f"range [{start}, {start + numel}) is empty or outside the {m}x{n} matrix")
    nbytes = (start + numel + 7) // 8 - start // 8
    if tuple(reference_packed.shape) != (3, nbytes) or tuple(previous_packed.shape) != (nbytes,):
        raise ValueError(
            f"packed masks must be (3, {nbytes}) and ({nbytes},) uint8 for range [{start}, {start + numel}), "
            f"got {tuple(reference_packed.shape)} and {tuple(previous_packed.shape)}"
        )
    if values.device != device or reference_packed.device != device or previous_packed.device != device:
        raise ValueError(f"values and masks must be on the base's device {device}")
    current, is_fp32 = _codes_operand(values)
    first_row = start // n
    return _Range(
        device=device, current=current, is_fp32=is_fp32, base=base_bits.reshape(-1).contiguous(),
        ref=reference_packed.contiguous(), prev=previous_packed.contiguous(), start=start, numel=numel, n=n,
        first_row=first_row, nrows=(start + numel - 1) // n - first_row + 1, lead=start - first_row * n, nbytes=nbytes,
    )  # fmt: skip


def _row_steps(tiles: int) -> int:
    """Row tiles per program: more per program (fewer atomics) while the launch keeps _TARGET_PROGRAMS programs."""
    steps = 1
    while steps < _MAX_ROW_STEPS and tiles // (2 * steps) >= _TARGET_PROGRAMS:
        steps *= 2
    return steps
