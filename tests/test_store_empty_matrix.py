"""An empty matrix (``Linear(0, 8)``, ``Linear(6, 0)``) is stored, verified and summarised like any
other: no NaN in the baselines, no division by zero in the previews."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from compass_monitor import MonitorConfig, open_run
from compass_monitor.aggregates import group_stats
from compass_monitor.integrations.pytorch import watch
from compass_monitor.store.integrity import verify_run
from compass_monitor.summary import summary_text


def test_empty_matrices_give_finite_baselines(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 0), nn.Linear(0, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2))
    for _ in range(3):
        optimizer.zero_grad()
        model[0](torch.randn(2, 8)).pow(2).mean().backward()
        optimizer.step()
    monitor.close()
    run = open_run(tmp_path / "run")
    assert [p.shape for p in run.params] == [(6, 8), (0, 6), (8, 0)]
    assert verify_run(run) == []
    with np.errstate(all="raise"):
        text = summary_text(run)
    stats = next(iter(group_stats(run, lambda p: "all").values()))
    # Independent baseline: only the non-empty matrix has weights; its density of each reference mask.
    sizes = run.base_class_counts[0, 1:, :].sum(axis=1) / 48.0
    changed = run.count("changed")[:, 0]
    for j, mask in enumerate(("principal", "low", "principal_not_low")):
        expected = np.where(changed > 0, sizes[j], np.nan)
        np.testing.assert_allclose(stats.random_baseline[mask], expected)
        assert np.isfinite(stats.random_baseline[mask][changed > 0]).all()
    assert " nan" not in text.lower()
