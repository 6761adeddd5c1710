"""Which matrices the monitor watches, and what each one is.

Roles keep different kinds of weights apart in every report (DESIGN sec. 1:
embeddings, lm_head and norms are reported separately, never mixed in with the
linear layers). Module types (q, k, v, o, gate, up, down, ...;
:mod:`compass_monitor.module_types`) group the linear matrices the way the
paper's figures do.

Every monitored matrix is measured as what it is
(:mod:`compass_monitor.canonical_views`): named by the unwrapped model's
``state_dict`` key, read as (out_features, in_features), a fused projection
split into its logical matrices, a LoRA layer as its effective (merged)
weight. Frozen parameters are left out by default. What was left out, and
why, is recorded in :attr:`Selection.facts` (the store's ``selection``
attribute).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .canonical_views import canonical_view, is_tuner_layer, lora_effective, lora_trainable, storage_layout, unwrapped_modules
from .config import MonitorConfig
from .matrix_spec import ROLES, MatrixSpec
from .module_types import USER_MAP_FIELD, FusedPart, HeadGeometry, classify, fused_parts

__all__ = [
    "ParamSpec",
    "SelectedMatrix",
    "Selection",
    "SelectionError",
    "select_matrices",
    "select_parameters",
    "module_type_of",
    "layer_index_of",
    "ROLES",
]

log = logging.getLogger(__name__)

_ATTENTION = {"q": "heads", "k": "kv_heads", "v": "kv_heads", "o": "heads", "cross_q": "heads", "cross_k": "heads",
              "cross_v": "heads", "cross_o": "heads"}  # fmt: skip


class SelectionError(ValueError):
    """The model offers no parameter that the configuration selects, or one it cannot read (the message says which)."""


#: A selected matrix is recorded as the monitor's one matrix record. Its ``extra`` facts: ``source`` (the
#: tensor's ``state_dict`` key), ``layout`` (``out_in``/``in_out``: how the source stores it), ``rows`` (row
#: blocks ``[start, stop)`` of the source a fused part takes), ``expert``, ``heads`` and ``head_dim``
#: (attention matrices, from the model's config), ``adapter`` (``lora``: the effective weight of a LoRA layer).
#: A logical part of a fused or expert tensor is named ``<key>[<part>]`` (``[q]``, ``[gate]``, ``[3]``, ``[3.up]``).
ParamSpec = MatrixSpec


@dataclass(frozen=True)
class SelectedMatrix:
    """A monitored matrix and how to read it.

    Attributes:
        spec: what it is.
        source: the parameter that holds it (the base weight of a LoRA layer).
        matrix: returns its current values as a (m, n) tensor (a view where possible; a 1-D
            parameter as stored, its n values measured as 1 x n).
        plain: ``matrix()`` is ``source`` itself, unsliced and untransposed (a shard of
            ``source`` is then a shard of the matrix).
    """

    spec: ParamSpec
    source: torch.Tensor
    matrix: Callable[[], torch.Tensor] = field(repr=False)
    plain: bool = True


@dataclass
class Selection:
    """The monitored matrices in module order, and the facts about what was left out (JSON)."""

    matrices: list[SelectedMatrix]
    facts: dict[str, Any]


_LAYER_RE = re.compile(r"\.(\d+)\.")
_LM_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output_projection|cls\.predictions\.decoder)$")


def module_type_of(module_name: str, user_map: dict[str, str] | None = None) -> str:
    """Classify a linear module by its dotted name (see :func:`compass_monitor.module_types.classify`)."""
    return classify(module_name, user_map=user_map)


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
    if param.dim() == 3 and cls.endswith("Experts"):
        return "linear"  # MoE experts stored as (experts, out, in) tensors (transformers >= 5)
    if param.dim() != 2:
        return None
    if isinstance(module, nn.Linear) or cls in {"Conv1D", "Linear"} or cls.endswith(("Linear", "Router")):
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


def _model_geometry(model: nn.Module) -> HeadGeometry:
    for _, module, _ in unwrapped_modules(model):
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "model_type"):
            return HeadGeometry.from_config(config)
    return HeadGeometry()


def _head_facts(kind: str, rows: int, cols: int, geometry: HeadGeometry) -> dict[str, int]:
    """``heads``/``head_dim`` of an attention matrix where the config's geometry fits its shape."""
    which = _ATTENTION.get(kind)
    d = geometry.head_dim
    if which is None or d is None:
        return {}
    heads = geometry.kv_heads if which == "kv_heads" else geometry.heads
    side = cols if kind.endswith("o") else rows  # o's input columns are the concatenated heads
    if heads and side == heads * d:
        return {"heads": int(heads), "head_dim": int(d)}
    if side % d == 0:
        return {"heads": side // d, "head_dim": int(d)}
    return {}


class _Selector:
    """One pass over the unwrapped module tree (state shared by the steps of :func:`select_matrices`)."""

    def __init__(self, model: nn.Module, config: MonitorConfig, optimizer: Any) -> None:
        self.model, self.config = model, config
        self.pattern = re.compile(config.name_pattern) if config.name_pattern else None
        self.geometry = _model_geometry(model)
        self.in_optimizer: set[int] | None = None
        if optimizer is not None:
            groups = getattr(optimizer, "param_groups", [])
            self.in_optimizer = {id(p) for group in groups for p in group.get("params", [])}
        self.selected: list[SelectedMatrix] = []
        self.frozen: list[dict[str, str]] = []
        self.unknown: list[str] = []
        self.notes: list[str] = []
        self.adapter_factors: list[str] = []
        self.roles_found: dict[str, int] = {}
        self.owner: dict[int, tuple[str, str]] = {}  # id(param) -> (name, role) of its first use
        self.excluded_frozen: list[SelectedMatrix] = []
        self.probes: set[int] = set()  # ids of meta tensors that stand for a sharded parameter's shape (FSDP1)
        # id(LoRA base layer) -> its tuner layer (the effective weight is base + the active adapters' deltas)
        self.tuners = {
            id(module.base_layer): module
            for _, module, _ in unwrapped_modules(model)
            if is_tuner_layer(module) and hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")
        }

    def trainable(self, tensors: Iterable[torch.Tensor]) -> tuple[bool, str]:
        tensors = list(tensors)
        if not any(t.requires_grad for t in tensors):
            return False, "frozen (requires_grad=False)"
        if self.in_optimizer is not None and not any(id(t) in self.in_optimizer for t in tensors):
            return False, "frozen (in no optimizer param group)"
        return True, ""

    def run(self, entries: Iterable[tuple[str, nn.Module, nn.Module | None, str, torch.Tensor]] | None = None) -> Selection:
        """Select from ``(module name, module, tuner, param name, tensor)`` entries (default: the model's parameters)."""
        for module_name, module, tuner, param_name, param in entries if entries is not None else _entries(self.model):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if tuner is not None:  # a LoRA factor: measured through its layer's effective weight
                self.adapter_factors.append(full)
                continue
            self.consider(module_name, module, param_name, full, param)
        return self.finish()

    def consider(self, module_name: str, module: nn.Module, param_name: str, full: str, param: torch.Tensor) -> None:
        role = _role_of(module, module_name, param_name, param)
        if role is None:
            return
        first = self.owner.get(id(param))
        if first is not None:
            if role == "lm_head" and self.config.include_lm_head and not self.config.include_embeddings:
                raise SelectionError(
                    f"{full} is tied to the embeddings {first[0]} (the same tensor, e.g. tie_word_embeddings=True): "
                    "an untied output head does not exist. Monitor it with include_embeddings=True instead of "
                    "include_lm_head=True."
                )
            return
        self.owner[id(param)] = (full, role)
        self.roles_found[role] = self.roles_found.get(role, 0) + 1
        if not _role_enabled(role, self.config) or (self.pattern and not self.pattern.search(full)):
            return
        if not param.is_floating_point():
            return
        if param.is_meta and id(param) not in self.probes:
            raise SelectionError(
                f"parameter {full!r} is on the meta device (not materialised): create the monitor once the model's "
                "weights are loaded (after from_pretrained / to_empty + load, or after the framework's set-up)"
            )
        tuner = self.tuner_of(module)
        sources = [param] + (lora_trainable(tuner) if tuner is not None else [])
        trainable, reason = self.trainable(sources)
        if role != "linear":
            shape = tuple(param.shape) if param.dim() == 2 else (1, param.numel())
            spec = ParamSpec(full, role, role, layer_index_of(full), (int(shape[0]), int(shape[1])), extra={"source": full})
            self.add(spec, param, lambda p=param: p.detach(), True, trainable, reason)  # 1-D: n values, measured as 1 x n
            return
        self.add_linear(module_name, module, full, param, tuner, trainable, reason)

    def tuner_of(self, module: nn.Module) -> nn.Module | None:
        return self.tuners.get(id(module))

    def add_linear(self, module_name: str, module: nn.Module, full: str, param: torch.Tensor, tuner: Any, trainable: bool, reason: str) -> None:
        # A 3-D expert tensor is named by its parameter (experts.gate_up_proj, experts.down_proj), a layer by its module.
        where = full if param.dim() == 3 else module_name
        kind = classify(where, user_map=self.config.module_type_map or None, param_name=full)
        if kind == "other" and full not in self.unknown:
            self.unknown.append(full)
        layout = storage_layout(module)  # a LoRA delta comes in the base's storage layout (fan_in_fan_out)
        storage: Callable[[], torch.Tensor] = (lambda p=param: p.detach()) if tuner is None else lora_effective(tuner, param)
        extra: dict[str, Any] = {"source": full, "layout": layout}
        if tuner is not None:
            extra["adapter"] = "lora"
        experts = [None] if param.dim() == 2 else list(range(param.shape[0]))
        matrix_shape = tuple(param.shape[-2:])
        out = matrix_shape[1] if layout == "in_out" else matrix_shape[0]
        cols = matrix_shape[0] if layout == "in_out" else matrix_shape[1]
        parts: list[FusedPart] | None = None
        if kind in ("qkv", "gate_up"):
            parts, why = fused_parts(where, kind, out, self.geometry)
            if parts is None:
                self.notes.append(f"{full}: fused {kind} projection kept whole ({why})")
        for expert in experts:
            for part in parts or [None]:
                suffix = ".".join(str(x) for x in (expert, part.label if part else None) if x is not None)
                name = f"{full}[{suffix}]" if suffix else full
                part_kind = part.kind if part else kind
                rows = part.rows if part else out
                facts = dict(extra)
                if expert is not None:
                    facts["expert"] = expert
                if part is not None:
                    facts["rows"] = part.blocks()
                facts.update(_head_facts(part_kind, rows, cols, self.geometry))
                spec = ParamSpec(name, "linear", part_kind, layer_index_of(full), (int(rows), int(cols)), extra=facts)
                view = canonical_view(storage, layout=layout, expert=expert, part=part)
                plain = tuner is None and layout == "out_in" and expert is None and part is None
                self.add(spec, param, view, plain, trainable, reason)

    def add(self, spec: ParamSpec, source: torch.Tensor, view: Callable[[], torch.Tensor], plain: bool, trainable: bool, reason: str) -> None:
        chosen = SelectedMatrix(spec, source, view, plain)
        if not trainable:
            self.frozen.append({"name": spec.name, "reason": reason})
            if not self.config.include_frozen:
                self.excluded_frozen.append(chosen)
                return
        self.selected.append(chosen)

    def finish(self) -> Selection:
        if not self.selected and self.excluded_frozen:
            log.warning(
                "compass-monitor: every selected matrix of %s is frozen (%d, e.g. %s: %s); monitoring them anyway "
                "(they will show no change). Create the monitor after unfreezing, pass the optimizer, or set "
                "include_frozen=True to silence this.",
                type(self.model).__name__, len(self.frozen), self.frozen[0]["name"], self.frozen[0]["reason"],
            )  # fmt: skip
            self.selected = self.excluded_frozen
            self.notes.append("every selected matrix was frozen: all are monitored")
        if not self.selected:
            found = ", ".join(f"{count} {role}" for role, count in sorted(self.roles_found.items())) or "no floating-point weights"
            raise SelectionError(
                f"no parameter of {type(self.model).__name__} matches the monitor configuration "
                f"(model has: {found}; name_pattern={self.config.name_pattern!r}). "
                "Enable another role (include_embeddings=True, ...) or fix name_pattern."
            )
        monitored = [m for m in self.selected if m.spec.role == "linear"]
        unknown = [name for name in self.unknown if any(m.spec.extra.get("source") == name for m in monitored)]
        if unknown:
            log.warning(
                "compass-monitor: %d linear matrices have no known module type and are typed 'other': %s. "
                "Map them with MonitorConfig(%s={r'<regex>': '<type>'}).",
                len(unknown), ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else ""), USER_MAP_FIELD,
            )  # fmt: skip
        for note in self.notes:
            log.info("compass-monitor: %s", note)
        facts: dict[str, Any] = {
            "frozen": self.frozen,
            # whether the matrices listed in "frozen" are among the monitored ones
            "frozen_included": bool(self.frozen) and (self.config.include_frozen or self.selected is self.excluded_frozen),
            "unknown_module_types": unknown,
            "adapter_factors": self.adapter_factors,
            "notes": self.notes,
        }
        return Selection(self.selected, facts)


