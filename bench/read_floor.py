"""The memory-bandwidth floor of the mask pass: a Triton kernel that reads its inputs once and nothing else.

``read_inputs_once`` loads the current weights (fp32 or bf16, as their bits), the
bf16 base codes, the three packed reference masks and the previous packed mask
of one matrix, exactly once each, and folds them into one int32 per program
(so the loads cannot be dropped). No mask, no counts: the time a pass that must
read these bytes cannot beat. Used by ``bench_mask_pass.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 8192  # elements per program (a multiple of 8: whole mask bytes)


@triton.jit
def _read_kernel(cur_ptr, base_ptr, ref_ptr, prev_ptr, out_ptr, numel, nbytes, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    acc = tl.load(cur_ptr + offsets, mask=ok, other=0).to(tl.int32) ^ tl.load(base_ptr + offsets, mask=ok, other=0).to(tl.int32)
    byte = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    byte_ok = byte < nbytes
    folded = tl.load(prev_ptr + byte, mask=byte_ok, other=0).to(tl.int32)
    for k in range(3):
        folded ^= tl.load(ref_ptr + k * nbytes + byte, mask=byte_ok, other=0).to(tl.int32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0) + tl.sum(folded, axis=0))


def read_inputs_once(values: torch.Tensor, base: torch.Tensor, reference: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Read one matrix's mask-pass inputs once; returns a (programs,) int32 digest (no host sync)."""
    current = values.view(torch.int32) if values.dtype == torch.float32 else values.view(torch.int16)
    numel = current.numel()
    grid = (-(-numel // BLOCK),)  # not triton.cdiv: slow from the host
    out = torch.empty(grid[0], dtype=torch.int32, device=values.device)
    _read_kernel[grid](current, base, reference, previous, out, numel, previous.numel(), BLOCK=BLOCK)
    return out
