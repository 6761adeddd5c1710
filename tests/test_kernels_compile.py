"""The fused mask-pass kernels compile for NVIDIA GPUs, checked on a machine without one.

Triton's interpreter (``test_kernels_interpret.py``) checks what the kernels
compute, but it accepts programs the compiler refuses. Here every kernel
variant the launcher can pick is compiled ahead of time, through Triton's
whole pipeline down to a cubin with the ``ptxas`` its wheel ships, for Hopper
(sm_90: H100, H200) and Ampere (sm_80: A100), and the cubin is checked to
hold the kernel with no register spills (``cuobjdump -res-usage``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the fused kernels need triton (in the 'test' extra)")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted in this process, not compiled", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from compass_monitor.kernels import triton_mask as tm  # noqa: E402

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
if not (NVIDIA_BIN / "ptxas").exists():
    pytest.skip("this triton wheel ships no ptxas (not a Linux x86-64/aarch64 build)", allow_module_level=True)

POINTERS = {"base_ptr": "*i16", "ref_ptr": "*u8", "prev_ptr": "*u8", "packed_ptr": "*u8", "rows_ptr": "*i32", "cols_ptr": "*i32", "counts_ptr": "*i64"}


def _variants():
    """(name, kernel, signature, constexprs) of every launch the launcher can make (fp32 bits or bf16 codes)."""
    for is_fp32 in (True, False):
        current = "*i32" if is_fp32 else "*i16"
        yield (
            f"grid-{'fp32' if is_fp32 else 'bf16'}",
            tm._grid_kernel,
            {"cur_ptr": current, **POINTERS, "numel": "i64", "n": "i32", "nrows": "i32", "lead": "i32", "nbytes": "i64",
             "IS_FP32": "constexpr", "BM": "constexpr", "BN": "constexpr", "ROW_STEPS": "constexpr"},
            {"IS_FP32": is_fp32, "BM": tm._GRID_BM, "BN": tm._GRID_BN, "ROW_STEPS": tm._MAX_ROW_STEPS},
        )  # fmt: skip
        yield (
            f"group-{'fp32' if is_fp32 else 'bf16'}",
            tm._grid_group_kernel,
            {"table_ptr": "*i64", "starts_ptr": "*i64", "G": "i32", "IS_FP32": "constexpr", "BM": "constexpr", "BN": "constexpr",
             "ROW_STEPS": "constexpr", "SEARCH_STEPS": "constexpr"},
            {"IS_FP32": is_fp32, "BM": tm._GRID_BM, "BN": tm._GRID_BN, "ROW_STEPS": tm._MAX_ROW_STEPS, "SEARCH_STEPS": 9},
        )  # fmt: skip
        yield (
            f"flat-{'fp32' if is_fp32 else 'bf16'}",
            tm._flat_kernel,
            {"cur_ptr": current, **POINTERS, "start": "i64", "numel": "i64", "n": "i32", "first_row": "i32", "nbytes": "i64",
             "IS_FP32": "constexpr", "BYTES": "constexpr"},
            {"IS_FP32": is_fp32, "BYTES": tm._FLAT_BYTES},
        )  # fmt: skip


# Every variant for Hopper; Ampere on the common one (each compilation takes seconds of CPU).
CASES = [(v, 90) for v in _variants()] + [(v, 80) for v in _variants() if v[0] == "grid-fp32"]


@pytest.mark.parametrize(("variant", "arch"), CASES, ids=[f"{v[0]}-sm{a}" for v, a in CASES])
def test_kernel_compiles_to_a_cubin_without_spills(variant, arch):
    name, kernel, signature, constexprs = variant
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
    cubin = compiled.asm["cubin"]
    assert cubin[:4] == b"\x7fELF"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, timeout=60).stdout
    found = re.search(rf"Function {kernel.__name__}:\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert found, usage
    registers, stack, local = map(int, found.groups())
    assert 0 < registers <= 255 and stack == 0 and local == 0, usage  # no spills to local memory
