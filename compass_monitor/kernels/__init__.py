"""Fused accelerator kernels for the monitor's hot path (the per-snapshot mask pass).

:func:`fused_measure_range` is a drop-in for the torch branch of the probe's
range measurement (``matrix_probe.measure_range``): same inputs, same outputs,
bit for bit, in one Triton kernel launch plus one memset per range instead of
a dozen elementwise passes. :func:`fused_available` says whether it applies to
a device: CUDA (or ROCm, which torch also calls ``cuda``) with Triton
importable. Triton is imported only when the fused pass is used, so the core
keeps working without it; CPU CI runs the same kernels in Triton's interpreter
(``TRITON_INTERPRET=1``, ``tests/test_kernels_interpret.py``).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

__all__ = ["fused_available", "fused_mask_pass", "fused_mask_pass_many", "fused_measure_range", "fused_measure_ranges"]


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_available(device: torch.device) -> bool:
    """True when the fused mask pass can run on ``device``: a CUDA device and Triton installed."""
    return device.type == "cuda" and torch.cuda.is_available() and _triton_importable()


def __getattr__(name: str) -> Any:
    # ``fused_mask_pass`` and ``fused_mask_pass_many`` (documented in ``triton_mask``) import triton on first use.
    if name in ("fused_mask_pass", "fused_mask_pass_many"):
        from . import triton_mask

        return getattr(triton_mask, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fused_measure_range(state: Any, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch branch of ``matrix_probe.measure_range`` as one fused pass.

    Args:
        state: a ``ShardState`` (``shard.local()`` gives the current 1-D values of
            the range; ``start``, ``base_bits``, ``reference_packed``,
            ``previous_packed`` as documented there).
        shape: (m, n) of the whole matrix.

    Returns:
        counts (6,) int64, partial rows (touched rows) int32, columns (n,) int32 and the
        aligned packed mask, on the base's device (the caller copies them to the host once).
    """
    values = state.shard.local()
    base = state.base_bits
    if values.device != base.device:
        values = values.to(base.device)
    from .triton_mask import fused_mask_pass  # imports triton

    return fused_mask_pass(values, base, state.reference_packed, state.previous_packed, start=state.start, shape=shape)


def fused_measure_ranges(states: list[Any], shapes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`fused_measure_range` of many ranges in one launch per weight dtype (``fused_mask_pass_many``).

    For a probe that measures all its on-device ranges together: one kernel launch
    for the whole snapshot instead of one per matrix, where the host's per-launch
    cost would otherwise exceed the device time of small matrices.
    """
    from .triton_mask import fused_mask_pass_many  # imports triton

    ranges = []
    for state, shape in zip(states, shapes, strict=True):
        values = state.shard.local()
        if values.device != state.base_bits.device:
            values = values.to(state.base_bits.device)
        ranges.append((values, state.base_bits, state.reference_packed, state.previous_packed, state.start, shape))
    return fused_mask_pass_many(ranges)
