"""Monitor a plain PyTorch training loop (CPU, a few seconds).

    python examples/plain_pytorch.py runs/example
    compass-monitor summary runs/example
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from compass_monitor import MonitorConfig
from compass_monitor.integrations.pytorch import watch


def main(run_dir: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    monitor = watch(model, optimizer, run_dir, config=MonitorConfig(every_n_steps=5, principal_rank=16))
    target = nn.Linear(64, 64)
    for step in range(50):
        x = torch.randn(32, 64)
        loss = (model(x) - target(x).detach()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/example")
