"""A PEFT LoRA adapter folder beside its base: the merged effective weights, tensor by tensor.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (what
``PeftModel.save_pretrained`` writes) holds, per adapted linear module, ``A``
(``lora_A.weight``, shape (r, in)) and ``B`` (``lora_B.weight``, (out, r)).
The effective weight is the one ``merge_and_unload`` would store (PEFT
``LoraLayer.get_delta_weight`` and ``merge``)::

    W_eff = W + scaling * (B @ A)          scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

computed the way PEFT computes it: ``B @ A`` in float32 when the adapter is
half precision (PEFT's CPU path), times ``scaling``, cast back to the
adapter's dtype, transposed with ``fan_in_fan_out`` (GPT-2 ``Conv1D``), then
added in place to the base weight in the base's dtype. Embedding adapters
(``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r)) give
``W + scaling * (B @ A).T``. ``rank_pattern`` / ``alpha_pattern`` are honoured;
the rank is read from ``A``'s shape. Full tensors the adapter saves
(``modules_to_save``) replace the base's. DoRA and non-LoRA PEFT types are
refused with a message.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, UnsupportedFormatError
from .safetensors_source import SafetensorsSource, read_json

__all__ = ["LoraSource", "is_adapter_folder"]

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?(\.weight)?$")
_SAVED_RE = re.compile(r"\.modules_to_save(\.[^.]+)?\.")


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _pattern_value(module: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraSource:
    """The base's tensors with each LoRA-adapted weight replaced by its merged effective weight.

    Args:
        folder: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
        base: the base model's tensors.

    Raises:
        UnsupportedFormatError: a non-LoRA PEFT type, DoRA, or a pickled ``adapter_model.bin``.
        CheckpointError: the adapter names modules the base does not have, or A/B shapes that do not fit.
    """

    def __init__(self, folder: str | Path, base: SafetensorsSource) -> None:
        self.path = self.folder = Path(folder)
        self.base = base
        self.adapter_config = read_json(self.folder / "adapter_config.json")
        peft_type = str(self.adapter_config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise UnsupportedFormatError(f"{self.folder}: PEFT type {peft_type} is not supported; compass-monitor merges LoRA adapters only (merge_and_unload and save_pretrained the merged model, then diff that)")
        if self.adapter_config.get("use_dora"):
            raise UnsupportedFormatError(f"{self.folder}: DoRA adapters (use_dora=true) are not supported; merge_and_unload the model, save_pretrained it, then diff that folder")
        weights = self.folder / "adapter_model.safetensors"
        if not weights.is_file():
            if any(self.folder.glob("adapter_model.bin")):
                raise UnsupportedFormatError(
                    f"{self.folder} holds a pickled adapter_model.bin; compass-monitor never unpickles files: load the adapter "
                    "(from a trusted copy) and save it again with PeftModel.save_pretrained(OUT, safe_serialization=True)"
                )
            raise CheckpointError(f"{self.folder} has adapter_config.json but no adapter_model.safetensors")
        self.adapter = SafetensorsSource(weights)
        self.config = base.config
        self._lora: dict[str, dict[str, str]] = {}  # base weight name -> {"A": name, "B": name, "embedding": "0"/"1"}
        self._replaced: dict[str, str] = {}  # base name -> adapter tensor name (modules_to_save)
        for name in self.adapter.names():
            inner = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
            match = _LORA_RE.match(inner)
            if match:
                target = match["module"] + ".weight"
                kind = match["kind"]
                entry = self._lora.setdefault(target, {})
                entry["A" if kind.endswith("A") else "B"] = name
                entry["embedding"] = "1" if "embedding" in kind else "0"
            else:
                self._replaced[_SAVED_RE.sub(".", inner)] = name
        unknown = sorted(n for n in list(self._lora) + list(self._replaced) if n not in base)
        if unknown:
            raise CheckpointError(
                f"adapter {self.folder} adapts tensors the base {base.path} does not have: {', '.join(unknown[:5])} "
                f"({len(unknown)}); give the base model this adapter was trained on"
            )
        for target, entry in self._lora.items():
            if "A" not in entry or "B" not in entry:
                raise CheckpointError(f"adapter {self.folder}: {target!r} has only one of lora_A / lora_B")

    # -- the TensorSource interface --------------------------------------------------------
    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> str:
        return self.base.dtype(name)

    @property
    def model_type(self) -> str | None:
        return self.base.model_type

    @property
    def architectures(self) -> tuple[str, ...]:
        return self.base.architectures

    def scaling(self, name: str, rank: int) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with use_rslora), with PEFT's rank/alpha patterns for this module."""
        module = name[: -len(".weight")]
        alpha = float(_pattern_value(module, self.adapter_config.get("alpha_pattern") or {}, self.adapter_config.get("lora_alpha", 8)))
        if self.adapter_config.get("use_rslora"):
            return alpha / math.sqrt(rank)
        return alpha / rank

    def load(self, name: str) -> torch.Tensor:
        """The effective weight ``name`` as merge_and_unload would store it (base dtype)."""
        if name in self._replaced:
            return self.adapter.load(self._replaced[name])
        weight = self.base.load(name)
        entry = self._lora.get(name)
        if entry is None:
            return weight
        a, b = self.adapter.load(entry["A"]), self.adapter.load(entry["B"])
        rank = a.shape[0]
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != rank:
            raise CheckpointError(f"adapter {self.folder}: {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not multiply")
        dtype = b.dtype
        if dtype in (torch.float16, torch.bfloat16):  # PEFT casts half-precision adapters to fp32 on the CPU
            a, b = a.float(), b.float()
        delta = (b @ a) * self.scaling(name, rank)
        delta = delta.to(dtype)
        if entry["embedding"] == "1" or self.adapter_config.get("fan_in_fan_out"):
            delta = delta.T
        if tuple(delta.shape) != tuple(weight.shape):
            raise CheckpointError(f"adapter {self.folder}: the update of {name!r} has shape {tuple(delta.shape)}, the base weight {tuple(weight.shape)}")
        merged = weight.clone()
        merged += delta
        return merged

    def close(self) -> None:
        self.adapter.close()

    def __repr__(self) -> str:
        return f"LoraSource({str(self.folder)!r}, {len(self._lora)} adapted matrices over {self.base!r})"
