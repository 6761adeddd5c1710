"""Opening a base and its checkpoints, and checking that they belong together, before anything is written.

Every check reads only headers and ``config.json``: a series that cannot be
compared is refused in seconds, with the tensors or fields that differ named
(the first few and the count), before a run store is created.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from ..config import MonitorConfig
from .discovery import resolve_path
from .errors import CheckpointError, CheckpointMismatchError, listed
from .peft_source import LoraSource, is_adapter_folder
from .safetensors_source import SafetensorsSource
from .views import ViewPlan, plan_views

__all__ = ["TensorSource", "open_checkpoint", "check_series", "FP16_NOTE"]

log = logging.getLogger(__name__)

FP16_NOTE = (
    "fp16 tensors are rounded to bf16 before comparing, as the live probe rounds fp32 masters: a weight counts as changed "
    "when its bf16 rounding changed, so fp16 updates below bf16 resolution (3 mantissa bits finer) are not counted"
)


class TensorSource(Protocol):
    """What the reader needs of a checkpoint: names, header shapes and dtypes, one tensor at a time."""

    path: Path

    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...
    def load(self, name: str) -> torch.Tensor: ...
    def close(self) -> None: ...

    @property
    def model_type(self) -> str | None: ...

    @property
    def architectures(self) -> tuple[str, ...]: ...


def open_checkpoint(ref: str | Path, *, base: SafetensorsSource | None = None) -> SafetensorsSource | LoraSource:
    """The tensors of a checkpoint folder, file, cached model id, or PEFT adapter folder (merged over ``base``).

    Raises:
        UnsupportedFormatError: pickle / DCP weights (the message says how to convert).
        CheckpointError: not found, unreadable, or an adapter without a base.
    """
    path = resolve_path(ref)
    if is_adapter_folder(path):
        if base is None:
            raise CheckpointError(f"{path} is a PEFT adapter folder; it needs its base model: diff BASE {path}")
        return LoraSource(path, base)
    return SafetensorsSource(path)


def _header(source: TensorSource) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    names = source.names()
    return {n: source.shape(n) for n in names}, {n: source.dtype(n) for n in names}


def check_series(base: TensorSource, checkpoints: list[TensorSource], config: MonitorConfig) -> ViewPlan:
    """The monitored matrices of ``base`` and how each is read (``views.plan_views``), after checking that every
    checkpoint holds the base's tensors with the same shapes.

    Compared per checkpoint: ``config.json`` ``model_type`` and ``architectures``
    (when both sides have them), the set of tensor names (missing and extra
    ones listed), and the shape of every tensor. Tensors outside the monitored
    roles count too: a checkpoint of another model is refused even if its
    linear layers happen to match.

    Raises:
        CheckpointMismatchError: the first checkpoint that differs, and how.
        SelectionError: nothing in the base matches the configuration.
    """
    shapes, dtypes = _header(base)
    plan = plan_views(base, shapes, dtypes, config)
    read = plan.tensors
    fp16 = any(dtypes[name] == "F16" for name in read)
    for checkpoint in checkpoints:
        for field in ("model_type", "architectures"):
            ours, theirs = getattr(base, field), getattr(checkpoint, field)
            if ours and theirs and ours != theirs:
                raise CheckpointMismatchError(
                    f"{checkpoint.path} is a different architecture from the base {base.path}: config.json {field} "
                    f"{theirs!r} vs {ours!r}; give checkpoints of the base model's run"
                )
        other = set(checkpoint.names())
        missing = sorted(set(shapes) - other)
        extra = sorted(other - set(shapes))
        if missing or extra:
            parts = [f"missing {listed(missing)}" if missing else "", f"extra {listed(extra)}" if extra else ""]
            raise CheckpointMismatchError(
                f"{checkpoint.path} does not hold the base's tensors: " + "; ".join(p for p in parts if p)
                + f" (base {base.path}); give checkpoints of the same model (a model head saved under another prefix? save the same class)"
            )
        changed = [f"{n} {checkpoint.shape(n)} vs {shapes[n]}" for n in sorted(shapes) if checkpoint.shape(n) != shapes[n]]
        if changed:
            raise CheckpointMismatchError(
                f"{checkpoint.path} has tensors whose shape differs from the base {base.path}: {listed(changed)}; "
                "a resized model cannot be compared with its base"
            )
        fp16 = fp16 or any(checkpoint.dtype(name) == "F16" for name in read)
    if fp16:
        log.warning("compass-monitor diff: %s", FP16_NOTE)
    return plan
