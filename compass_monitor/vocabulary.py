"""The project's vocabulary in one place: module types, their display order, mask and count names.

Torch-free: the store, the CLI, the TUI and the report share it. The on-disk
names (count fields, reference masks) are defined by ``store.schema``; this
module adds what views need to present them consistently.
"""

from __future__ import annotations

from .store.schema import COUNT_FIELDS, REFERENCE_MASKS

__all__ = ["MODULE_TYPE_ORDER", "HEAD_TYPES", "MASK_LABELS", "INTERSECTION_FIELDS", "COUNT_FIELDS", "REFERENCE_MASKS", "type_rank"]

#: Module types (and the other roles) in the order every view lists them: attention, then MLP, then the rest.
MODULE_TYPE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "router", "other", "embedding", "lm_head", "norm", "bias")
#: Types whose rows (q, k, v) or columns (o) fall into attention heads.
HEAD_TYPES = ("q", "k", "v", "qkv", "o")
#: Short labels of the reference masks for narrow displays.
MASK_LABELS = {"principal": "princ", "low": "low", "principal_not_low": "p¬low"}
#: The count field of ``|M ∩ X|`` for each reference mask X, in ``REFERENCE_MASKS`` order.
INTERSECTION_FIELDS = ("changed_and_principal", "changed_and_low", "changed_and_principal_not_low")




def type_rank(module_type: str) -> int:
    """Position of a module type in :data:`MODULE_TYPE_ORDER` (unknown types last)."""
    return MODULE_TYPE_ORDER.index(module_type) if module_type in MODULE_TYPE_ORDER else len(MODULE_TYPE_ORDER)
