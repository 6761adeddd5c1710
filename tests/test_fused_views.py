"""Fused and transposed storage give exactly the numbers of the unfused model holding the same weights.

A fused model (GPT-2: transposed Conv1D with c_attn = [q | k | v]; GPT-NeoX:
per-head interleaved query_key_value; Phi-3: qkv_proj and gate_up_proj) and
an unfused model (GPT-J; Llama) are given the same logical weights and the
same updates; every stored per-matrix array (changed masks, counts, row and
column counts, reference masks, precision nulls, spectral diagnostics) must be
identical. The row maps are written here from the modeling code, not taken
from the monitor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compass_monitor import CompassMonitor, MonitorConfig, open_run

T = pytest.importorskip("transformers")


def _neox_rows(slot: int) -> list[int]:
    # GPTNeoXAttention: qkv.view(..., heads, 3 * head_size).chunk(3, -1): head h's q/k/v rows are 12h + 4 slot + [0, 4).
    return [12 * h + 4 * slot + i for h in range(4) for i in range(4)]


def _gptj():
    return T.GPTJForCausalLM(T.GPTJConfig(n_embd=16, n_layer=1, n_head=4, n_inner=64, rotary_dim=4, vocab_size=64))


def _gpt2_pair():
    fused = T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=1, n_head=4, vocab_size=64))
    p, q = "transformer.h.0.attn.", "transformer.h.0.mlp."
    # (fused storage tensor, rows of its (out, in) view, transposed?) -> unfused name
    pairs = {
        p + "c_attn.weight[q]": (p + "c_attn.weight", list(range(0, 16)), True, p + "q_proj.weight"),
        p + "c_attn.weight[k]": (p + "c_attn.weight", list(range(16, 32)), True, p + "k_proj.weight"),
        p + "c_attn.weight[v]": (p + "c_attn.weight", list(range(32, 48)), True, p + "v_proj.weight"),
        p + "c_proj.weight": (p + "c_proj.weight", None, True, p + "out_proj.weight"),
        q + "c_fc.weight": (q + "c_fc.weight", None, True, q + "fc_in.weight"),
        q + "c_proj.weight": (q + "c_proj.weight", None, True, q + "fc_out.weight"),
    }
    return fused, _gptj(), pairs


def _neox_pair():
    fused = T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(hidden_size=16, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=64)
    )
    p, g = "gpt_neox.layers.0.", "transformer.h.0."
    qkv = p + "attention.query_key_value.weight"
    pairs = {
        qkv + "[q]": (qkv, _neox_rows(0), False, g + "attn.q_proj.weight"),
        qkv + "[k]": (qkv, _neox_rows(1), False, g + "attn.k_proj.weight"),
        qkv + "[v]": (qkv, _neox_rows(2), False, g + "attn.v_proj.weight"),
        p + "attention.dense.weight": (p + "attention.dense.weight", None, False, g + "attn.out_proj.weight"),
        p + "mlp.dense_h_to_4h.weight": (p + "mlp.dense_h_to_4h.weight", None, False, g + "mlp.fc_in.weight"),
        p + "mlp.dense_4h_to_h.weight": (p + "mlp.dense_4h_to_h.weight", None, False, g + "mlp.fc_out.weight"),
    }
    return fused, _gptj(), pairs


def _phi3_pair():
    shape = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    fused = T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, **shape))
    unfused = T.LlamaForCausalLM(T.LlamaConfig(**shape))
    p = "model.layers.0."
    qkv, gu = p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"
    # Phi3Attention: q = qkv[..., :16], k = [16:24], v = [24:32]; Phi3MLP: gate, up = gate_up.chunk(2).
    pairs = {
        qkv + "[q]": (qkv, list(range(0, 16)), False, p + "self_attn.q_proj.weight"),
        qkv + "[k]": (qkv, list(range(16, 24)), False, p + "self_attn.k_proj.weight"),
        qkv + "[v]": (qkv, list(range(24, 32)), False, p + "self_attn.v_proj.weight"),
        p + "self_attn.o_proj.weight": (p + "self_attn.o_proj.weight", None, False, p + "self_attn.o_proj.weight"),
        gu + "[gate]": (gu, list(range(0, 24)), False, p + "mlp.gate_proj.weight"),
        gu + "[up]": (gu, list(range(24, 48)), False, p + "mlp.up_proj.weight"),
        p + "mlp.down_proj.weight": (p + "mlp.down_proj.weight", None, False, p + "mlp.down_proj.weight"),
    }
    return fused, unfused, pairs


def _canonical(param: torch.Tensor, rows: list[int] | None, transposed: bool) -> torch.Tensor:
    """The (out, in) view of the logical matrix, writable in place (rows as an index)."""
    view = param.t() if transposed else param
    return view if rows is None else view[rows]


@pytest.mark.parametrize("pair", [_gpt2_pair, _neox_pair, _phi3_pair], ids=["gpt2_conv1d", "neox_interleaved", "phi3_fused"])
def test_fused_and_unfused_store_identical_numbers(pair, tmp_path, rng):
    torch.manual_seed(int(rng.integers(1 << 30)))
    fused, unfused, pairs = pair()
    fp, up = dict(fused.named_parameters()), dict(unfused.named_parameters())
    with torch.no_grad():
        for source, rows, transposed, target in pairs.values():
            up[target].copy_(_canonical(fp[source], rows, transposed))
    config = MonitorConfig(every_n_steps=1, principal_rank=3, writer_queue=0, spectral_every=1, spectral_k=4)
    monitors = [
        CompassMonitor(model, tmp_path / label, config=config, metadata={})
        for model, label in ((fused, "fused"), (unfused, "unfused"))
    ]
    for step in (1, 2):
        with torch.no_grad():
            for source, rows, transposed, target in pairs.values():
                shape = tuple(up[target].shape)
                # Sparse updates at mixed scales: some weights change in bf16, most do not.
                delta = torch.from_numpy(rng.standard_normal(shape) * (rng.random(shape) < 0.3) * 0.05).float()
                up[target] += delta
                view = fp[source].t() if transposed else fp[source]
                if rows is None:
                    view += delta
                else:
                    view[rows] += delta
        for monitor in monitors:
            monitor.snapshot(step)
    for monitor in monitors:
        monitor.close()
    a, b = open_run(tmp_path / "fused"), open_run(tmp_path / "unfused")
    assert sorted(p.name for p in a.params) == sorted(pairs)
    for fused_name, (_, _, _, target) in pairs.items():
        i, j = a.param(fused_name).index, b.param(target).index
        assert a.param(fused_name).shape == b.param(target).shape
        for t in range(2):
            np.testing.assert_array_equal(a.mask(fused_name, t), b.mask(target, t), err_msg=fused_name)
        np.testing.assert_array_equal(a.counts[:, i], b.counts[:, j], err_msg=fused_name)
        np.testing.assert_array_equal(a.null_overlap[:, i], b.null_overlap[:, j], err_msg=fused_name)
        np.testing.assert_array_equal(a.row_counts(fused_name), b.row_counts(target))
        np.testing.assert_array_equal(a.col_counts(fused_name), b.col_counts(target))
        np.testing.assert_array_equal(a.spectral_metrics[:, i], b.spectral_metrics[:, j], err_msg=fused_name)
        for which in ("principal", "low"):
            np.testing.assert_array_equal(a.reference_mask(fused_name, which), b.reference_mask(target, which))
        assert a.param(fused_name).module_type == b.param(target).module_type
    assert a.counts[:, :, 0].sum() > 0  # the updates changed something
