"""Monitor a Lightning fit with CompassCallback (CPU, a few seconds).

    python examples/lightning_callback.py runs/lightning
    compass-monitor summary runs/lightning

The one line that matters is ``callbacks=[CompassCallback(...)]``. Snapshots
follow real optimizer steps (here: every 5 steps of 4 accumulated batches), and
each snapshot's scalars (compass/all_linear/sparsity, ...) go to the trainer's
loggers, here a CSVLogger (``runs/lightning-logs/version_0/metrics.csv``).
"""

from __future__ import annotations

import sys

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compass_monitor import MonitorConfig
from compass_monitor.integrations.lightning import CompassCallback


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(64, 256)
        self.down_proj = nn.Linear(256, 64)
        self.register_buffer("target", torch.randn(64, 64) / 8)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = (self.down_proj(torch.relu(self.up_proj(x))) - x @ self.target).pow(2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main(run_dir: str) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(2048, 64)), batch_size=32, shuffle=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=30,
        accumulate_grad_batches=4,
        logger=CSVLogger(f"{run_dir}-logs", name=""),
        log_every_n_steps=5,
        enable_progress_bar=False,
        callbacks=[CompassCallback(run_dir, config=MonitorConfig(every_n_steps=5, principal_rank=16))],
    )
    trainer.fit(Regressor(), data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/lightning")
