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
