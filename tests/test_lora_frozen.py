"""PEFT LoRA, frozen layers, tied heads, meta parameters and unknown module names.

LoRA: the monitored matrix of an adapted layer is the effective weight
(W + scaling * B @ A); the stored masks must equal masks computed
independently from the weights ``merge_and_unload()`` produces at the same
steps. Frozen matrices are left out and listed in the store; the global
figures are those of the trained matrices alone.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.config import ConfigError
from compass_monitor.integrations.pytorch import watch
from compass_monitor.selection import SelectionError, select_matrices

T = pytest.importorskip("transformers")


def _llama(layers: int = 1, dtype=torch.float32) -> nn.Module:
    config = T.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
    )
    torch.manual_seed(0)
    return T.LlamaForCausalLM(config).to(dtype)


def bf16_changed(base: torch.Tensor, current: torch.Tensor) -> np.ndarray:
    """Paper Def. 2.2 at bf16: bitwise inequality of the bf16 codes, +0 == -0 (NaN-free here)."""

    def codes(t: torch.Tensor) -> np.ndarray:
        c = t.detach().to(torch.bfloat16).view(torch.int16).numpy().copy()
        c[c == np.int16(-32768)] = 0  # -0 -> +0
        return c

    return codes(base) != codes(current)


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 6), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize(("dtype", "rslora"), [(torch.float32, False), (torch.bfloat16, True)])
def test_lora_masks_equal_merge_and_unload(tmp_path, dtype, rslora):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _llama(dtype=dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=rslora)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    merged0 = {k: v.clone() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=2, principal_rank=2, writer_queue=0))
    p = "model.layers.0.self_attn."
    assert [(s.name, s.module_type, s.get("adapter")) for s in monitor.specs] == [
        (p + "q_proj.weight", "q", "lora"),
        (p + "v_proj.weight", "v", "lora"),
    ]
    expected = []
    for _ in range(3):
        _train_steps(model, optimizer, 2, seed=len(expected))
        merged = copy.deepcopy(model).merge_and_unload().state_dict()
        expected.append({name: bf16_changed(merged0[name], merged[name]) for name in (p + "q_proj.weight", p + "v_proj.weight")})
    monitor.close()
    run = open_run(tmp_path / "run")
    assert list(run.steps) == [2, 4, 6]
    for t, masks in enumerate(expected):
        for name, want in masks.items():
            np.testing.assert_array_equal(run.mask(name, t), want, err_msg=f"{name} snapshot {t}")
    assert expected[-1][p + "q_proj.weight"].any()  # the adapters moved the effective weight
    facts = run.attrs["selection"]
    assert {entry["name"] for entry in facts["frozen"]} == {
        p + "k_proj.weight", p + "o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
    }  # fmt: skip
    assert sorted(facts["adapter_factors"]) == sorted(
        f"{p}{m}.lora_{ab}.default.weight" for m in ("q_proj", "v_proj") for ab in "AB"
    )


def test_frozen_blocks_left_out_global_figures_of_trained_matrices(tmp_path):
    model = _llama(layers=4)
    for block in model.model.layers[1:]:
        block.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=2, principal_rank=2, writer_queue=0))
    assert {s.layer for s in monitor.specs} == {0}
    _train_steps(model, optimizer, 2, seed=1)
    scalars = monitor.latest_scalars()
    monitor.close()
    run = open_run(tmp_path / "run")
    frozen = run.attrs["selection"]["frozen"]
    assert len(frozen) == 3 * 7 and all(e["reason"] == "frozen (requires_grad=False)" for e in frozen)
    changed = run.count("changed")[0]
    total = sum(p.numel for p in run.params)
    assert scalars["compass/all_linear/sparsity"] == pytest.approx(1 - changed.sum() / total)
    assert changed.sum() > 0.5 * total  # the trained block's AdamW steps change most weights


def test_parameters_outside_the_optimizer_count_as_frozen(tmp_path):
    model = _llama()
    trained = list(model.model.layers[0].self_attn.parameters())
    selection = select_matrices(model, MonitorConfig(), optimizer=torch.optim.SGD(trained, lr=0.1))
    assert [m.spec.module_type for m in selection.matrices] == ["q", "k", "v", "o"]
    assert {e["reason"] for e in selection.facts["frozen"]} == {"frozen (in no optimizer param group)"}
    everything = select_matrices(model, MonitorConfig(include_frozen=True), optimizer=torch.optim.SGD(trained, lr=0.1))
    assert len(everything.matrices) == 7 and everything.facts["frozen_included"]


def test_everything_frozen_warns_and_monitors_all(caplog):
    model = _llama().requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        selection = select_matrices(model, MonitorConfig())
    assert len(selection.matrices) == 7
    assert "every selected matrix of LlamaForCausalLM is frozen" in caplog.text


def test_tied_head_and_meta_parameters_are_named():
    tied = T.LlamaForCausalLM(
        T.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, vocab_size=64, tie_word_embeddings=True)
    )
    with pytest.raises(SelectionError, match=r"lm_head.weight is tied to the embeddings model.embed_tokens.weight"):
        select_matrices(tied, MonitorConfig(include_lm_head=True))
    both = select_matrices(tied, MonitorConfig(include_lm_head=True, include_embeddings=True))
    assert [m.spec.name for m in both.matrices if m.spec.role != "linear"] == ["model.embed_tokens.weight"]
    with torch.device("meta"):
        lazy = _llama()
    with pytest.raises(SelectionError, match=r"'model.layers.0.self_attn.q_proj.weight' is on the meta device .* once the model's weights"):
        select_matrices(lazy, MonitorConfig())


def test_unknown_names_warn_once_and_user_map_types_them(caplog):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wqkv_custom = nn.Linear(8, 8)
            self.proj_custom = nn.Linear(8, 8)

    model = nn.Sequential(Block(), Block())
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        selection = select_matrices(model, MonitorConfig())
    assert caplog.text.count("typed 'other'") == 1
    assert "0.wqkv_custom.weight, 0.proj_custom.weight, 1.wqkv_custom.weight" in caplog.text
    assert "module_type_map" in caplog.text
    assert selection.facts["unknown_module_types"] == [f"{i}.{n}_custom.weight" for i in (0, 1) for n in ("wqkv", "proj")]
    mapped = select_matrices(model, MonitorConfig(module_type_map={r"wqkv_custom": "q", r"proj_custom\.weight$": "o"}))
    assert [m.spec.module_type for m in mapped.matrices] == ["q", "o", "q", "o"]
    assert mapped.facts["unknown_module_types"] == []
    with pytest.raises(ConfigError, match=r"module_type_map\['x'\] = 'attention' is not a module type"):
        MonitorConfig(module_type_map={"x": "attention"})
    with pytest.raises(ConfigError, match=r"module_type_map key '\(' is not a valid regular expression"):
        MonitorConfig(module_type_map={"(": "q"})


def test_store_records_selection_and_source_layout(tmp_path):
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=1, n_head=4, vocab_size=64))
    CompassMonitor(model, tmp_path / "run", config=MonitorConfig(principal_rank=2)).close()
    run = open_run(tmp_path / "run")
    q = run.param("transformer.h.0.attn.c_attn.weight[q]")
    assert (q.shape, q.get("layout"), q.get("rows"), q.get("heads"), q.get("head_dim")) == ((16, 16), "in_out", [[0, 16]], 4, 4)
    assert run.attrs["selection"]["frozen"] == []


def test_inspect_lists_frozen_matrices(tmp_path):
    from compass_monitor.store.inspect import inspect_text

    model = _llama(layers=2)
    model.model.layers[1].requires_grad_(False)
    CompassMonitor(model, tmp_path / "run", config=MonitorConfig(principal_rank=2)).close()
    text = inspect_text(tmp_path / "run")
    assert "frozen: 7 matrices (not monitored): model.layers.1.self_attn.q_proj.weight: frozen (requires_grad=False)" in text
