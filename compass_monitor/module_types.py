"""What each linear matrix of a transformer is: module types, fused layouts, head geometry.

Torch-free (the store's readers use the vocabulary). The table below is
written from the modeling code of each family in ``transformers``
(``models/<family>/modeling_<family>.py``) and checked against the
tensor-parallel plans (``base_model_tp_plan``: ``colwise`` projections are
q/k/v/gate/up, ``rowwise`` ones o/down) where a family has one; the test
``tests/test_architectures.py`` builds each family from its config class and
checks every linear matrix against it.

Module types:

* ``q``, ``k``, ``v``, ``o``: self-attention projections (``o``: the output
  projection back to the residual stream);
* ``cross_q``, ``cross_k``, ``cross_v``, ``cross_o``: cross-attention of an
  encoder-decoder (T5 ``EncDecAttention``, BART ``encoder_attn``), kept apart;
* ``gate``, ``up``, ``down``: the MLP (``up``: the expansion, ``down``: the
  projection back; ``gate``: the gating branch of a GLU MLP), MoE experts
  included (their expert index is recorded with the matrix);
* ``router``: an MoE router or shared-expert gate (not an MLP gate);
* ``qkv``, ``gate_up``: a fused projection whose layout is not known (kept
  whole; known layouts are split into their q/k/v and gate/up row blocks);
* ``other``: any other linear layer (a user mapping can type it:
  ``MonitorConfig.module_type_map``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MODULE_TYPES",
    "FusedPart",
    "HeadGeometry",
    "classify",
    "fused_parts",
    "USER_MAP_FIELD",
]

#: Module types in the order every report lists them.
MODULE_TYPES = (
    "q", "k", "v", "qkv", "o",
    "cross_q", "cross_k", "cross_v", "cross_o",
    "gate", "up", "gate_up", "down",
    "router", "other",
)  # fmt: skip

#: The configuration field that maps module names to types (named in the unknown-names warning).
USER_MAP_FIELD = "module_type_map"

_ATTN = r"(self_attn|attn|attention|SelfAttention|self_attention|attention\.self|mixer)"
_CROSS = r"(EncDecAttention|encoder_attn|crossattention\.self|crossattention|cross_attn)"
_MLP = r"(mlp|feed_forward|ffn|DenseReluDense|shared_expert|experts\.\d+|mlp\.experts\.\d+)"

# Ordered: the first regular expression that matches the end of a module's dotted name wins.
_TABLE: tuple[tuple[str, str], ...] = (
    # Cross-attention first: its projections share names with self-attention's.
    ("cross_q", _CROSS + r"\.(q|q_proj|query)"),
    ("cross_k", _CROSS + r"\.(k|k_proj|key)"),
    ("cross_v", _CROSS + r"\.(v|v_proj|value)"),
    ("cross_o", _CROSS + r"\.(o|out_proj)|crossattention\.output\.dense"),
    # Routers: Qwen2/3-MoE and Mixtral ``mlp.gate`` / ``block_sparse_moe.gate`` (a TopK router), shared-expert gates.
    ("router", r"(mlp|block_sparse_moe|moe)\.(gate|router)|shared_expert_gate|router"),
    # Fused projections (split below where their layout is known).
    ("qkv", r"(c_attn|qkv_proj|query_key_value|W_pack|Wqkv|qkv)"),
    ("gate_up", r"(gate_up_proj)"),
    # Self-attention: Llama/Mistral/Qwen/Gemma/GPT-J/OPT q_proj.., T5 q/k/v/o, BERT query/key/value, DistilBERT q_lin.
    # Distinctive names match anywhere; short ones (q, o, dense, wo, ...) only inside an attention / MLP block.
    ("q", r"q_proj|q_lin|to_q|" + _ATTN + r"\.(q|query|wq)"),
    ("k", r"k_proj|k_lin|to_k|" + _ATTN + r"\.(k|key|wk)"),
    ("v", r"v_proj|v_lin|to_v|" + _ATTN + r"\.(v|value|wv)"),
    # o: Llama o_proj, GPT-J/OPT out_proj, T5 o, GPT-2 attn.c_proj, GPT-NeoX attention.dense,
    # Bloom/Falcon self_attention.dense, BERT attention.output.dense, DistilBERT out_lin.
    ("o", r"o_proj|out_proj|out_lin|to_out(\.0)?|attention\.output\.dense|" + _ATTN + r"\.(o|c_proj|dense|wo)"),
    # MLP: GLU gate (Llama gate_proj, T5 gated wi_0, Mixtral w1), up (up_proj, GPT-2 c_fc, GPT-J fc_in,
    # NeoX/Bloom/Falcon dense_h_to_4h, OPT fc1, T5 wi / wi_1, BERT intermediate.dense), down (the mirror images).
    ("gate", r"gate_proj|" + _MLP + r"\.(wi_0|w1)"),
    ("up", r"up_proj|c_fc|fc_in|fc1|dense_h_to_4h|intermediate\.dense|" + _MLP + r"\.(wi|wi_1|w3|lin1)"),
    ("down", r"down_proj|fc_out|fc2|dense_4h_to_h|output\.dense|" + _MLP + r"\.(c_proj|wo|w2|lin2)"),
)
_COMPILED = tuple((kind, re.compile(r"(^|\.)(" + pattern + r")$")) for kind, pattern in _TABLE)


def classify(module_name: str, *, user_map: Mapping[str, str] | None = None, param_name: str | None = None) -> str:
    """The module type of a linear layer from its dotted module name (its ``state_dict`` prefix).

    Args:
        module_name: e.g. ``model.layers.3.self_attn.q_proj`` (wrapper prefixes removed).
        user_map: regular expression -> type; searched (``re.search``) in the
            parameter's full name (``param_name``, else ``module_name``) before
            the table, first match wins.
        param_name: the parameter's full name, for ``user_map``.

    Returns:
        One of :data:`MODULE_TYPES`.
    """
    if user_map:
        target = param_name or module_name
        for pattern, kind in user_map.items():
            if re.search(pattern, target):
                return kind
    for kind, pattern in _COMPILED:
        if pattern.search(module_name):
            return kind
    return "other"


@dataclass(frozen=True)
class HeadGeometry:
    """Attention-head geometry from a model's configuration (None where it does not say).

    Attributes:
        heads: query heads (``num_attention_heads``, ``n_head``, ``num_heads``).
        kv_heads: key/value heads (``num_key_value_heads``, Falcon's ``num_kv_heads``
            or 1 for ``multi_query``; equals ``heads`` without GQA/MQA).
        head_dim: per-head width (``head_dim``, T5 ``d_kv``, else hidden size / heads).
        model_type: the configuration's ``model_type`` (selects fused layouts).
        new_decoder_architecture: Falcon's grouped fused layout.
        multi_query: Falcon's multi-query fused layout.
    """

    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    model_type: str = ""
    new_decoder_architecture: bool = False
    multi_query: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "HeadGeometry":
        """Read a ``transformers.PretrainedConfig`` (or any object with those attributes)."""
        if config is None:
            return cls()

        def first(*names: str) -> Any:
            for name in names:
                value = getattr(config, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
            return None

        model_type = str(getattr(config, "model_type", "") or "")
        heads = first("num_attention_heads", "n_head", "num_heads", "n_heads")
        hidden = first("hidden_size", "n_embd", "d_model", "dim")
        head_dim = first("head_dim", "d_kv", "attention_head_size")
        if head_dim is None and heads and hidden and hidden % heads == 0:
            head_dim = hidden // heads
        new_arch = bool(getattr(config, "new_decoder_architecture", False))
        multi_query = bool(getattr(config, "multi_query", False))
        kv_heads = first("num_key_value_heads")
        if model_type == "falcon":
            kv_heads = first("num_kv_heads") if (new_arch or not multi_query) else 1
        if kv_heads is None:
            kv_heads = heads
        return cls(heads, kv_heads, head_dim, model_type, new_arch, multi_query)


@dataclass(frozen=True)
class FusedPart:
    """One logical matrix inside a fused projection: a strided set of row blocks.

    Rows (of the fused matrix in (out, in) orientation) are
    ``offset + i * period + j`` for ``i < count``, ``j < length``, in that
    order, which is the row order of the equivalent unfused projection.
    """

    kind: str
    label: str
    offset: int
    length: int
    period: int
    count: int

    @property
    def rows(self) -> int:
        return self.length * self.count

    def blocks(self) -> list[list[int]]:
        """The row blocks ``[start, stop)`` of the fused matrix, in order."""
        return [[self.offset + i * self.period, self.offset + i * self.period + self.length] for i in range(self.count)]


def _contiguous(out: int, parts: list[tuple[str, int]]) -> list[FusedPart] | None:
    if sum(size for _, size in parts) != out:
        return None
    result, start = [], 0
    for kind, size in parts:
        result.append(FusedPart(kind, kind, start, size, out, 1))
        start += size
    return result


def fused_parts(module_name: str, fused_type: str, out_features: int, geometry: HeadGeometry) -> tuple[list[FusedPart] | None, str]:
    """How a fused projection splits into logical matrices, or None with the reason it stays whole.

    Layouts (from each family's modeling code):

    * ``gate_up_proj`` (Phi-3, Qwen-MoE experts): ``chunk(2)``: gate rows, then up rows;
    * GPT-2 ``c_attn`` and Baichuan ``W_pack``: ``split(hidden)``: q, k, v thirds;
    * Phi-3 ``qkv_proj``: q (heads * head_dim rows), k and v (kv_heads * head_dim each);
    * GPT-NeoX and Bloom ``query_key_value``: per head ``[q_h, k_h, v_h]`` (``view(..., heads, 3 * head_dim)``);
    * Falcon ``query_key_value``: ``new_decoder_architecture``: per kv group its
      queries then one key and one value head; ``multi_query``: all queries, one
      key, one value; otherwise per head like Bloom.
    """
    leaf = module_name.rsplit(".", 1)[-1]
    g, out = geometry, out_features
    if fused_type == "gate_up":
        if out % 2:
            return None, f"{out} rows do not split into gate and up halves"
        return _contiguous(out, [("gate", out // 2), ("up", out // 2)]), ""
    if leaf in ("c_attn", "W_pack"):
        if out % 3:
            return None, f"{out} rows do not split into q, k, v thirds"
        return _contiguous(out, [("q", out // 3), ("k", out // 3), ("v", out // 3)]), ""
    if g.heads is None or g.head_dim is None or g.kv_heads is None:
        return None, "the model's configuration gives no attention-head geometry"
    h, kv, d = g.heads, g.kv_heads, g.head_dim
    if leaf == "qkv_proj":
        parts = _contiguous(out, [("q", h * d), ("k", kv * d), ("v", kv * d)])
        return parts, "" if parts else f"{out} rows are not q {h}x{d} + k, v {kv}x{d}"
    if leaf == "query_key_value":
        if g.model_type == "falcon" and g.new_decoder_architecture:
            group = h // kv
            if h % kv or out != kv * (group + 2) * d:
                return None, f"{out} rows are not {kv} groups of {group} + 2 heads of {d}"
            period = (group + 2) * d
            return [
                FusedPart("q", "q", 0, group * d, period, kv),
                FusedPart("k", "k", group * d, d, period, kv),
                FusedPart("v", "v", (group + 1) * d, d, period, kv),
            ], ""
        if g.model_type == "falcon" and g.multi_query:
            parts = _contiguous(out, [("q", h * d), ("k", d), ("v", d)])
            return parts, "" if parts else f"{out} rows are not q {h}x{d} + one k and one v head"
        if g.model_type in ("gpt_neox", "bloom", "falcon"):
            if out != 3 * h * d:
                return None, f"{out} rows are not {h} heads of 3 x {d}"
            return [FusedPart(kind, kind, i * d, d, 3 * d, h) for i, kind in enumerate(("q", "k", "v"))], ""
    return None, f"the row layout of {leaf!r} in model type {g.model_type or 'unknown'!r} is not known"
