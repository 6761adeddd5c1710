"""Spectral diagnostics of the default method on weight updates recorded from a real MiniLM fine-tune.

Three AdamW steps on the shipped all-MiniLM-L6-v2 (fp32 masters, as the demo
trains it), W0 and W_t of a few matrices rounded to bf16 as the monitor stores
them, then the default ``"auto"`` against the float64 scipy reference: NSS within
1% wherever NSS >= 1e-6, every principal angle within 0.01 degrees, top-k energy
change within 1% (issue 12: the default may not misreport). ``"perturb"`` is
measured beside it and reported, since it is no default any more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compass_monitor.spectral import SpectralConfig, spectral_base, spectral_drift
from compass_monitor.spectral_reference import spectral_drift_reference

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.slow]  # trains MiniLM for 3 steps

MATRICES = ("encoder.layer.2.attention.self.key.weight", "encoder.layer.2.output.dense.weight", "encoder.layer.0.attention.self.query.weight")
SENTENCES = ["It was not good at all.", "The film was wonderful.", "A dull and tiring evening.", "I loved every minute."]
TARGETS = torch.tensor([0.0, 1.0, 0.0, 1.0])


@pytest.fixture(scope="module")
def recorded() -> list[tuple[str, int, torch.Tensor, torch.Tensor]]:
    from compass_monitor.demo.policy import encode, load_pretrained

    torch.manual_seed(0)
    model, tokenizer = load_pretrained()
    params = dict(model.named_parameters())
    base = {name: params[name].detach().to(torch.bfloat16).clone() for name in MATRICES}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    anchor = encode(model, tokenizer, ["It was good."]).detach()
    out = []
    for step in range(1, 4):
        optimizer.zero_grad()
        similarity = (encode(model, tokenizer, SENTENCES) @ anchor.T).squeeze(1)
        torch.nn.functional.mse_loss(similarity, TARGETS).backward()
        optimizer.step()
        if step in (1, 3):
            out += [(name, step, base[name], params[name].detach().to(torch.bfloat16).clone()) for name in MATRICES]
    return out


def test_default_method_matches_float64_reference_on_recorded_updates(recorded):
    config = SpectralConfig(k=16)
    checked = 0
    perturb_errors = []
    for name, step, w0, wt in recorded:
        base = spectral_base(w0, config)
        assert base.method == "exact"
        got = spectral_drift(base, wt)
        ref = spectral_drift_reference(w0.double().numpy(), wt.double().numpy(), config.k)
        where = f"{name} step {step}"
        assert ref["nss"] > 0, where  # the update moved the spectrum
        if ref["nss"] >= 1e-6:
            assert abs(float(got.nss) / ref["nss"] - 1) <= 0.01, (where, float(got.nss), ref["nss"])
            checked += 1
        np.testing.assert_allclose(np.sort(got.angles_left_deg.numpy())[::-1], ref["angles_left_deg"], atol=0.01, err_msg=where)
        np.testing.assert_allclose(np.sort(got.angles_right_deg.numpy())[::-1], ref["angles_right_deg"], atol=0.01, err_msg=where)
        assert abs(float(got.topk_energy_rel_change) - ref["topk_energy_rel_change"]) <= 0.01 * abs(ref["topk_energy_rel_change"]) + 1e-12, where
        perturbed = spectral_drift(spectral_base(w0, SpectralConfig(k=16, method="perturb")), wt)
        perturb_errors.append((where, float(perturbed.nss) / ref["nss"] - 1, float(perturbed.nss_nonperturbative_fraction)))
    assert checked >= 3
    print("perturb NSS relative errors (not a default):", perturb_errors)


@pytest.mark.parametrize("method", ["exact", "perturb"])
def test_stored_spectra_match_float64_reference_on_recorded_updates(recorded, method):
    """What the store keeps for Fig. 4 (``SpectralDrift.singular_values``, ``SpectralBase.sigma0[:k]``, all k
    angles) on real MiniLM weights: singular values within 1e-6 relative of ``scipy.linalg.svdvals``, every
    angle within 0.01 degrees of ``scipy.linalg.subspace_angles``, with either method."""
    import scipy.linalg as sl

    config = SpectralConfig(k=16, method=method)
    for name, step, w0, wt in recorded:
        a0, at = w0.double().numpy(), wt.double().numpy()
        base = spectral_base(w0, config)
        got = spectral_drift(base, wt)
        where = f"{method} {name} step {step}"
        np.testing.assert_allclose(base.sigma0[: base.k].numpy(), sl.svdvals(a0)[:16], rtol=1e-6, atol=0, err_msg=where)
        np.testing.assert_allclose(got.singular_values.numpy(), sl.svdvals(at)[:16], rtol=1e-6, atol=0, err_msg=where)
        u0, _, v0h = sl.svd(a0, full_matrices=False)
        ut, _, vth = sl.svd(at, full_matrices=False)
        left = np.sort(np.degrees(sl.subspace_angles(u0[:, :16], ut[:, :16])))[::-1]
        right = np.sort(np.degrees(sl.subspace_angles(v0h[:16].T, vth[:16].T)))[::-1]
        np.testing.assert_allclose(got.angles_left_deg.numpy(), left, atol=0.01, rtol=0, err_msg=where)
        np.testing.assert_allclose(got.angles_right_deg.numpy(), right, atol=0.01, rtol=0, err_msg=where)


def test_monitor_stores_fig4_spectra_of_minilm_matching_float64_reference(tmp_path):
    """End to end on the shipped MiniLM: a monitor (spectral every snapshot, k=16) over the same AdamW
    steps, its stored angles and singular values against scipy on the bf16 weights recorded beside it."""
    import re

    import scipy.linalg as sl

    from compass_monitor import MonitorConfig, open_run
    from compass_monitor.demo.policy import encode, load_pretrained
    from compass_monitor.integrations.pytorch import watch

    torch.manual_seed(1)
    model, tokenizer = load_pretrained()
    params = dict(model.named_parameters())
    pattern = "|".join(re.escape(n) for n in MATRICES)
    base = {name: params[name].detach().to(torch.bfloat16).double().numpy() for name in MATRICES}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    config = MonitorConfig(every_n_steps=1, principal_rank=4, spectral_every=1, spectral_k=16, name_pattern=f"^({pattern})$")
    monitor = watch(model, optimizer, tmp_path / "run", config=config)
    anchor = encode(model, tokenizer, ["It was good."]).detach()
    after = {}
    for step in range(1, 3):
        optimizer.zero_grad()
        similarity = (encode(model, tokenizer, SENTENCES) @ anchor.T).squeeze(1)
        torch.nn.functional.mse_loss(similarity, TARGETS).backward()
        optimizer.step()
        after[step] = {name: params[name].detach().to(torch.bfloat16).double().numpy() for name in MATRICES}
    monitor.close()
    run = open_run(tmp_path / "run")
    assert sorted(p.name for p in run.params) == sorted(MATRICES) and run.steps.tolist() == [1, 2]
    for t, step in enumerate((1, 2)):
        for p in run.params:
            a0, at = base[p.name], after[step][p.name]
            u0, _, v0h = sl.svd(a0, full_matrices=False)
            ut, _, vth = sl.svd(at, full_matrices=False)
            left = np.sort(np.degrees(sl.subspace_angles(u0[:, :16], ut[:, :16])))[::-1]
            right = np.sort(np.degrees(sl.subspace_angles(v0h[:16].T, vth[:16].T)))[::-1]
            where = f"{p.name} step {step}"
            assert left.max() > 0, where  # the update rotated the subspace
            np.testing.assert_allclose(run.spectral_angles[t, p.index, 0], left, atol=0.01, rtol=0, err_msg=where)
            np.testing.assert_allclose(run.spectral_angles[t, p.index, 1], right, atol=0.01, rtol=0, err_msg=where)
            np.testing.assert_allclose(run.spectral_singular_values[t, p.index], sl.svdvals(at)[:16], rtol=1e-6, atol=0, err_msg=where)
            np.testing.assert_allclose(run.spectral_base_singular_values[t, p.index], sl.svdvals(a0)[:16], rtol=1e-6, atol=0, err_msg=where)
