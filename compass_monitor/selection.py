"""Which parameters the monitor watches, and what each one is.

Roles keep different kinds of weights apart in every report (DESIGN sec. 1:
embeddings, lm_head and norms are reported separately, never mixed in with the
linear layers). Module types (q, k, v, o, gate, up, down) group the linear
matrices the way the paper's figures do.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import MonitorConfig
from .matrix_spec import ROLES, MatrixSpec

__all__ = ["ParamSpec", "SelectionError", "select_parameters", "module_type_of", "layer_index_of", "ROLES"]


class SelectionError(ValueError):
    """The model offers no parameter that the configuration selects."""


#: A selected parameter is recorded as the monitor's one matrix record.
ParamSpec = MatrixSpec


# Ordered: the first pattern that matches a module's dotted name wins.
_MODULE_TYPE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("qkv", r"(qkv_proj|query_key_value|c_attn|Wqkv|qkv)$"),
    ("q", r"(q_proj|query|q_lin|wq|to_q|q)$"),
    ("k", r"(k_proj|key|k_lin|wk|to_k|k)$"),
    ("v", r"(v_proj|value|v_lin|wv|to_v|v)$"),
    ("o", r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|out_lin|wo|dense_attn|self_attn\.dense|to_out(\.0)?)$"),
    ("gate_up", r"(gate_up_proj)$"),
    ("gate", r"(gate_proj|w1|gate)$"),
    ("up", r"(up_proj|intermediate\.dense|fc1|c_fc|lin1|w3|dense_h_to_4h)$"),
    ("down", r"(down_proj|output\.dense|fc2|mlp\.c_proj|lin2|w2|dense_4h_to_h)$"),
)
_LAYER_RE = re.compile(r"\.(\d+)\.")
_LM_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output_projection|cls\.predictions\.decoder)$")


def module_type_of(module_name: str) -> str:
    """Classify a linear module by its dotted name (q, k, v, o, gate, up, down, ...)."""
    for module_type, pattern in _MODULE_TYPE_PATTERNS:
        if re.search(r"(^|\.)" + pattern, module_name):
            return module_type
    return "other"


def layer_index_of(name: str) -> int:
    """The first ``.<int>.`` component of a dotted name (the block index), else -1."""
    match = _LAYER_RE.search("." + name + ".")
    return int(match.group(1)) if match else -1


def _role_of(module: nn.Module, module_name: str, param_name: str, param: torch.Tensor) -> str | None:
    cls = type(module).__name__
    if isinstance(module, nn.Embedding) or cls.endswith("Embedding"):
        return "embedding"
    if "Norm" in cls:
        return "norm"
    if param_name == "bias" or param.dim() == 1:
        return "bias" if param_name == "bias" else None
    if param.dim() != 2:
        return None
    if isinstance(module, nn.Linear) or cls in {"Conv1D", "Linear"} or cls.endswith("Linear"):
        return "lm_head" if _LM_HEAD_RE.search(module_name) else "linear"
    return None


def _role_enabled(role: str, config: MonitorConfig) -> bool:
    return {
        "linear": config.include_linear,
        "embedding": config.include_embeddings,
        "lm_head": config.include_lm_head,
        "norm": config.include_norms,
        "bias": config.include_biases,
    }[role]


def select_parameters(model: nn.Module, config: MonitorConfig) -> list[tuple[ParamSpec, torch.Tensor]]:
    """Parameters of ``model`` the configuration selects, in module order.

    A parameter shared by several modules (tied embeddings) is taken once, under
    the first name that reaches it.

    Raises:
        SelectionError: nothing matched; the message lists what the model has.
    """
    pattern = re.compile(config.name_pattern) if config.name_pattern else None
    seen: set[int] = set()
    selected: list[tuple[ParamSpec, torch.Tensor]] = []
    roles_found: dict[str, int] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            role = _role_of(module, module_name, param_name, param)
            if role is None:
                continue
            roles_found[role] = roles_found.get(role, 0) + 1
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if not _role_enabled(role, config) or (pattern and not pattern.search(full_name)):
                continue
            if not param.is_floating_point():
                continue
            shape = tuple(param.shape) if param.dim() == 2 else (1, param.numel())
            spec = ParamSpec(
                name=full_name,
                role=role,
                module_type=module_type_of(module_name) if role == "linear" else role,
                layer=layer_index_of(full_name),
                shape=(int(shape[0]), int(shape[1])),
            )
            selected.append((spec, param))
    if not selected:
        found = ", ".join(f"{count} {role}" for role, count in sorted(roles_found.items())) or "no floating-point weights"
        raise SelectionError(
            f"no parameter of {type(model).__name__} matches the monitor configuration "
            f"(model has: {found}; name_pattern={config.name_pattern!r}). "
            "Enable another role (include_embeddings=True, ...) or fix name_pattern."
        )
    return selected
