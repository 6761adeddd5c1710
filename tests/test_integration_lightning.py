"""CompassCallback on a real Lightning Trainer (CPU): steps, logged scalars, resume, sharding refusal."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from compass_monitor import MonitorConfig, open_run  # noqa: E402
from compass_monitor.aggregates import by_module_type, everything_linear, group_stats, scalars  # noqa: E402
from compass_monitor.integrations.lightning import CompassCallback  # noqa: E402
CONFIG = MonitorConfig(every_n_steps=2, principal_rank=4)
DISTRIBUTED_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


class TinyBlock(L.LightningModule):
    """q/up/down projections, so the scalars have module-type groups."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.q_proj = nn.Linear(12, 12)
        self.up_proj = nn.Linear(12, 24)
        self.down_proj = nn.Linear(24, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(self.q_proj(x))))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self(x) - x.flip(-1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TwoOptimizers(TinyBlock):
    """Manual optimization with two optimizers that both step on every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        return [
            torch.optim.AdamW(self.q_proj.parameters(), lr=self.lr),
            torch.optim.AdamW([*self.up_proj.parameters(), *self.down_proj.parameters()], lr=self.lr),
        ]


def _loader(n: int = 48) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 12, generator=generator)), batch_size=4, shuffle=False)


def _trainer(tmp_path: Path, callback: CompassCallback, *more: L.Callback, **kwargs) -> "L.Trainer":
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path / "logs", name="", version=kwargs.pop("version", 0)),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback, *more],
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _logged(csv_path: Path) -> dict[int, dict[str, float]]:
    """Compass scalars per step from CSVLogger's metrics.csv."""
    rows: dict[int, dict[str, float]] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if k.startswith("compass/") and v != ""}
            if values:
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def _assert_logged_equal_store(logged: dict[int, dict[str, float]], run_dir: Path) -> None:
    run = open_run(run_dir)
    stats = {**group_stats(run, everything_linear), **group_stats(run, by_module_type)}
    assert sorted(logged) == run.steps.tolist()
    for index, step in enumerate(run.steps.tolist()):
        expected = scalars(stats, index=index)
        assert set(logged[step]) == set(expected)
        for key, value in expected.items():
            # equal up to float64 summation order (live: one snapshot, group_stats: all at once)
            assert logged[step][key] == pytest.approx(value, rel=1e-12, nan_ok=True), key


def test_fit_with_gradient_accumulation(tmp_path):
    torch.manual_seed(0)
    callback = CompassCallback(tmp_path / "run", config=CONFIG)
    trainer = _trainer(tmp_path, callback, max_steps=6, accumulate_grad_batches=3)
    trainer.fit(TinyBlock(), _loader())
    assert trainer.global_step == 6
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [2, 4, 6]  # optimizer steps, not the 18 micro-batches
    assert run.status == "finished"
    assert {p.module_type for p in run.params} == {"q", "up", "down"}
    assert run.count("changed")[-1].sum() > 0
    _assert_logged_equal_store(_logged(tmp_path / "logs" / "version_0" / "metrics.csv"), tmp_path / "run")


def test_several_optimizers_count_one_step_per_batch(tmp_path):
    torch.manual_seed(1)
    callback = CompassCallback(tmp_path / "run", config=CONFIG, log_scalars=False)
    trainer = _trainer(tmp_path, callback, max_steps=10, logger=False)
    trainer.fit(TwoOptimizers(), _loader())
    assert trainer.global_step == 10  # Lightning counts both optimizers' steps
    assert open_run(tmp_path / "run").steps.tolist() == [2, 4, 5]  # five batches stepped; 5 is the closing snapshot


class FullyShardedBlock(TinyBlock):
    """FSDP2 through Lightning's ModelParallelStrategy: ``fully_shard`` in ``configure_model``."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        for layer in (self.q_proj, self.up_proj, self.down_proj):
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])


def test_model_parallel_strategy_fsdp2(tmp_path):
    """ModelParallelStrategy (FSDP2, DTensor parameters) on a one-rank CPU gloo group: monitored on every rank."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    callback = CompassCallback(tmp_path / "run", config=CONFIG)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = _trainer(tmp_path, callback, max_steps=4, accumulate_grad_batches=2, strategy=strategy)
    environment = dict(os.environ)  # the strategy sets MASTER_ADDR, RANK, WORLD_SIZE, ... for this process
    try:
        model = FullyShardedBlock()
        trainer.fit(model, _loader())
        assert any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [2, 4]
    assert run.status == "finished"
    _assert_logged_equal_store(_logged(tmp_path / "logs" / "version_0" / "metrics.csv"), tmp_path / "run")