def _entries(model: nn.Module) -> Iterable[tuple[str, nn.Module, nn.Module | None, str, torch.Tensor]]:
    for module_name, module, tuner in unwrapped_modules(model):
        for param_name, param in module.named_parameters(recurse=False):
            yield module_name, module, tuner, param_name, param


def select_matrices(model: nn.Module, config: MonitorConfig, *, optimizer: Any = None) -> Selection:
    """The matrices of ``model`` the configuration selects, in module order, each as its canonical view.

    A parameter shared by several modules (tied embeddings) is taken once,
    under the first name that reaches it.

    Args:
        model: the model, wrapped or not (torch.compile, activation
            checkpointing, DDP, FSDP1/2, Lightning, PEFT).
        config: what to select.
        optimizer: when given, parameters in none of its param groups count as frozen.

    Raises:
        SelectionError: nothing matched (the message lists what the model has),
            a selected parameter is on the meta device, or ``include_lm_head``
            asks for a head tied to the embeddings.
    """
    return _Selector(model, config, optimizer).run()


def select_parameters(model: nn.Module, config: MonitorConfig) -> list[tuple[ParamSpec, torch.Tensor]]:
    """``(spec, tensor)`` of every selected matrix: the parameter itself where it is stored as measured,
    else its current canonical (m, n) values (see :func:`select_matrices`)."""
    return [(m.spec, m.source if m.plain else m.matrix()) for m in select_matrices(model, config).matrices]
