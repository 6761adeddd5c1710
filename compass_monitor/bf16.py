"""The exact bf16 change probe (paper Def. 2.1 / 2.2, App. D.2).

A weight is *changed* iff its stored bf16 value differs from the base's stored
bf16 value. The paper states the probe as a relative tolerance,

    unchanged(w, w')  <=>  |w' - w| <= eta * max(|w|, |w'|),  eta = 1e-3,

and proves (Prop. D.3, Cor. D.4) that for eta < 2^-9 this is bitwise equality of
the bf16 codes. We implement the bitwise form because it is exact and costs one
integer compare; ``tests/test_bf16_probe.py`` checks it against the tolerance
rule on every bf16 value and its neighbours and on random pairs.

Conventions where the paper is silent (its statement covers finite, nonzero
values):

* ``+0`` equals ``-0`` (the tolerance rule gives ``0 <= 0``).
* Zero vs the smallest subnormal is a change, as is any pair of distinct
  subnormals (the tolerance rule agrees: their relative gap is >= 1/128).
* ``+Inf`` vs ``+Inf`` is *unchanged* (same stored code; the tolerance rule
  would evaluate ``inf - inf = nan`` and call it changed, which says nothing
  about storage).
* A NaN in the current weights is always *changed*, whatever the base held:
  a NaN is never a faithful copy of a weight. The monitor also counts non-finite
  values per matrix and warns.

fp32 (or fp64) master weights are first rounded to bf16 with
``Tensor.to(torch.bfloat16)``, round-to-nearest-even, exactly as mixed-precision
frameworks produce the bf16 copy they store and communicate.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "ABS_MASK",
    "INF_BITS",
    "PAPER_ETA",
    "bf16_bits",
    "canonical_bits",
    "changed_from_bits",
    "paper_rule_changed",
]

#: Tolerance of the paper's probe (Def. 2.1); any eta < 2^-9 is equivalent.
PAPER_ETA = 1e-3
#: bf16 bit pattern with the sign cleared.
ABS_MASK = 0x7FFF
#: bf16 bit pattern of +Inf; ``bits & ABS_MASK`` above it means NaN.
INF_BITS = 0x7F80


def bf16_bits(weight: torch.Tensor) -> torch.Tensor:
    """Return the bf16 codes of ``weight`` as an int16 tensor on its device.

    Floating tensors of other dtypes are rounded to bf16 first with
    ``Tensor.to(torch.bfloat16)``: round-to-nearest-even from float32, which
    is how frameworks round fp32 master weights. (torch rounds float64 input
    through float32, so a float64 value within 2^-30 relative of a bf16 tie
    can round the other way than direct rounding would.)
    """
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {weight.dtype}")
    if weight.dtype != torch.bfloat16:
        weight = weight.detach().to(torch.bfloat16)
    return weight.detach().view(torch.int16)


def canonical_bits(bits: torch.Tensor) -> torch.Tensor:
    """Map ``-0`` (0x8000) to ``+0`` so that bitwise equality is value equality."""
    return torch.where((bits & ABS_MASK) == 0, torch.zeros_like(bits), bits)


def changed_from_bits(current_bits: torch.Tensor, base_canonical: torch.Tensor) -> torch.Tensor:
    """Changed mask ``M = 1[W_t !=_bf16 W_0]`` (Def. 2.2) from int16 codes.

    Args:
        current_bits: bf16 codes of the current weights (any -0 allowed).
        base_canonical: bf16 codes of the base, already passed through
            :func:`canonical_bits`.

    Returns:
        A bool tensor: True where the stored value changed, and wherever the
        current value is NaN.
    """
    magnitude = current_bits & ABS_MASK
    # -0 in the current weights equals +0 in the base: compare canonical codes.
    current = torch.where(magnitude == 0, torch.zeros_like(current_bits), current_bits)
    return (current != base_canonical) | (magnitude > INF_BITS)


def paper_rule_changed(base: np.ndarray, current: np.ndarray, eta: float = PAPER_ETA) -> np.ndarray:
    """The paper's tolerance rule, eq. (1), evaluated in float64 (a reference).

    Returns ``~(|w' - w| <= eta * max(|w|, |w'|))``. For finite bf16 inputs the
    float64 evaluation decides every pair correctly: distinct bf16 values have
    a relative gap above 2^-8 (Lemma D.1), far from eta, so rounding in the
    subtraction cannot flip the comparison. NaN and Inf follow IEEE
    semantics here (see the module docstring for the probe's own convention).
    """
    w = np.asarray(base, dtype=np.float64)
    w_new = np.asarray(current, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        unchanged = np.abs(w_new - w) <= eta * np.maximum(np.abs(w), np.abs(w_new))
    return ~unchanged
