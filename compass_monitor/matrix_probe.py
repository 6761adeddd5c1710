"""Per-matrix work on the parameters' device: base capture once, measurement per snapshot.

The measurement is the monitor's hot path. On an accelerator it runs a few
elementwise passes and reductions that stay on the device; nothing moves data
to the host or synchronises (the monitor gathers all results of a snapshot and
copies them to the host once). On the CPU the same computation runs in numpy
on zero-copy views of the tensors: torch's CPU kernels for int16/uint8
bit operations are one to two orders of magnitude slower than numpy's
(``bench/bench_snapshot_cpu.py``). Both paths are tested against the same
float64 reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bf16 import bf16_bits, canonical_bits, changed_from_bits, ABS_MASK, INF_BITS
from .bitpack import pack_bits, popcount
from .precision_null import class_counts
from .principal import principal_mask
from .reference_masks import low_magnitude_mask
from .selection import ParamSpec

__all__ = ["MatrixBase", "Measurement", "capture_base", "measure", "base_fingerprint", "as_matrix", "ShapeChangedError"]

# Modulus and multipliers of the base fingerprint (Park-Miller constants).
_FP_MOD = 2**31 - 1
_FP_MULTIPLIERS = (48271, 16807)
_FP_CHUNK = 1 << 22


class ShapeChangedError(RuntimeError):
    """A monitored parameter no longer has the shape it had when the base was taken."""


@dataclass
class MatrixBase:
    """What the monitor keeps per matrix: 2 bytes per weight plus 4 bits of masks.

    Attributes:
        spec: the parameter.
        base_bits: canonical bf16 codes of W0 (int16), shape (m, n).
        reference_packed: (3, nbytes) uint8: principal, low, principal-not-low.
        previous_packed: the last snapshot's packed changed mask (for flip counts).
    """

    spec: ParamSpec
    base_bits: torch.Tensor
    reference_packed: torch.Tensor
    previous_packed: torch.Tensor


@dataclass(frozen=True)
class Measurement:
    """One snapshot of one matrix, still on the device."""

    counts: torch.Tensor  # (6,) int64, schema.COUNT_FIELDS order
    rows: torch.Tensor  # (m,) int32
    cols: torch.Tensor  # (n,) int32
    packed: torch.Tensor  # (nbytes,) uint8


def as_matrix(weight: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
    """View a parameter as the spec's (m, n) matrix; refuse a changed shape."""
    if weight.numel() != spec.numel or (weight.dim() == 2 and tuple(weight.shape) != spec.shape):
        raise ShapeChangedError(
            f"parameter {spec.name!r} has shape {tuple(weight.shape)} but had {spec.shape} when the base "
            "was taken; a resized parameter cannot be compared with its base. Start a new run store."
        )
    return weight.detach().reshape(spec.shape)


def base_fingerprint(base_bits: torch.Tensor) -> torch.Tensor:
    """Two position-weighted checksums of the canonical base codes, (2,) int64.

    ``sum_i v_i * w(i) mod (2^31 - 1)`` with ``w(i) = (i * a mod p) + 1`` over
    the flat row-major index ``i``: a change in any value or position shows,
    and the sums decompose over any split of the matrix (shards add up mod p).
    Not cryptographic; it guards against resuming on the wrong base.
    """
    flat = base_bits.reshape(-1)
    result = torch.zeros(len(_FP_MULTIPLIERS), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _FP_CHUNK):
        chunk = flat[start : start + _FP_CHUNK].to(torch.int64) & 0xFFFF
        index = torch.arange(start, start + chunk.numel(), device=flat.device, dtype=torch.int64)
        for j, multiplier in enumerate(_FP_MULTIPLIERS):
            weight = (index * multiplier) % _FP_MOD + 1
            result[j] = (result[j] + ((chunk * weight) % _FP_MOD).sum()) % _FP_MOD
    return result


def capture_base(spec: ParamSpec, weight: torch.Tensor, *, rank: int, alpha: float) -> tuple[MatrixBase, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take W0 for one matrix.

    Returns:
        (state, class_counts (4, precision_null.NUM_CLASSES) int64, fingerprint (2,) int64,
        nonfinite count (0-d int64)), all on the weight's device.
    """
    matrix = as_matrix(weight, spec)
    bits = canonical_bits(bf16_bits(matrix).clone())
    w0 = bits.view(torch.bfloat16).float()
    nonfinite = ((bits & ABS_MASK) >= INF_BITS).sum()
    # Non-finite base entries would poison the SVD and the selections: they are
    # treated as 0 for the reference masks (and counted, so the monitor warns).
    w0 = torch.nan_to_num(w0, nan=0.0, posinf=0.0, neginf=0.0)
    principal = principal_mask(w0, rank, alpha)
    low = low_magnitude_mask(w0, alpha)
    principal_not_low = principal & ~low
    reference = torch.stack([pack_bits(principal), pack_bits(low), pack_bits(principal_not_low)])
    counts = class_counts(matrix, [principal, low, principal_not_low])  # from the original W0 (precision null)
    state = MatrixBase(spec=spec, base_bits=bits, reference_packed=reference, previous_packed=torch.zeros_like(reference[0]))
    return state, counts, base_fingerprint(bits), nonfinite


def measure(state: MatrixBase, weight: torch.Tensor, *, backend: str = "auto") -> Measurement:
    """Changed mask and its counts for one matrix (Def. 2.2, Sec. 2.2, Sec. 4.2).

    counts = [|M|, |M ∩ P|, |M ∩ L|, |M ∩ P ∩ L^c|, |M xor M_prev|, #non-finite];
    rows[i] = sum_j M_ij (rho_i = rows[i] / n); cols[j] = sum_i M_ij (kappa_j = cols[j] / m).

    Args:
        backend: ``auto`` (numpy when the base is in CPU memory, torch otherwise), ``numpy`` or ``torch``.
    """
    if backend == "auto":
        backend = "numpy" if state.base_bits.device.type == "cpu" else "torch"
    match backend:
        case "numpy":
            return _measure_numpy(state, weight)
        case "torch":
            return _measure_torch(state, weight)
        case _:
            raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")


def _measure_numpy(state: MatrixBase, weight: torch.Tensor) -> Measurement:
    current = bf16_bits(as_matrix(weight, state.spec)).cpu().numpy()  # a no-op for CPU weights
    changed, nonfinite = changed_np(current, state.base_bits.cpu().numpy())
    packed = np.packbits(changed)
    counts = counts_np(packed, state.reference_packed.cpu().numpy(), state.previous_packed.cpu().numpy(), nonfinite)
    packed_t = torch.from_numpy(packed)
    state.previous_packed = packed_t
    return Measurement(
        counts=torch.from_numpy(counts),
        rows=torch.from_numpy(changed.sum(axis=1, dtype=np.int32)),
        cols=torch.from_numpy(changed.sum(axis=0, dtype=np.int32)),
        packed=packed_t,
    )


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


def _measure_torch(state: MatrixBase, weight: torch.Tensor) -> Measurement:
    current = bf16_bits(as_matrix(weight, state.spec)).to(state.base_bits.device)
    changed = changed_from_bits(current, state.base_bits)
    packed = pack_bits(changed)
    counts = counts_torch(packed, state.reference_packed, state.previous_packed, current)
    state.previous_packed = packed
    return Measurement(
        counts=counts,
        rows=changed.sum(dim=1, dtype=torch.int32),
        cols=changed.sum(dim=0, dtype=torch.int32),
        packed=packed,
    )
