"""The monitor's spectral diagnostics (Sec. 4.1): stored at their own cadence, equal to a
float64 scipy reference computed from independently recorded weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from torch import nn

from compass_monitor import ConfigError, MonitorConfig, open_run
from compass_monitor.integrations.pytorch import watch


def bf16_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.bfloat16).double().numpy()


def reference(w0: np.ndarray, wt: np.ndarray, k: int) -> tuple[float, float, float, float]:
    s0, st = sl.svdvals(w0), sl.svdvals(wt)
    nss = np.linalg.norm(st - s0) / np.linalg.norm(s0)
    u0, _, v0h = sl.svd(w0)
    ut, _, vth = sl.svd(wt)
    left = np.degrees(sl.subspace_angles(u0[:, :k], ut[:, :k])).max()
    right = np.degrees(sl.subspace_angles(v0h[:k].T, vth[:k].T)).max()
    energy = (st[:k].sum() - s0[:k].sum()) / s0[:k].sum()
    return nss, left, right, energy


def test_spectral_cadence_and_accuracy(tmp_path, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 17))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    base = {n: bf16_f64(p) for n, p in model.named_parameters() if n.endswith("weight")}
    config = MonitorConfig(every_n_steps=2, principal_rank=4, spectral_every=2, spectral_k=6)
    monitor = watch(model, optimizer, tmp_path / "run", config=config)
    after: dict[int, dict[str, np.ndarray]] = {}
    for step in range(1, 9):
        optimizer.zero_grad()
        model(torch.randn(8, 24)).pow(2).mean().backward()
        optimizer.step()
        after[step] = {n: bf16_f64(p) for n, p in model.named_parameters() if n.endswith("weight")}
    monitor.close()
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [2, 4, 6, 8]
    values = run.spectral_metrics
    assert np.isnan(values[[0, 2]]).all()  # every 2nd snapshot only
    for t in (1, 3):
        step = int(run.steps[t])
        for p in run.params:
            nss, left, right, energy = reference(base[p.name], after[step][p.name], 6)
            got = values[t, p.index]
            assert got[0] == pytest.approx(nss, rel=1e-2), (p.name, step)
            assert abs(got[1] - left) < 0.01 and abs(got[2] - right) < 0.01, (p.name, step, got, left, right)
            assert got[3] == pytest.approx(energy, rel=1e-2, abs=1e-9)
    series = run.spectral("0.weight")
    assert series["nss"][0].tolist() == [4, 8]


def test_spectral_cadence_counts_stored_snapshots_across_a_resume(tmp_path, rng):
    """A run that crashes and resumes computes the spectra at the same stored snapshots as one that did not."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 9))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    config = MonitorConfig(every_n_steps=1, principal_rank=2, spectral_every=2, spectral_k=3)
    first = watch(model, optimizer, tmp_path / "run", config=config)
    batches = [torch.randn(8, 12) for _ in range(7)]

    def train(steps):
        for x in steps:
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()

    train(batches[:3])  # snapshots 1, 2, 3; then a crash: the monitor is never closed
    first.flush()
    first._detach()
    second = watch(model, optimizer, tmp_path / "run", config=config, resume=True, resume_step=3)
    train(batches[3:])  # snapshots 4..7
    second.close()
    values = open_run(tmp_path / "run").spectral_metrics
    computed = ~np.isnan(values[:, :, 0]).all(axis=1)
    assert computed.tolist() == [False, True, False, True, False, True, False]


def test_spectral_off_by_default_and_validated(tmp_path):
    model = nn.Linear(5, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2))
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    monitor.close()
    run = open_run(tmp_path / "run")
    assert not run.has_spectral and run.spectral(0) == {}
    with pytest.raises(ConfigError, match="spectral_every must be an integer >= 0"):
        MonitorConfig(spectral_every=-1)
    with pytest.raises(ConfigError, match="spectral_method must be"):
        MonitorConfig(spectral_method="svd")
