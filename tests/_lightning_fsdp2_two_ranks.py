"""Two CPU ranks, Lightning ModelParallelStrategy (FSDP2): CompassCallback on every rank (tests/test_integration_lightning.py).

    python tests/_lightning_fsdp2_two_ranks.py OUT_DIR

Lightning starts the second rank by running this script again. Each rank
writes ``OUT_DIR/rank<r>.json`` with what it saw; rank 0's CSV logger and the
run store are under OUT_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compass_monitor import MonitorConfig
from compass_monitor.integrations.lightning import CompassCallback


class Sharded(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(12, 12)
        self.up_proj = nn.Linear(12, 24)
        self.down_proj = nn.Linear(24, 12)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        for layer in (self.q_proj, self.up_proj, self.down_proj):
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.down_proj(torch.relu(self.up_proj(self.q_proj(x)))) - x.flip(-1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(out: Path) -> None:
    callback = CompassCallback(out / "run", config=MonitorConfig(every_n_steps=2, principal_rank=4))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=6,
        accumulate_grad_batches=2,
        logger=CSVLogger(out / "logs", name="", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    data = DataLoader(TensorDataset(torch.randn(64, 12, generator=torch.Generator().manual_seed(0))), batch_size=4)
    model = Sharded()
    trainer.fit(model, data)
    local = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    seen = {
        "rank": trainer.global_rank,
        "monitor_step": None if callback.monitor is None else callback.monitor.step,
        "local_shapes": local,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
