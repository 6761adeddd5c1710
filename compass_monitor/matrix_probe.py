"""Per-range work on the device: a matrix's base codes once, its changed mask per snapshot.

Every monitored matrix is measured on the flat range of it that a rank holds
(:class:`ShardState`: ``[start, start + numel)`` of its global row-major
indices; a whole matrix in a single process is the range ``[0, m n)``). The
measurement is the monitor's hot path. On an accelerator it runs a few
elementwise passes and reductions that stay on the device; nothing moves data
to the host or synchronises (the probe copies all results of a snapshot to the
host once). On the CPU the same computation runs in numpy on zero-copy views:
torch's CPU kernels for int16/uint8 bit operations are one to two orders of
magnitude slower than numpy's (``bench/bench_snapshot_cpu.py``). Both paths are
tested against the same float64 reference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .bf16 import ABS_MASK, INF_BITS, bf16_bits, canonical_bits, changed_from_bits
from .bitpack import popcount
from .kernels import fused_available, fused_measure_range
from .shard_geometry import pack_aligned
from .sharding import LocalShard, ShardingError
from .state_spill import OffloadedArrays

log = logging.getLogger(__name__)

__all__ = [
    "ShardState",
    "resident",
    "measure_range",
    "changed_np",
    "counts_np",
    "counts_torch",
    "fingerprint_partial",
    "base_fingerprint",
]

# Modulus and multipliers of the base fingerprint (Park-Miller constants).
_FP_MOD = 2**31 - 1
_FP_MULTIPLIERS = (48271, 16807)
_FP_CHUNK = 1 << 22


@dataclass
class ShardState:
    """What a rank keeps per matrix: 2 bytes per local weight plus 4 bits of packed masks.

    All masks are packed over the global bytes the range touches (``pack_aligned``).

    Attributes:
        shard: the rank's part of the matrix (``values()`` reads the current weights).
        start, numel: the contributed range (numel 0 on a non-contributing replica).
        base_bits: (numel,) int16 canonical bf16 codes of W0, on the base device.
        reference_packed: (3, nbytes) uint8: principal, low, principal-not-low.
        previous_packed: (nbytes,) uint8: the last stored snapshot's changed mask.
        offload: where the three arrays are kept instead (``state_spill``: W0 reread from
            the base checkpoint, masks in a spill file), or None when they are held here.
            An offloaded state holds empty tensors except inside :func:`resident`.
    """

    shard: LocalShard
    start: int
    numel: int
    base_bits: torch.Tensor
    reference_packed: torch.Tensor
    previous_packed: torch.Tensor
    #: whether the fused accelerator kernel may measure this range (False after it failed once)
    fused: bool = True
    offload: OffloadedArrays | None = None


_EMPTY_CODES = torch.zeros(0, dtype=torch.int16)
_EMPTY_MASK = torch.zeros(0, dtype=torch.uint8)


@contextmanager
def resident(state: ShardState) -> Iterator[ShardState]:
    """``state`` with its W0 codes and masks in memory for the block; an offloaded state drops them after it.

    Raises:
        ShardingError: the reread base no longer has the range's size (the base file changed).
    """
    off = state.offload
    if off is None:
        yield state
        return
    state.base_bits = base_codes(state)
    state.reference_packed = torch.from_numpy(off.reference()).to(off.device)
    state.previous_packed = torch.from_numpy(off.previous()).to(off.device)
    try:
        yield state
    finally:
        state.base_bits, state.reference_packed, state.previous_packed = _EMPTY_CODES, _EMPTY_MASK.view(0, 0), _EMPTY_MASK


def base_codes(state: ShardState) -> torch.Tensor:
    """W0's (numel,) int16 canonical bf16 codes of ``state``: held, or reread for an offloaded state.

    Touches nothing of ``state``: the store writer's thread reads codes while the
    training thread may be inside :func:`resident` on the same state.

    Raises:
        ShardingError: the reread base no longer has the range's size (the base file changed).
    """
    off = state.offload
    if off is None:
        return state.base_bits
    bits = canonical_bits(bf16_bits(off.base()).reshape(-1)).to(off.device)
    if bits.numel() != state.numel:
        raise ShardingError(f"the base of {state.shard.spec.name!r} now has {bits.numel()} weights, had {state.numel} when it was captured")
    return bits


def fingerprint_partial(bits: torch.Tensor, start: int) -> torch.Tensor:
    """``base_fingerprint`` terms of a flat range starting at global index ``start``, (2,) int64 mod p.

    The fingerprint of a whole matrix is the sum of its ranges' partials mod p.
    """
    flat = bits.reshape(-1)
    result = torch.zeros(len(_FP_MULTIPLIERS), dtype=torch.int64, device=flat.device)
    for offset in range(0, flat.numel(), _FP_CHUNK):
        chunk = flat[offset : offset + _FP_CHUNK].to(torch.int64) & 0xFFFF
        index = torch.arange(start + offset, start + offset + chunk.numel(), device=flat.device, dtype=torch.int64)
        for j, multiplier in enumerate(_FP_MULTIPLIERS):
            weight = (index * multiplier) % _FP_MOD + 1
            result[j] = (result[j] + ((chunk * weight) % _FP_MOD).sum()) % _FP_MOD
    return result


def base_fingerprint(base_bits: torch.Tensor) -> torch.Tensor:
    """Two position-weighted checksums of a whole matrix's canonical base codes, (2,) int64.

    ``sum_i v_i * w(i) mod (2^31 - 1)`` with ``w(i) = (i * a mod p) + 1`` over
    the flat row-major index ``i``: a change in any value or position shows,
    and the sums decompose over any split of the matrix (:func:`fingerprint_partial`
    of the ranges add up mod p). Not cryptographic; it guards against resuming on
    the wrong base.
    """
    return fingerprint_partial(base_bits, 0)


def changed_np(current: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, int]:
    """Changed mask (Def. 2.2) of int16 bf16 codes in numpy, and the number of non-finite current values.

    ``base`` is canonical (never -0): a -0 in ``current`` differs bitwise from a
    +0 base, and the magnitude test calls that pair equal. NaN is always changed.
    """
    changed = (current != base) & (((current | base) & ABS_MASK) != 0)
    nonfinite = int(np.count_nonzero((current & ABS_MASK) >= INF_BITS))
    if nonfinite:  # rare: NaN is always changed, whatever the base held
        changed |= (current & ABS_MASK) > INF_BITS
    return changed, nonfinite


def counts_np(packed: np.ndarray, ref: np.ndarray, previous: np.ndarray, nonfinite: int) -> np.ndarray:
    """The ``COUNT_FIELDS`` of a packed changed mask: |M|, |M ∩ P|, |M ∩ L|, |M ∩ P ∩ L^c|, flips, non-finite."""
    return np.array(
        [
            _popcount_np(packed),
            _popcount_np(packed & ref[0]),
            _popcount_np(packed & ref[1]),
            _popcount_np(packed & ref[2]),
            _popcount_np(packed ^ previous),
            nonfinite,
        ],
        dtype=np.int64,
    )


def counts_torch(packed: torch.Tensor, ref: torch.Tensor, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """:func:`counts_np` on the device (no host sync): the non-finite count from the current codes."""
    return torch.stack(
        [
            popcount(packed),
            popcount(packed & ref[0]),
            popcount(packed & ref[1]),
            popcount(packed & ref[2]),
            popcount(packed ^ previous),
            ((current & ABS_MASK) >= INF_BITS).sum(dtype=torch.int64),
        ]
    )


def _popcount_np(packed: np.ndarray) -> int:
    return int(np.bitwise_count(packed).sum(dtype=np.int64))


def measure_range(state: ShardState, shape: tuple[int, int], *, backend: str = "auto") -> tuple[Any, Any, Any, torch.Tensor]:
    """Counts (6,) int64, partial rows (touched rows) and columns int32, aligned packed mask of one local range.

    numpy on host arrays when the base is in CPU memory (``backend="auto"``); torch
    tensors on the base's device otherwise (the caller copies them to the host in one go).
    """
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    # On CUDA with triton: one fused pass with the torch branch's outputs (compass_monitor.kernels).
    if backend == "auto" and state.fused and fused_available(state.base_bits.device):
        try:
            return fused_measure_range(state, shape)
        except ShardingError:
            raise  # the parameter itself changed: not the kernel's fault
        except Exception as exc:  # a kernel that cannot compile or launch here: the plain torch pass instead
            log.warning("compass-monitor: the fused mask kernel failed on %s (%s: %s); using plain torch ops for it", state.shard.spec.name, type(exc).__name__, exc)
            state.fused = False
    m, n = shape
    start, numel = state.start, state.numel
    values = state.shard.local()
    current_t = bf16_bits(values)
    base_t = state.base_bits
    if current_t.device != base_t.device:
        current_t = current_t.to(base_t.device)
    first, last = start // n, (start + numel - 1) // n
    nrows = last - first + 1
    lead = start - first * n
    if backend == "numpy" or (backend == "auto" and base_t.device.type == "cpu"):
        changed, nonfinite = changed_np(current_t.numpy(), base_t.numpy())
        packed = pack_aligned(changed, start)
        counts = counts_np(packed, state.reference_packed.numpy(), state.previous_packed.numpy(), nonfinite)
        if lead == 0 and numel == nrows * n:
            grid = changed.reshape(nrows, n)
        else:
            grid = np.zeros(nrows * n, dtype=bool)
            grid[lead : lead + numel] = changed
            grid = grid.reshape(nrows, n)
        return counts, grid.sum(axis=1, dtype=np.int32), grid.sum(axis=0, dtype=np.int32), torch.from_numpy(packed)
    changed = changed_from_bits(current_t, base_t)
    packed_t = pack_aligned(changed, start)
    counts_t = counts_torch(packed_t, state.reference_packed, state.previous_packed, current_t)
    if lead == 0 and numel == nrows * n:
        grid = changed.view(nrows, n)
    else:
        grid = torch.zeros(nrows * n, dtype=torch.bool, device=changed.device)
        grid[lead : lead + numel] = changed
        grid = grid.view(nrows, n)
    return counts_t, grid.sum(dim=1, dtype=torch.int32), grid.sum(dim=0, dtype=torch.int32), packed_t