class CrashAt(L.Callback):
    """Stops the fit with an error after optimizer step ``step`` (a crash after the last checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _changed_since(model: nn.Module, initial: dict[str, torch.Tensor], run) -> dict[str, np.ndarray]:
    """The changed mask of every monitored matrix, computed directly: bf16(W) != bf16(W0)."""
    weights = dict(model.named_parameters())
    return {
        p.name: (weights[p.name].detach().to(torch.bfloat16) != initial[p.name].to(torch.bfloat16)).numpy()
        for p in run.params
    }


def test_resume_from_checkpoint_continues_the_run(tmp_path):
    """Crash at step 6 after a checkpoint at step 4; the resumed fit continues the same store against W0."""
    common = dict(max_steps=8, accumulate_grad_batches=2)  # 32 samples: 4 optimizer steps per epoch
    torch.manual_seed(3)
    model = TinyBlock()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    crashing = _trainer(
        tmp_path, CompassCallback(tmp_path / "run", config=CONFIG), checkpoints, CrashAt(6), enable_checkpointing=True, **common
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(model, _loader(32))
    crashed = open_run(tmp_path / "run")
    assert crashed.steps.tolist() == [2, 4, 6]
    assert crashed.status == "running"
    before = crashed.counts[:2].copy()
    masks_at_4 = {p.name: crashed.mask(p.name, 1) for p in crashed.params}

    resumed_model = TinyBlock()
    resumed = _trainer(tmp_path, CompassCallback(tmp_path / "run", config=CONFIG), version=1, **common)
    resumed.fit(resumed_model, _loader(32), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert resumed.global_step == 8

    run = open_run(tmp_path / "run")
    assert run.status == "finished"
    assert run.steps.tolist() == [2, 4, 6, 8]
    np.testing.assert_array_equal(run.counts[:2], before)  # snapshots up to the checkpoint are kept
    assert all(np.array_equal(run.mask(name, 1), mask) for name, mask in masks_at_4.items())
    # The last snapshot measures the resumed model against the original W0 (reloaded from the store),
    # not against the checkpoint's weights.
    direct = _changed_since(resumed_model, initial, run)
    for p in run.params:
        np.testing.assert_array_equal(run.mask(p.name, -1), direct[p.name], err_msg=p.name)
    assert run.count("changed")[-1].sum() > run.count("changed")[1].sum() / 2
    logged = _logged(tmp_path / "logs" / "version_1" / "metrics.csv")
    assert sorted(logged) == [6, 8]  # the resumed fit logs the steps it ran
    stats = {**group_stats(run, everything_linear), **group_stats(run, by_module_type)}
    for index, step in ((2, 6), (3, 8)):
        for key, value in scalars(stats, index=index).items():
            assert logged[step][key] == pytest.approx(value, rel=1e-12, nan_ok=True), key


def test_model_parallel_strategy_two_ranks(tmp_path):
    """Two CPU ranks under ModelParallelStrategy (FSDP2 Shard(0)): a monitor on each rank, one store from rank 0,
    whose masks are those of the whole matrices."""
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "_lightning_fsdp2_two_ranks.py")
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    out = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["monitor_step"] for r in ranks] == [6, 6]  # every rank counted the same optimizer steps
    assert ranks[0]["local_shapes"]["up_proj.weight"] == [12, 12]  # each rank held half of the 24 rows
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [2, 4, 6]
    assert run.status == "finished"
    assert [p.shape for p in run.params] == [(12, 12), (24, 12), (12, 24)]  # the global shapes
    _assert_logged_equal_store(_logged(tmp_path / "logs" / "version_0" / "metrics.csv"), tmp_path / "run")


def test_fit_twice_continues_the_same_store(tmp_path, caplog):
    """A second ``fit()`` with the same callback (a new Trainer, then the finished one again) never raises into
    training; it continues the store at the real optimizer step (4: the weights took 4 steps from W0)."""
    torch.manual_seed(0)
    model = TinyBlock()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    callback = CompassCallback(tmp_path / "run", config=CONFIG)
    _trainer(tmp_path, callback, max_steps=4).fit(model, _loader())
    second = _trainer(tmp_path, callback, max_steps=4, version=1)
    second.fit(model, _loader())
    assert callback.monitor.step == 8
    second.fit(model, _loader())  # max_steps already reached: no step, no error
    assert "not monitored" not in caplog.text
    run = open_run(tmp_path / "run")
    assert run.status == "finished"
    assert run.steps.tolist() == [2, 4, 6, 8]
    direct = _changed_since(model, initial, run)  # measured against the first fit's W0
    for p in run.params:
        np.testing.assert_array_equal(run.mask(p.name, -1), direct[p.name], err_msg=p.name)
    assert sorted(_logged(tmp_path / "logs" / "version_1" / "metrics.csv")) == [6, 8]
