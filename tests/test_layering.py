"""The core imports no training framework and no Textual; the optimizer hook is removable."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from compass_monitor import MonitorConfig, open_run
from compass_monitor.integrations.pytorch import watch


def test_core_imports_no_framework():
    code = (
        "import sys, compass_monitor, compass_monitor.store, compass_monitor.summary, compass_monitor.cli;"
        "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'textual', 'verl', 'accelerate') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported {out.stdout.strip()}"


def test_hook_removed_on_close(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2))
    for _ in range(2):
        model(torch.randn(3, 6)).sum().backward()
        optimizer.step()
    monitor.close()
    assert monitor.step == 2
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()  # after close: not counted, nothing written
    assert monitor.step == 2
    assert open_run(tmp_path / "run").steps.tolist() == [1, 2]
