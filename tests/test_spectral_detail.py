"""The spectra behind Fig. 4 (Sec. 4.1) in the store: every principal angle and the top-k singular values
of W0 and W_t, per matrix per spectral snapshot, against an independent float64 scipy reference computed
from independently recorded bf16-rounded weights; NaN padding, named columns, resume, non-finite bases."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import scipy.linalg as sl
import torch
import zarr
from torch import nn

from compass_monitor import MonitorConfig, SpectralDetail, open_run
from compass_monitor.integrations.pytorch import watch
from compass_monitor.store import schema

K = 6
ANGLE_ATOL_DEG = 0.01
SV_RTOL = 1e-6


def bf16_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.bfloat16).double().numpy()


def reference(w0: np.ndarray, wt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All k angles (left, right; degrees, descending) and top-k singular values of W0 and Wt, float64 LAPACK."""
    k = min(k, *w0.shape)
    u0, _, v0h = sl.svd(w0, full_matrices=False)
    ut, _, vth = sl.svd(wt, full_matrices=False)
    left = np.sort(np.degrees(sl.subspace_angles(u0[:, :k], ut[:, :k])))[::-1]
    right = np.sort(np.degrees(sl.subspace_angles(v0h[:k].T, vth[:k].T)))[::-1]
    return left, right, sl.svdvals(w0)[:k], sl.svdvals(wt)[:k]


