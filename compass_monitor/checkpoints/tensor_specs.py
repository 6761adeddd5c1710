"""What each checkpoint tensor is, from its name and shape alone (no model code).

The live monitor takes roles from module classes (``selection``); a checkpoint
has only names, shapes and dtypes, so the same roles are read from those:

* a 2-D ``*.weight`` is ``embedding`` if its module is named like one
  (``embed_tokens``, ``word_embeddings``, ``wte``, ``wpe``, ``shared``, ...),
  ``lm_head`` if named like an output head (``selection``'s head pattern),
  ``norm`` if named like a norm, otherwise ``linear``;
* a 1-D tensor of a module named like a norm (``LayerNorm``, ``ln_f``,
  ``input_layernorm``, ``norm``) is ``norm``; any other 1-D ``*.bias`` is ``bias``;
* everything else (buffers, conv kernels, integer tensors) is not monitored.

Module types and layer indices come from ``selection.module_type_of`` and
``selection.layer_index_of``, so a post-hoc store groups matrices exactly as a
live one. Matrices are ordered by their dotted names with numeric parts
compared as numbers (``layers.2`` before ``layers.10``).
"""

from __future__ import annotations

import re

from ..config import MonitorConfig
from ..selection import ParamSpec, SelectionError, _role_enabled, layer_index_of, module_type_of
from ..selection import _LM_HEAD_RE  # the live monitor's head pattern: one definition

__all__ = ["role_of_tensor", "specs_from_shapes", "natural_key", "FLOAT_DTYPES"]

FLOAT_DTYPES = _FLOAT_DTYPES = {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe|shared|embed_positions|embeddings|embedding|tok_embeddings)$")
_NORM_RE = re.compile(r"(norm|layernorm|ln_\w+|ln\d*|LayerNorm)$", re.IGNORECASE)


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a dotted name with numeric components compared as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in name.split("."))


def role_of_tensor(name: str, shape: tuple[int, ...]) -> str | None:
    """``linear``, ``embedding``, ``lm_head``, ``norm``, ``bias`` or None (not monitored) for a checkpoint tensor."""
    module, _, leaf = name.rpartition(".")
    last = module.rpartition(".")[2]
    if len(shape) == 2 and leaf == "weight":
        if _EMBEDDING_RE.search(module):
            return "embedding"
        if _LM_HEAD_RE.search(module):
            return "lm_head"
        if _NORM_RE.search(last):
            return "norm"
        return "linear"
    if len(shape) == 1 and leaf in ("weight", "bias"):
        if _NORM_RE.search(last):
            return "norm"
        return "bias" if leaf == "bias" else None
    return None


def specs_from_shapes(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], config: MonitorConfig, *, where: str = "checkpoint") -> list[ParamSpec]:
    """The monitored matrices of a checkpoint, as the live monitor would select them from the model.

    Args:
        shapes: tensor name -> shape, from the safetensors headers.
        dtypes: tensor name -> safetensors dtype name (non-float tensors are skipped).
        config: the roles and ``name_pattern`` to select.
        where: the checkpoint, for the error message.

    Raises:
        SelectionError: nothing selected; the message lists the roles found.
    """
    pattern = re.compile(config.name_pattern) if config.name_pattern else None
    found: dict[str, int] = {}
    specs = []
    for name in sorted(shapes, key=natural_key):
        shape = shapes[name]
        role = role_of_tensor(name, shape)
        if role is None or dtypes.get(name) not in _FLOAT_DTYPES:
            continue
        found[role] = found.get(role, 0) + 1
        if not _role_enabled(role, config) or (pattern and not pattern.search(name)):
            continue
        module = name.rpartition(".")[0]
        matrix = (int(shape[0]), int(shape[1])) if len(shape) == 2 else (1, int(shape[0]))
        specs.append(
            ParamSpec(
                name=name,
                role=role,
                module_type=module_type_of(module) if role == "linear" else role,
                layer=layer_index_of(name),
                shape=matrix,
            )
        )
    if not specs:
        have = ", ".join(f"{count} {role}" for role, count in sorted(found.items())) or "no floating-point weights"
        raise SelectionError(
            f"no tensor of {where} matches the monitor configuration (it has: {have}; name_pattern={config.name_pattern!r}); "
            "enable another role (--include embedding,...) or fix --name-pattern"
        )
    return specs
