"""Every linear matrix of real transformers architectures, measured as what it is.

Each family is built locally as a tiny random model from its config class (no
downloads). For each, the expected (name -> module type, storage layout, rows
of a fused split) of every linear matrix is written below from the family's
modeling code (``transformers/models/<family>/modeling_<family>.py``, cited per
family). Then one output unit of every monitored matrix is perturbed in the
*storage* tensor (at the position the modeling code says that unit lives), one
snapshot is taken, and the stored changed mask must be exactly that row.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.module_types import MODULE_TYPES

T = pytest.importorskip("transformers")

V = dict(vocab_size=64)
A = dict(hidden_size=16, num_attention_heads=4, num_hidden_layers=1)


def llama_like(kv_rows: int, q_rows: int = 16) -> list[tuple]:
    """LlamaAttention/LlamaMLP (also Mistral, Qwen2, Qwen3, Gemma): separate nn.Linear q/k/v/o, gate/up/down."""
    p = "model.layers.0."
    return [
        (p + "self_attn.q_proj.weight", "q", "out_in", None, (q_rows, 16)),
        (p + "self_attn.k_proj.weight", "k", "out_in", None, (kv_rows, 16)),
        (p + "self_attn.v_proj.weight", "v", "out_in", None, (kv_rows, 16)),
        (p + "self_attn.o_proj.weight", "o", "out_in", None, (16, q_rows)),
        (p + "mlp.gate_proj.weight", "gate", "out_in", None, (24, 16)),
        (p + "mlp.up_proj.weight", "up", "out_in", None, (24, 16)),
        (p + "mlp.down_proj.weight", "down", "out_in", None, (16, 24)),
    ]


def _neox_bloom(prefix: str, attn: str, up: int) -> list[tuple]:
    # GPT-NeoX: qkv.view(..., -1, 3 * head_size).chunk(3, dim=-1); Bloom: fused_qkv.view(b, s, heads, 3, head_dim):
    # per head h (4 heads of 4), rows 12h..12h+4 are q, +4..+8 k, +8..+12 v.
    return [
        (f"{prefix}.{attn}.query_key_value.weight[q]", "q", "out_in", [[0, 4], [12, 16], [24, 28], [36, 40]], (16, 16)),
        (f"{prefix}.{attn}.query_key_value.weight[k]", "k", "out_in", [[4, 8], [16, 20], [28, 32], [40, 44]], (16, 16)),
        (f"{prefix}.{attn}.query_key_value.weight[v]", "v", "out_in", [[8, 12], [20, 24], [32, 36], [44, 48]], (16, 16)),
        (f"{prefix}.{attn}.dense.weight", "o", "out_in", None, (16, 16)),
        (f"{prefix}.mlp.dense_h_to_4h.weight", "up", "out_in", None, (up, 16)),
        (f"{prefix}.mlp.dense_4h_to_h.weight", "down", "out_in", None, (16, up)),
    ]


def _falcon_tail() -> list[tuple]:
    p = "transformer.h.0."
    return [
        (p + "self_attention.dense.weight", "o", "out_in", None, (16, 16)),
        (p + "mlp.dense_h_to_4h.weight", "up", "out_in", None, (64, 16)),
        (p + "mlp.dense_4h_to_h.weight", "down", "out_in", None, (16, 64)),
    ]


def _t5_attention(prefix: str, module: str, kinds: tuple[str, ...]) -> list[tuple]:
    return [(f"{prefix}.{module}.{leaf}.weight", kind, "out_in", None, (16, 16)) for leaf, kind in zip("qkvo", kinds)]


P_MOE = "model.layers.0.mlp."
ARCHITECTURES = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=24, num_key_value_heads=2, **A, **V)), llama_like(8)),
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(intermediate_size=24, num_key_value_heads=2, **A, **V)), llama_like(8)),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(intermediate_size=24, num_key_value_heads=2, **A, **V)), llama_like(8)),
    # Qwen3 with head_dim 8 != hidden / heads: q is 4 x 8 rows, k/v 2 x 8.
    "qwen3": (
        lambda: T.Qwen3ForCausalLM(T.Qwen3Config(intermediate_size=24, num_key_value_heads=2, head_dim=8, **A, **V)),
        llama_like(16, q_rows=32),
    ),
    "gemma": (
        lambda: T.GemmaForCausalLM(T.GemmaConfig(intermediate_size=24, num_key_value_heads=1, head_dim=4, **A, **V)),
        llama_like(4),
    ),
    # Qwen2MoeSparseMoeBlock: mlp.gate is a Qwen2MoeTopKRouter (router, not an MLP gate); Qwen2MoeExperts holds
    # gate_up_proj (experts, 2 * moe_inter, hidden) used as linear(x, gate_up_proj[e]).chunk(2): gate rows then up rows,
    # and down_proj (experts, hidden, moe_inter); shared_expert is a Qwen2MoeMLP; shared_expert_gate a Linear(hidden, 1).
    "qwen2_moe": (
        lambda: T.Qwen2MoeForCausalLM(
            T.Qwen2MoeConfig(
                intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=2,
                num_experts_per_tok=1, num_key_value_heads=2, **A, **V,
            )  # fmt: skip
        ),
        llama_like(8)[:4]
        + [
            (P_MOE + "gate.weight", "router", "out_in", None, (2, 16)),
            (P_MOE + "experts.gate_up_proj[0.gate]", "gate", "out_in", [[0, 8]], (8, 16)),
            (P_MOE + "experts.gate_up_proj[0.up]", "up", "out_in", [[8, 16]], (8, 16)),
            (P_MOE + "experts.gate_up_proj[1.gate]", "gate", "out_in", [[0, 8]], (8, 16)),
            (P_MOE + "experts.gate_up_proj[1.up]", "up", "out_in", [[8, 16]], (8, 16)),
            (P_MOE + "experts.down_proj[0]", "down", "out_in", None, (16, 8)),
            (P_MOE + "experts.down_proj[1]", "down", "out_in", None, (16, 8)),
            (P_MOE + "shared_expert.gate_proj.weight", "gate", "out_in", None, (12, 16)),
            (P_MOE + "shared_expert.up_proj.weight", "up", "out_in", None, (12, 16)),
            (P_MOE + "shared_expert.down_proj.weight", "down", "out_in", None, (16, 12)),
            (P_MOE + "shared_expert_gate.weight", "router", "out_in", None, (1, 16)),
        ],
    ),
    # Phi3Attention: qkv[..., :heads*hd] is q, then kv_heads*hd of k, then v; Phi3MLP: gate, up = gate_up.chunk(2).
    "phi3": (
        lambda: T.Phi3ForCausalLM(T.Phi3Config(intermediate_size=24, num_key_value_heads=2, pad_token_id=0, **A, **V)),
        [
            ("model.layers.0.self_attn.o_proj.weight", "o", "out_in", None, (16, 16)),
            ("model.layers.0.self_attn.qkv_proj.weight[q]", "q", "out_in", [[0, 16]], (16, 16)),
            ("model.layers.0.self_attn.qkv_proj.weight[k]", "k", "out_in", [[16, 24]], (8, 16)),
            ("model.layers.0.self_attn.qkv_proj.weight[v]", "v", "out_in", [[24, 32]], (8, 16)),
            ("model.layers.0.mlp.gate_up_proj.weight[gate]", "gate", "out_in", [[0, 24]], (24, 16)),
            ("model.layers.0.mlp.gate_up_proj.weight[up]", "up", "out_in", [[24, 48]], (24, 16)),
            ("model.layers.0.mlp.down_proj.weight", "down", "out_in", None, (16, 24)),
        ],
    ),
    # GPT2Attention: Conv1D weights are (in, out); c_attn(x).split(n_embd, dim=2) gives q, k, v.
    "gpt2": (
        lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=1, n_head=4, **V)),
        [
            ("transformer.h.0.attn.c_attn.weight[q]", "q", "in_out", [[0, 16]], (16, 16)),
            ("transformer.h.0.attn.c_attn.weight[k]", "k", "in_out", [[16, 32]], (16, 16)),
            ("transformer.h.0.attn.c_attn.weight[v]", "v", "in_out", [[32, 48]], (16, 16)),
            ("transformer.h.0.attn.c_proj.weight", "o", "in_out", None, (16, 16)),
            ("transformer.h.0.mlp.c_fc.weight", "up", "in_out", None, (64, 16)),
            ("transformer.h.0.mlp.c_proj.weight", "down", "in_out", None, (16, 64)),
        ],
    ),
    # GPTJAttention (k, v, q, out_proj in definition order) and GPTJMLP fc_in / fc_out.
    "gptj": (
        lambda: T.GPTJForCausalLM(T.GPTJConfig(n_embd=16, n_layer=1, n_head=4, rotary_dim=4, **V)),
        [
            ("transformer.h.0.attn.k_proj.weight", "k", "out_in", None, (16, 16)),
            ("transformer.h.0.attn.v_proj.weight", "v", "out_in", None, (16, 16)),
            ("transformer.h.0.attn.q_proj.weight", "q", "out_in", None, (16, 16)),
            ("transformer.h.0.attn.out_proj.weight", "o", "out_in", None, (16, 16)),
            ("transformer.h.0.mlp.fc_in.weight", "up", "out_in", None, (64, 16)),
            ("transformer.h.0.mlp.fc_out.weight", "down", "out_in", None, (16, 64)),
        ],
    ),
    "gpt_neox": (
        lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(intermediate_size=24, **A, **V)),
        _neox_bloom("gpt_neox.layers.0", "attention", 24),
    ),
    "bloom": (
        lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=16, n_layer=1, n_head=4, **V)),
        _neox_bloom("transformer.h.0", "self_attention", 64),
    ),
    # FalconAttention, multi_query (the default): fused_qkv.split([heads, 1, 1], dim=-2): 4 query heads, one k, one v.
    "falcon": (
        lambda: T.FalconForCausalLM(T.FalconConfig(**A, **V)),
        [
            ("transformer.h.0.self_attention.query_key_value.weight[q]", "q", "out_in", [[0, 16]], (16, 16)),
            ("transformer.h.0.self_attention.query_key_value.weight[k]", "k", "out_in", [[16, 20]], (4, 16)),
            ("transformer.h.0.self_attention.query_key_value.weight[v]", "v", "out_in", [[20, 24]], (4, 16)),
        ]
        + _falcon_tail(),
    ),
    # new_decoder_architecture: view(..., kv_heads, heads/kv + 2, head_dim): per group 2 query heads, its k, its v.
    "falcon_grouped": (
        lambda: T.FalconForCausalLM(T.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **A, **V)),
        [
            ("transformer.h.0.self_attention.query_key_value.weight[q]", "q", "out_in", [[0, 8], [16, 24]], (16, 16)),
            ("transformer.h.0.self_attention.query_key_value.weight[k]", "k", "out_in", [[8, 12], [24, 28]], (8, 16)),
            ("transformer.h.0.self_attention.query_key_value.weight[v]", "v", "out_in", [[12, 16], [28, 32]], (8, 16)),
        ]
        + _falcon_tail(),
    ),
    # OPTAttention k, v, q, out_proj; OPTDecoderLayer fc1 / fc2 (no mlp block).
    "opt": (
        lambda: T.OPTForCausalLM(T.OPTConfig(ffn_dim=24, word_embed_proj_dim=16, **A, **V)),
        [
            ("model.decoder.layers.0.self_attn.k_proj.weight", "k", "out_in", None, (16, 16)),
            ("model.decoder.layers.0.self_attn.v_proj.weight", "v", "out_in", None, (16, 16)),
            ("model.decoder.layers.0.self_attn.q_proj.weight", "q", "out_in", None, (16, 16)),
            ("model.decoder.layers.0.self_attn.out_proj.weight", "o", "out_in", None, (16, 16)),
            ("model.decoder.layers.0.fc1.weight", "up", "out_in", None, (24, 16)),
            ("model.decoder.layers.0.fc2.weight", "down", "out_in", None, (16, 24)),
        ],
    ),
    # T5Block: layer.0 SelfAttention, (decoder) layer.1 EncDecAttention = cross-attention, then DenseReluDense wi / wo.
    "t5": (
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(d_model=16, d_ff=24, d_kv=4, num_layers=1, num_decoder_layers=1, num_heads=4, **V)
        ),
        _t5_attention("encoder.block.0.layer.0", "SelfAttention", ("q", "k", "v", "o"))
        + [
            ("encoder.block.0.layer.1.DenseReluDense.wi.weight", "up", "out_in", None, (24, 16)),
            ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "down", "out_in", None, (16, 24)),
        ]
        + _t5_attention("decoder.block.0.layer.0", "SelfAttention", ("q", "k", "v", "o"))
        + _t5_attention("decoder.block.0.layer.1", "EncDecAttention", ("cross_q", "cross_k", "cross_v", "cross_o"))
        + [
            ("decoder.block.0.layer.2.DenseReluDense.wi.weight", "up", "out_in", None, (24, 16)),
            ("decoder.block.0.layer.2.DenseReluDense.wo.weight", "down", "out_in", None, (16, 24)),
        ],
    ),
    # BertSelfAttention query/key/value, BertSelfOutput dense (o), BertIntermediate dense (up), BertOutput dense (down).
    "bert": (
        lambda: T.BertModel(T.BertConfig(intermediate_size=24, **A, **V), add_pooling_layer=False),
        [
            ("encoder.layer.0.attention.self.query.weight", "q", "out_in", None, (16, 16)),
            ("encoder.layer.0.attention.self.key.weight", "k", "out_in", None, (16, 16)),
            ("encoder.layer.0.attention.self.value.weight", "v", "out_in", None, (16, 16)),
            ("encoder.layer.0.attention.output.dense.weight", "o", "out_in", None, (16, 16)),
            ("encoder.layer.0.intermediate.dense.weight", "up", "out_in", None, (24, 16)),
            ("encoder.layer.0.output.dense.weight", "down", "out_in", None, (16, 24)),
        ],
    ),
}

# Attention-head geometry from each family's config, (heads, head_dim) per attention type (k/v: the kv heads).
MHA = {kind: (4, 4) for kind in ("q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o")}
GQA2 = {"q": (4, 4), "k": (2, 4), "v": (2, 4), "o": (4, 4)}
HEADS = {
    **{family: GQA2 for family in ("llama", "mistral", "qwen2", "qwen2_moe", "phi3", "falcon_grouped")},
    **{family: MHA for family in ("gpt2", "gptj", "gpt_neox", "bloom", "opt", "t5", "bert")},
    "qwen3": {"q": (4, 8), "k": (2, 8), "v": (2, 8), "o": (4, 8)},
    "gemma": {"q": (4, 4), "k": (1, 4), "v": (1, 4), "o": (4, 4)},
    "falcon": {"q": (4, 4), "k": (1, 4), "v": (1, 4), "o": (4, 4)},
}


def _source_name(name: str) -> str:
    return name.split("[", 1)[0]


def _perturb_row(model: torch.nn.Module, name: str, layout: str, rows: list | None, row: int) -> None:
    """Add 1 to every weight of output unit ``row`` of the logical matrix, in its storage tensor."""
    source = _source_name(name)
    param = dict(model.named_parameters())[source]
    expert = None
    if "[" in name:
        label = name.split("[", 1)[1].rstrip("]").split(".")[0]
        expert = int(label) if label.isdigit() else None
    storage_rows = [r for start, stop in rows for r in range(start, stop)] if rows else None
    unit = storage_rows[row] if storage_rows else row
    with torch.no_grad():
        t = param[expert] if expert is not None else param
        if layout == "out_in":
            t[unit, :] += 1.0
        else:  # (in, out): an output unit is a column
            t[:, unit] += 1.0


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_every_linear_matrix_measured_as_what_it_is(family, tmp_path, caplog):
    build, expected = ARCHITECTURES[family]
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        model = build()
    config = MonitorConfig(every_n_steps=1, principal_rank=2, writer_queue=0)
    monitor = CompassMonitor(model, tmp_path / "run", config=config)
    got = [(s.name, s.module_type, s.get("layout"), s.get("rows"), s.shape) for s in monitor.specs]
    assert got == expected
    assert "typed 'other'" not in caplog.text  # every linear matrix of these families has a known type
    heads = {s.name: (s.get("heads"), s.get("head_dim")) for s in monitor.specs}
    assert {name: heads[name] for name, kind, *_ in expected if kind in MHA} == {
        name: HEADS[family][kind] for name, kind, *_ in expected if kind in MHA
    }
    assert all(heads[name] == (None, None) for name, kind, *_ in expected if kind not in MHA)
    # One output unit of every matrix, each at its own row; nothing else changes.
    chosen = {name: (3 * i + 1) % shape[0] for i, (name, _, _, _, shape) in enumerate(expected)}
    for name, _, layout, rows, _ in expected:
        _perturb_row(model, name, layout, rows, chosen[name])
    monitor.snapshot(1)
    monitor.close()
    run = open_run(tmp_path / "run")
    for name, _, layout, rows, shape in expected:
        want = np.zeros(shape, dtype=bool)
        want[chosen[name], :] = True
        np.testing.assert_array_equal(run.mask(name, 0), want, err_msg=name)
        info = run.param(name)
        assert (info.get("source"), info.get("layout"), info.get("rows")) == (_source_name(name), layout, rows)


# -- the README's "Supported models and wrappers" table, generated from what the tests cover --------------------
#: (wrapping or framework, what the monitor sees through, the test that covers it)
WRAPPINGS = (
    ("plain `nn.Module`", "state_dict names as they are", "test_wrappers.py::test_every_wrapping_writes_the_same_names_and_resumes_across_wrappings"),
    ("`torch.compile`", "`_orig_mod.` removed", "test_wrappers.py::test_every_wrapping_writes_the_same_names_and_resumes_across_wrappings"),
    ("activation checkpointing", "`_checkpoint_wrapped_module.` removed", "test_wrappers.py::test_every_wrapping_writes_the_same_names_and_resumes_across_wrappings"),
    ("DDP (gloo, 2 ranks)", "`module.` removed; rank 0 monitors", "test_wrappers.py::test_every_wrapping_writes_the_same_names_and_resumes_across_wrappings"),
    ("FSDP1 + activation checkpointing", "`_fsdp_wrapped_module.` removed; a monitor per rank", "test_wrappers.py::test_every_wrapping_writes_the_same_names_and_resumes_across_wrappings"),
    ("FSDP2 `fully_shard`", "DTensor `Shard(0)`; a monitor per rank", "test_wrappers.py::test_every_wrapping_writes_the_same_names_and_resumes_across_wrappings"),
    ("PEFT LoRA (incl. rsLoRA)", "`base_model.model.`, `.base_layer` removed; the merged weight W + s·B·A", "test_lora_frozen.py::test_lora_masks_equal_merge_and_unload"),
    ("frozen parameters", "left out, listed in the store (`include_frozen=True` keeps them)", "test_lora_frozen.py::test_frozen_blocks_left_out_global_figures_of_trained_matrices"),
    ("Lightning `fit()` twice", "one store, continued at the real optimizer step", "test_integration_lightning.py::test_fit_twice_continues_the_same_store"),
    ("HF `train()` twice", "one store, continued at the real optimizer step", "test_integration_hf.py::test_train_twice_continues_the_same_store"),
    ("HF `restore_callback_states_from_checkpoint=True`", "the rebuilt callback stays first; scalars reach TensorBoard", "test_integration_hf.py::test_restored_callback_states_keep_logging_to_tensorboard"),
)


def support_table() -> str:
    """The Markdown tables of the README section, from :data:`ARCHITECTURES` and :data:`WRAPPINGS`."""
    lines = ["| family | model class | module types | storage | fused projections split |", "|---|---|---|---|---|"]
    for family in sorted(ARCHITECTURES):
        build, expected = ARCHITECTURES[family]
        model_class = type(build()).__name__
        kinds = sorted({kind for _, kind, *_ in expected}, key=MODULE_TYPES.index)
        storage = "(in, out) `Conv1D`, transposed" if any(layout == "in_out" for _, _, layout, *_ in expected) else "(out, in)"
        fused: dict[str, list[str]] = {}
        interleaved: set[str] = set()
        for name, kind, _, rows, _ in expected:
            if rows is not None:
                leaf = name.split("[", 1)[0].removesuffix(".weight").rsplit(".", 1)[-1]
                fused.setdefault(leaf, [])
                if kind not in fused[leaf]:
                    fused[leaf].append(kind)
                if len(rows) > 1:
                    interleaved.add(leaf)
        split = "; ".join(f"`{leaf}` → {', '.join(parts)}{' (interleaved)' if leaf in interleaved else ''}" for leaf, parts in fused.items())
        lines.append(f"| {family} | `{model_class}` | {', '.join(kinds)} | {storage} | {split or '–'} |")
    lines += ["", "| wrapping | seen through | test |", "|---|---|---|"]
    lines += [f"| {what} | {how} | `tests/{test}` |" for what, how, test in WRAPPINGS]
    return "\n".join(lines)


def test_readme_support_table_is_current():
    """README's table is this module's output (regenerate: ``python tests/test_architectures.py``)."""
    import importlib
    from pathlib import Path

    for _, _, test in WRAPPINGS:  # every row names a test that exists
        module, function = test.split("::")
        assert hasattr(importlib.import_module(module.removesuffix(".py")), function), test
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- support-table:start -->\n", 1)[1].split("\n<!-- support-table:end -->", 1)[0]
    assert block == support_table()


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    print(support_table())