class Net(nn.Module):
    """Rectangular matrices (tall and wide), one with min(m, n) = 3 < K, and one unused (never trained)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 40)  # 40 x 24
        self.b = nn.Linear(40, 17)  # 17 x 40
        self.c = nn.Linear(17, 3)  # 3 x 17: only 3 singular values
        self.unused = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, record: dict[int, dict[str, np.ndarray]], start: int = 1) -> None:
    for step in range(start, start + steps):
        optimizer.zero_grad()
        model(torch.randn(8, 24)).pow(2).mean().backward()
        optimizer.step()
        record[step] = {n: bf16_f64(p) for n, p in model.named_parameters() if n.endswith("weight")}


@pytest.mark.parametrize("method", ["exact", "perturb"])
def test_all_angles_and_singular_values_match_float64_reference(tmp_path, rng, method):
    torch.manual_seed(int(rng.integers(2**31)))
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    base = {n: bf16_f64(p) for n, p in model.named_parameters() if n.endswith("weight")}
    config = MonitorConfig(every_n_steps=1, principal_rank=2, spectral_every=2, spectral_k=K, spectral_method=method)
    monitor = watch(model, optimizer, tmp_path / "run", config=config)
    after: dict[int, dict[str, np.ndarray]] = {}
    train(model, optimizer, 6, after)
    monitor.close()

    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [1, 2, 3, 4, 5, 6]
    angles, sv, sv0 = run.spectral_angles, run.spectral_singular_values, run.spectral_base_singular_values
    assert angles.shape == (6, len(run.params), 2, K) and sv.shape == sv0.shape == (6, len(run.params), K)
    assert angles.dtype == sv.dtype == sv0.dtype == np.float64
    for t in (0, 2, 4):  # not spectral snapshots: all NaN
        assert np.isnan(angles[t]).all() and np.isnan(sv[t]).all() and np.isnan(sv0[t]).all()
    checked = 0
    for t in (1, 3, 5):
        step = int(run.steps[t])
        for p in run.params:
            left, right, s0, st = reference(base[p.name], after[step][p.name], K)
            k = left.size
            where = f"{method} {p.name} step {step}"
            np.testing.assert_allclose(angles[t, p.index, 0, :k], left, atol=ANGLE_ATOL_DEG, rtol=0, err_msg=where)
            np.testing.assert_allclose(angles[t, p.index, 1, :k], right, atol=ANGLE_ATOL_DEG, rtol=0, err_msg=where)
            np.testing.assert_allclose(sv0[t, p.index, :k], s0, rtol=SV_RTOL, atol=0, err_msg=where)
            np.testing.assert_allclose(sv[t, p.index, :k], st, rtol=SV_RTOL, atol=0, err_msg=where)
            assert np.isnan(angles[t, p.index, :, k:]).all() and np.isnan(sv[t, p.index, k:]).all() and np.isnan(sv0[t, p.index, k:]).all()
            # The stored maxima are the largest of the stored angles.
            fields = run.spectral_metrics[t, p.index]
            assert fields[1] == angles[t, p.index, 0, 0] and fields[2] == angles[t, p.index, 1, 0], where
            checked += 1
    assert checked == 3 * 4
    assert (angles[[1, 3, 5]][:, :3, :, 0] > 0).any()  # some trained matrix rotated
    assert np.nanmax(angles[[1, 3, 5], 3]) < 1e-6  # the unused matrix did not move

    detail = run.spectral_detail("c.weight")
    assert isinstance(detail, SpectralDetail) and detail.k == 3
    assert detail.steps.tolist() == [2, 4, 6]
    assert detail.angles_left_deg.shape == detail.angles_right_deg.shape == detail.singular_values.shape == (3, 3)
    np.testing.assert_array_equal(detail.singular_values, sv[[1, 3, 5], 2, :3])
    np.testing.assert_array_equal(detail.base_singular_values, sv0[5, 2, :3])


def test_spectral_arrays_are_named_for_a_plain_zarr_reader(tmp_path, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2, spectral_every=1, spectral_k=K))
    train(model, optimizer, 2, {})
    monitor.close()
    g = zarr.open_group(str(tmp_path / "run"), mode="r")
    T = json.load(open(tmp_path / "run" / "commit.json"))["snapshots"]
    spectral = g["metrics/spectral"]
    assert spectral.attrs["columns"] == ["nss", "max_angle_left_deg", "max_angle_right_deg", "topk_energy_rel_change"]
    assert spectral.attrs["units"] == ["1", "degree", "degree", "1"]
    angles = g["metrics/spectral_angles"]
    assert angles.attrs["sides"] == ["left", "right"] and angles.attrs["unit"] == "degree" and angles.attrs["k"] == K
    assert angles.attrs["axes"] == ["snapshot", "param", "side", "index"]
    for name in ("metrics/spectral_sv", "metrics/spectral_sv_base"):
        assert g[name].attrs["k"] == K and g[name].attrs["order"] == "descending"
    run = open_run(tmp_path / "run")
    np.testing.assert_array_equal(np.asarray(angles[:T]), run.spectral_angles)
    np.testing.assert_array_equal(np.asarray(g["metrics/spectral_sv"][:T]), run.spectral_singular_values)
    np.testing.assert_array_equal(np.asarray(g["metrics/spectral_sv_base"][:T]), run.spectral_base_singular_values)


def test_spectral_off_stores_no_detail_arrays(tmp_path):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2))
    train(model, optimizer, 1, {})
    monitor.close()
    run = open_run(tmp_path / "run")
    assert run.spectral_angles is None and run.spectral_singular_values is None and run.spectral_base_singular_values is None
    assert run.spectral_detail(0) is None
    assert not any((tmp_path / "run" / name).exists() for name in schema.SPECTRAL_DETAIL)


def _crash(monitor) -> None:
    monitor.flush()
    monitor._detach()  # a crash: the monitor is never closed


def test_resume_trims_and_grows_the_detail_arrays(tmp_path, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    config = MonitorConfig(every_n_steps=1, principal_rank=2, spectral_every=1, spectral_k=K)
    first = watch(model, optimizer, tmp_path / "run", config=config)
    after: dict[int, dict[str, np.ndarray]] = {}
    base = {n: bf16_f64(p) for n, p in model.named_parameters() if n.endswith("weight")}
    train(model, optimizer, 3, after)
    _crash(first)
    kept = open_run(tmp_path / "run").spectral_singular_values[:2].copy()
    # Training restarts from its step-2 checkpoint: the weights of step 2 come back.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("weight"):
                p.copy_(torch.from_numpy(after[2][n]).to(p.dtype))
    second = watch(model, optimizer, tmp_path / "run", config=config, resume=True, resume_step=2)
    train(model, optimizer, 2, after, start=3)
    second.close()
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [1, 2, 3, 4]
    for name in schema.SPECTRAL_DETAIL:
        assert zarr.open_array(str(tmp_path / "run" / name), mode="r").shape[0] == 4, name  # trimmed at finalize
    np.testing.assert_array_equal(run.spectral_singular_values[:2], kept)
    for t, step in ((2, 3), (3, 4)):  # the snapshots after the resume, against the weights trained after it
        for p in run.params:
            left, right, s0, st = reference(base[p.name], after[step][p.name], K)
            k = left.size
            np.testing.assert_allclose(run.spectral_singular_values[t, p.index, :k], st, rtol=SV_RTOL, atol=0)
            np.testing.assert_allclose(run.spectral_base_singular_values[t, p.index, :k], s0, rtol=SV_RTOL, atol=0)
            np.testing.assert_allclose(run.spectral_angles[t, p.index, 0, :k], left, atol=ANGLE_ATOL_DEG, rtol=0)


def test_a_store_without_the_detail_arrays_resumes_and_reads(tmp_path, rng):
    """Stores written before these arrays existed: resumed with spectral on, they keep their layout."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    config = MonitorConfig(every_n_steps=1, principal_rank=2, spectral_every=1, spectral_k=K)
    first = watch(model, optimizer, tmp_path / "run", config=config)
    train(model, optimizer, 2, {})
    _crash(first)
    for name in schema.SPECTRAL_DETAIL:
        shutil.rmtree(tmp_path / "run" / name)
    old = open_run(tmp_path / "run")
    assert old.spectral_angles is None and old.spectral_detail(0) is None and old.has_spectral
    second = watch(model, optimizer, tmp_path / "run", config=config, resume=True, resume_step=2)
    train(model, optimizer, 2, {}, start=3)
    second.close()
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [1, 2, 3, 4] and run.spectral_angles is None
    assert np.isfinite(run.spectral_metrics[:, :3]).all()  # the scalar diagnostics go on


