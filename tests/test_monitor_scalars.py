"""What the monitor tells loggers and users beyond the store: fractions, spectral scalars, a close with nothing to store."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.integrations.pytorch import watch


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 24)).pow(2).mean().backward()
        optimizer.step()


def test_flips_and_spectral_scalars_are_fractions_and_means_of_the_store(tmp_path, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 17))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=2, principal_rank=4, spectral_every=1, spectral_k=6))
    _train(model, optimizer, 6)
    scalars = monitor.latest_scalars()
    monitor.close()
    run = open_run(tmp_path / "run")
    numel = sum(p.numel for p in run.params)
    flips = run.count("flips_since_previous")[-1].sum()
    assert 0 < flips < numel
    assert scalars["compass/all_linear/flips"] == flips / numel  # a fraction, like every other scalar
    spectral = run.spectral_metrics[-1]  # (P, F) of the last snapshot (step 6)
    assert np.isfinite(spectral).all()
    assert scalars["compass/all_linear/nss"] == np.mean(spectral[:, 0])
    assert scalars["compass/all_linear/max_angle_left_deg"] == np.max(spectral[:, 1])


def test_close_without_a_step_says_why_and_snapshot_records_loaded_weights(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Linear(24, 40)
    monitor = CompassMonitor(model, tmp_path / "empty", config=MonitorConfig(principal_rank=4))
    with torch.no_grad():
        model.weight.mul_(1.5)  # weights loaded or edited outside any optimizer
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        monitor.close()
    assert "0 snapshots" in caplog.text and "monitor.snapshot(step=N)" in caplog.text
    assert open_run(tmp_path / "empty").num_snapshots == 0

    torch.manual_seed(0)
    model = nn.Linear(24, 40)
    monitor = CompassMonitor(model, tmp_path / "loaded", config=MonitorConfig(principal_rank=4))
    with torch.no_grad():
        model.weight.mul_(1.5)
    monitor.snapshot(step=7)
    monitor.close()
    run = open_run(tmp_path / "loaded")
    assert run.steps.tolist() == [7]
    # x1.5 changes every nonzero bf16 value
    assert int(run.count("changed")[0, 0]) == int((model.weight != 0).sum())
