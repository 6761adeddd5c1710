"""The one record of a monitored matrix, shared by selection, the probe, the store writer and reader.

Torch-free, so that readers of a run store (CLI, TUI, report) never load torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MatrixSpec", "ROLES", "param_id"]

#: Roles keep kinds of weights apart in every report (linear layers are never mixed with the rest).
ROLES = ("linear", "embedding", "lm_head", "norm", "bias")


def param_id(index: int) -> str:
    """Store id of the index-th monitored matrix (``p0000``, ...); names never become paths."""
    return f"p{index:04d}"


@dataclass(frozen=True)
class MatrixSpec:
    """A monitored matrix: what it is, and where it comes from.

    Attributes:
        name: the matrix's name (the unwrapped model's ``state_dict`` key).
        role: one of :data:`ROLES`.
        module_type: q, k, v, o, gate, up, down, ... or ``other`` (for roles other than
            ``linear``: the role).
        layer: the block index parsed from the name, or -1.
        shape: (rows, cols) of the matrix as measured, (out_features, in_features) for
            linear layers; 1-D parameters are 1 x n.
        index: position in the monitored list (the store id is ``param_id(index)``); -1 before
            the list is built.
        extra: optional facts recorded with the matrix (source tensor, storage layout, row
            range of a fused projection, head geometry, ...), JSON-serialisable.
    """

    name: str
    role: str
    module_type: str
    layer: int
    shape: tuple[int, int]
    index: int = -1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def id(self) -> str:
        return param_id(self.index)

    def get(self, key: str, default: Any = None) -> Any:
        """An optional fact from ``extra`` (e.g. ``head_dim``), ``default`` when not recorded."""
        return self.extra.get(key, default)

    def with_index(self, index: int) -> "MatrixSpec":
        return MatrixSpec(self.name, self.role, self.module_type, self.layer, self.shape, index=index, extra=dict(self.extra))

    def to_record(self) -> dict[str, Any]:
        """The JSON record the store keeps in its ``params`` attribute."""
        record: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "module_type": self.module_type,
            "layer": int(self.layer),
            "shape": [int(self.shape[0]), int(self.shape[1])],
        }
        record.update({k: v for k, v in self.extra.items() if k not in record})
        return record

    @classmethod
    def from_record(cls, index: int, record: dict[str, Any]) -> "MatrixSpec":
        """Inverse of :meth:`to_record` (unknown keys are kept in ``extra``)."""
        core = {"id", "name", "role", "module_type", "layer", "shape"}
        shape = record["shape"]
        return cls(
            str(record["name"]),
            str(record["role"]),
            str(record["module_type"]),
            int(record["layer"]),
            (int(shape[0]), int(shape[1])),
            index=index,
            extra={k: v for k, v in record.items() if k not in core},
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