def test_non_finite_base_gives_nan_spectra_and_the_monitor_goes_on(tmp_path, rng, caplog):
    """An Inf in W0 (spectral on): that matrix's spectral diagnostics are NaN in every array, with a warning;
    the other matrices get theirs and the mask snapshots go on."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = Net()
    with torch.no_grad():
        model.unused.weight[1, 2] = float("inf")  # never used in forward: training stays finite
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    config = MonitorConfig(every_n_steps=1, principal_rank=2, spectral_every=1, spectral_k=K)
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        monitor = watch(model, optimizer, tmp_path / "run", config=config)
        train(model, optimizer, 3, {})
        monitor.close()
    assert "spectral diagnostics of unused.weight failed" in caplog.text
    run = open_run(tmp_path / "run")
    assert run.status == "finished" and run.steps.tolist() == [1, 2, 3]
    bad = run.param("unused.weight").index
    for values in (run.spectral_metrics, run.spectral_angles, run.spectral_singular_values, run.spectral_base_singular_values):
        assert np.isnan(values[:, bad]).all()
        others = np.delete(values, bad, axis=1)
        assert np.isfinite(others[..., 0]).all()  # every other matrix has its spectra at every snapshot
    assert run.spectral_detail("unused.weight") is None
    assert run.count("changed")[:, run.param("a.weight").index].min() > 0  # masks measured throughout


def test_the_schema_docs_spectral_recipe_runs(tmp_path, rng):
    """docs/store-schema.md's plain-zarr reading of the spectral arrays, run as written on a fresh store."""
    from pathlib import Path

    torch.manual_seed(int(rng.integers(2**31)))
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2, spectral_every=2, spectral_k=K))
    train(model, optimizer, 4, {})
    monitor.close()
    doc = (Path(__file__).parents[1] / "docs" / "store-schema.md").read_text(encoding="utf-8")
    section = doc.split("### Spectral diagnostics", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0].replace("runs/demo", str(tmp_path / "run"))
    scope: dict = {}
    exec(compile(code, "store-schema.md", "exec"), scope)
    run = open_run(tmp_path / "run")
    detail = run.spectral_detail(0)
    assert scope["steps"].tolist() == detail.steps.tolist() == [2, 4]
    np.testing.assert_array_equal(scope["left"][:, : detail.k], detail.angles_left_deg)
    np.testing.assert_array_equal(scope["sigma_t"][:, : detail.k], detail.singular_values)
    np.testing.assert_array_equal(scope["sigma_0"][: detail.k], detail.base_singular_values)
