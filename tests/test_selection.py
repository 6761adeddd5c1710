"""Parameter selection and module-type classification on real model definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compass_monitor import MonitorConfig
from compass_monitor.selection import layer_index_of, module_type_of, select_parameters


def test_bert_names_from_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, max_position_embeddings=16
    )
    model = transformers.BertModel(config, add_pooling_layer=False)
    specs = [s for s, _ in select_parameters(model, MonitorConfig())]
    types = [(s.layer, s.module_type, s.shape) for s in specs]
    assert types == [
        (layer, t, shape)
        for layer in (0, 1)
        for t, shape in (("q", (16, 16)), ("k", (16, 16)), ("v", (16, 16)), ("o", (16, 16)), ("up", (24, 16)), ("down", (16, 24)))
    ]
    everything = select_parameters(
        model, MonitorConfig(include_embeddings=True, include_norms=True, include_biases=True)
    )
    roles = {s.role for s, _ in everything}
    assert roles == {"linear", "embedding", "norm", "bias"}
    # every floating parameter of the model is selected exactly once
    assert len(everything) == len(list(model.parameters()))


def test_qwen_style_names_and_tied_head():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.ModuleDict({n: nn.Linear(8, 8, bias=False) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
            self.mlp = nn.ModuleDict({n: nn.Linear(8, 8, bias=False) for n in ("gate_proj", "up_proj", "down_proj")})

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(20, 8)
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.lm_head = nn.Linear(8, 20, bias=False)
            self.lm_head.weight = self.embed_tokens.weight  # tied

    model = LM()
    specs = [s for s, _ in select_parameters(model, MonitorConfig(include_embeddings=True, include_lm_head=True))]
    assert [s.module_type for s in specs if s.layer == 2] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert [s.name for s in specs if s.role != "linear"] == ["embed_tokens.weight"]  # tied head counted once
    untied = LM()
    untied.lm_head.weight = nn.Parameter(torch.randn(20, 8))
    specs = [s for s, _ in select_parameters(untied, MonitorConfig(include_lm_head=True))]
    assert [s.role for s in specs if s.name == "lm_head.weight"] == ["lm_head"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.self_attn.qkv_proj", "qkv"),
        ("transformer.h.0.attn.c_attn", "qkv"),
        ("transformer.h.0.attn.c_proj", "o"),
        ("transformer.h.0.mlp.c_proj", "down"),
        ("model.layers.0.mlp.gate_up_proj", "gate_up"),
        ("encoder.layer.1.attention.output.dense", "o"),
        ("encoder.layer.1.output.dense", "down"),
        ("classifier", "other"),
    ],
)
def test_module_type_patterns(name, expected):
    assert module_type_of(name) == expected


def test_layer_index():
    assert layer_index_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index_of("lm_head.weight") == -1
