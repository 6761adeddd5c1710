"""Canonical names and matrix views: what the monitor measures, whatever wraps or stores the weights.

* **Names**: the unwrapped model's ``state_dict`` keys (the names a saved
  Hugging Face checkpoint uses). :func:`unwrapped_modules` walks the module
  tree and drops the component a wrapper adds: ``_orig_mod`` (torch.compile),
  ``_checkpoint_wrapped_module`` (activation checkpointing), ``module`` (DDP,
  DataParallel, DeepSpeed), ``_fsdp_wrapped_module`` (FSDP1),
  ``_forward_module`` (Lightning, Fabric), PEFT's ``base_model.model`` and a
  tuner layer's ``base_layer``.
* **Views**: every monitored matrix is read as (out_features, in_features):
  transformers ``Conv1D`` (GPT-2 family) stores (in, out) and is transposed; a
  logical matrix of a fused projection is a strided set of its rows
  (:class:`~compass_monitor.module_types.FusedPart`); a MoE expert is one slice
  of a 3-D expert tensor; a LoRA layer is its effective weight.

Framework classes are recognised by name (the core imports no framework).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .module_types import FusedPart

__all__ = ["unwrapped_modules", "is_tuner_layer", "lora_effective", "canonical_view", "storage_layout"]

# Wrapper class name -> the attribute holding the wrapped module (its name component is dropped).
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
    "ActivationWrapper": "_checkpoint_wrapped_module",
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "DeepSpeedEngine": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
    "_LightningModuleWrapperBase": "_forward_module",
    "_FabricModule": "_forward_module",
    "PeftModel": "base_model",
    "BaseTuner": "model",
    "BaseTunerLayer": "base_layer",
}
# Never a component of a model's own state_dict keys: dropped under any class.
_ALWAYS_DROPPED = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_forward_module"})


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _wrapped_attribute(module: nn.Module) -> str | None:
    names = _class_names(module)
    for cls, attribute in _WRAPPERS.items():
        if cls in names:
            return attribute
    return None


def is_tuner_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA, IA3, ...): it holds ``base_layer`` and its adapter modules."""
    return "BaseTunerLayer" in _class_names(module) and hasattr(module, "base_layer")


def unwrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """``(canonical name, module, enclosing tuner layer or None)`` for every module, each once.

    The canonical name is the module's prefix in the unwrapped model's
    ``state_dict``. A module reached twice (shared) is yielded under its
    first name. Modules inside a PEFT tuner layer other than its base layer
    (the adapter factors) are yielded with that tuner layer.
    """
    seen: set[int] = set()

    def walk(module: nn.Module, name: str, tuner: nn.Module | None) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield name, module, tuner
        dropped = _wrapped_attribute(module)
        own_tuner = module if is_tuner_layer(module) else None
        for child_name, child in module.named_children():
            drop = child_name == dropped or child_name in _ALWAYS_DROPPED
            child_path = name if drop else (f"{name}.{child_name}" if name else child_name)
            if own_tuner is None:
                child_tuner = tuner
            else:  # the base layer carries the model's weight; the tuner's other children are adapter factors
                child_tuner = None if child_name == "base_layer" else own_tuner
            yield from walk(child, child_path, child_tuner)

    yield from walk(model, "", None)


def storage_layout(module: nn.Module) -> str:
    """``"in_out"`` for transformers ``Conv1D`` (weight (in, out)); ``"out_in"`` for ``nn.Linear`` and the rest."""
    return "in_out" if type(module).__name__ == "Conv1D" else "out_in"


def _active_adapters(layer: nn.Module) -> list[str]:
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return []  # merged: the base already holds the update; disabled: the base is the weight in use
    active = getattr(layer, "active_adapters", None) or getattr(layer, "active_adapter", [])
    active = [active] if isinstance(active, str) else list(active)
    return [a for a in active if a in getattr(layer, "lora_A", {})]


def lora_effective(layer: nn.Module, weight: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The weight a merged checkpoint would hold, computed now, in the base's storage layout and dtype.

    Exactly PEFT's ``merge_and_unload``: for each active adapter, the base
    weight plus ``layer.get_delta_weight(adapter)`` (``scaling * B @ A``,
    rsLoRA's ``alpha / sqrt(r)`` scaling included, transposed for
    ``fan_in_fan_out``) added in the base's dtype, or the adapter variant's
    ``merge_safe`` (DoRA, ...). Source: ``peft/tuners/lora/layer.py``,
    ``Linear.merge``.
    """

    def effective() -> torch.Tensor:
        adapters = _active_adapters(layer)
        base = weight.detach()
        if not adapters:
            return base
        merged = base.clone()
        variants = getattr(layer, "lora_variant", {}) or {}
        for adapter in adapters:
            if adapter in variants:
                merged = variants[adapter].merge_safe(layer, adapter, merged)
            else:
                merged += layer.get_delta_weight(adapter).to(merged.dtype)
        return merged.detach()

    return effective


def lora_trainable(layer: nn.Module) -> list[torch.Tensor]:
    """The adapter factors of a tuner layer's active adapters (their training moves the effective weight)."""
    out = []
    for adapter in _active_adapters(layer):
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            container = getattr(layer, name, None)  # a ModuleDict / ParameterDict keyed by adapter
            module = container[adapter] if container is not None and adapter in container else None
            if isinstance(module, nn.Module):
                out.extend(module.parameters())
            elif isinstance(module, torch.Tensor):
                out.append(module)
    return out


def canonical_view(
    storage: Callable[[], torch.Tensor],
    *,
    layout: str,
    expert: int | None = None,
    part: FusedPart | None = None,
) -> Callable[[], torch.Tensor]:
    """A function returning the current (out, in) matrix of one monitored matrix.

    Args:
        storage: returns the stored tensor (the parameter, or a LoRA effective weight).
        layout: ``"out_in"`` or ``"in_out"`` (transposed on reading).
        expert: index into dim 0 of a 3-D expert tensor (experts, out, in).
        part: rows of a fused projection to take (in the (out, in) orientation).

    The result is a view where the layout allows (plain, expert, contiguous
    row block of ``nn.Linear``); a transposed or strided part is copied into
    a row-major tensor.
    """

    def view() -> torch.Tensor:
        t = storage()
        if expert is not None:
            t = t[expert]
        if layout == "in_out":
            t = t.t()
        if part is not None:  # the fused matrix is count periods of rows; the part is rows [offset, offset + length) of each
            cols = t.shape[1]
            t = t.unflatten(0, (part.count, part.period))[:, part.offset : part.offset + part.length].reshape(part.rows, cols)
        # Row-major like an unfused nn.Linear weight (a no-op for those): downstream kernels (BLAS in the spectral
        # diagnostics) then see the same memory layout, so a fused model's numbers equal the unfused model's bit for bit.
        return t.contiguous()

    return view
