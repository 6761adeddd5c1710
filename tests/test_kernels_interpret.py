"""The fused Triton mask pass against the numpy path, bit for bit, in Triton's interpreter on the CPU.

Triton picks its interpreter when it is imported, so the cases
(``tests/kernel_interpret_cases.py``) run in a fresh pytest process with
``TRITON_INTERPRET=1``; this module runs that process and fails with its report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the fused kernels need triton (in the 'test' extra)")

CASES = Path(__file__).with_name("kernel_interpret_cases.py")


def test_fused_mask_pass_cases_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(CASES)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=CASES.parent.parent)
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    summary = re.search(r"(\d+) passed", report)
    assert summary and int(summary.group(1)) >= 44, report
    assert "skipped" not in report and "failed" not in report, report
