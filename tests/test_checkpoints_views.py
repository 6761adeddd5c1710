"""Post hoc == live on the architectures whose stored tensors are not the measured matrices.

GPT-2 stores its linear layers as ``Conv1D`` (in, out) and fuses q, k, v in
``c_attn``; GPT-NeoX interleaves q, k, v per head in ``query_key_value``;
Llama (plain ``nn.Linear``) is the control. Each tiny model is trained for a
few Adam steps under a live ``CompassMonitor`` and saved with
``save_pretrained`` (safetensors) at its base and at every snapshot step; the
post-hoc store of those checkpoints must equal the live store array by array,
in the same order: matrix records (names, roles, module types, shapes, fused
rows, head geometry), W0 codes, fingerprints, precision-null classes,
reference masks, counts, nulls, row and column profiles, changed masks and
spectra.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compass_monitor import CompassMonitor  # noqa: E402
from compass_monitor.checkpoints import diff_checkpoints, resolve_steps  # noqa: E402
from compass_monitor.config import MonitorConfig  # noqa: E402
from compass_monitor.store import open_run  # noqa: E402

STEPS = (2, 4)
CONFIG = dict(every_n_steps=2, principal_rank=4, spectral_every=1, spectral_k=4, include_norms=True, include_biases=True)


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0))


def gpt_neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                                                      vocab_size=96, max_position_embeddings=32, bos_token_id=0, eos_token_id=0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                                  intermediate_size=96, vocab_size=96, max_position_embeddings=32))


FAMILIES = {"gpt2": gpt2, "gpt_neox": gpt_neox, "llama": llama}


def train(build, root: Path) -> Path:
    """Base and checkpoint-2/4 saved with save_pretrained while a live monitor watches the same run (root/live)."""
    torch.manual_seed(0)
    model = build().train()
    model.save_pretrained(root / "base")
    monitor = CompassMonitor(model, root / "live", config=MonitorConfig(**CONFIG))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    for step in range(1, STEPS[-1] + 1):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        monitor.on_optimizer_step()
        if step in STEPS:
            model.save_pretrained(root / f"checkpoint-{step}")
    monitor.close()
    return root


def assert_stores_equal(live_dir: Path, posthoc_dir: Path) -> None:
    live, posthoc = open_run(live_dir), open_run(posthoc_dir)
    assert posthoc.num_snapshots == live.num_snapshots == len(STEPS)
    np.testing.assert_array_equal(posthoc.steps, live.steps)
    assert [p.to_record() for p in posthoc.params] == [p.to_record() for p in live.params]  # same matrices, same order
    for name in ("counts", "null_overlap", "base_fingerprint", "base_class_counts", "spectral_metrics"):
        np.testing.assert_array_equal(getattr(posthoc, name), getattr(live, name), err_msg=name)
    for p in posthoc.params:
        np.testing.assert_array_equal(posthoc.base_codes(p), live.base_codes(p))
        np.testing.assert_array_equal(posthoc.row_counts(p), live.row_counts(p))
        np.testing.assert_array_equal(posthoc.col_counts(p), live.col_counts(p))
        for which in ("principal", "low", "principal_not_low"):
            np.testing.assert_array_equal(posthoc.reference_mask(p, which), live.reference_mask(p, which))
        for t in range(len(STEPS)):
            np.testing.assert_array_equal(posthoc.mask(p, t), live.mask(p, t))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_posthoc_store_equals_the_live_store(tmp_path, family):
    root = train(FAMILIES[family], tmp_path)
    refs = resolve_steps([root / f"checkpoint-{s}" for s in STEPS])
    diff_checkpoints(root / "base", refs, root / "posthoc", config=MonitorConfig(**CONFIG), progress=False, device="cpu")
    assert_stores_equal(root / "live", root / "posthoc")
    run = open_run(root / "posthoc")
    assert run.attrs["selection"]["views"] == "architecture"
    changed = run.counts[-1, :, 0]
    assert (changed[[p.index for p in run.params if p.role == "linear"]] > 0).all()  # a run that did change every matrix
    types = {p.module_type for p in run.params if p.role == "linear"}
    if family == "gpt2":
        q = run.param("transformer.h.0.attn.c_attn.weight[q]")
        assert (q.shape, q.get("layout"), q.get("rows")) == ((64, 64), "in_out", [[0, 64]])
        assert run.param("transformer.h.0.mlp.c_fc.weight").shape == (256, 64)  # stored (64, 256)
        assert types == {"q", "k", "v", "o", "up", "down"}
    if family == "gpt_neox":
        k = run.param("gpt_neox.layers.1.attention.query_key_value.weight[k]")
        assert k.get("rows") == [[16, 32], [64, 80], [112, 128], [160, 176]]  # per head [q_h, k_h, v_h], head_dim 16
        assert types == {"q", "k", "v", "o", "up", "down"}
    if family == "llama":
        assert types == {"q", "k", "v", "o", "gate", "up", "down"}


def test_without_the_architecture_the_file_orientation_is_used_and_said(tmp_path, caplog):
    torch.manual_seed(0)
    model = gpt2()
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(1e-2)
    model.save_pretrained(tmp_path / "checkpoint-1")
    for folder in ("base", "checkpoint-1"):
        config = tmp_path / folder / "config.json"
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "model_type"}))
    with caplog.at_level(logging.WARNING, logger="compass_monitor.checkpoints"):
        diff_checkpoints(tmp_path / "base", resolve_steps([tmp_path / "checkpoint-1"]), tmp_path / "run",
                         config=MonitorConfig(principal_rank=4), progress=False, device="cpu")
    assert "gives no views (config.json gives no model_type)" in caplog.text and "orientation is the file's" in caplog.text
    run = open_run(tmp_path / "run")
    assert run.attrs["selection"]["views"] == "raw tensors"
    fused = run.param("transformer.h.0.attn.c_attn.weight")
    assert (fused.module_type, fused.shape) == ("qkv", (64, 192))  # as stored: (in, out), whole
