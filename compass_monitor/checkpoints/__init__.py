"""Post hoc: a base model and any series of its checkpoints become a run store.

Modules: ``discovery`` (which folders, which steps, model ids from the local
HF cache), ``safetensors_source`` (memory-mapped reading by tensor, refusal of
pickle formats), ``peft_source`` (LoRA adapters merged as merge_and_unload
would), ``tensor_specs`` (roles and module types from names and shapes),
``series`` (opening and cross-checking a series), ``layout`` (the series as the
monitor's lazily loaded shard layout), ``driver`` (one snapshot per
checkpoint), ``table`` (the Table-1 row of a pair).
"""

from .discovery import CheckpointRef, discover_series, resolve_path, resolve_steps
from .driver import DiffResult, diff_checkpoints
from .errors import CheckpointError, CheckpointMismatchError, UnsupportedFormatError
from .layout import CheckpointCursor, build_layout
from .series import open_checkpoint

__all__ = [
    "CheckpointCursor",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointRef",
    "DiffResult",
    "UnsupportedFormatError",
    "build_layout",
    "diff_checkpoints",
    "discover_series",
    "open_checkpoint",
    "resolve_path",
    "resolve_steps",
]
