"""A checkpoint series as the monitor's shard layout: whole matrices, loaded lazily from the current checkpoint.

The probe reads every matrix only through ``LocalShard.values()``
(``compass_monitor.sharding``). Here each monitored matrix is one whole,
contributed shard (``start=0``, ``numel=m*n``) whose ``values()`` loads that
tensor from the checkpoint the :class:`CheckpointCursor` points at (memory
mapped, one tensor at a time, dropped after use). The base is captured with
the cursor on the base checkpoint; then the driver moves the cursor to each
checkpoint and takes one snapshot. Peak memory is then set by the largest
matrix (plus what the monitor itself keeps per matrix: W0's bf16 codes and
4 bits of masks per weight), not by the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..selection import ParamSpec
from ..sharding import LocalShard, ShardLayout
from .series import TensorSource

__all__ = ["CheckpointCursor", "build_layout"]


class CheckpointCursor:
    """The checkpoint the lazily loaded shards read from now, and a count of the matrices read from it.

    Args:
        source: the first checkpoint (the base).
        on_first_read: called with a matrix name the first time it is read from the current checkpoint
            (the progress bar advances on it; a second read, for the spectral diagnostics, does not count).
        device: where the matrices go after reading (the probe then runs there: ``cuda`` for the
            principal masks and spectra, the costly part).
    """

    def __init__(self, source: TensorSource, *, on_first_read: Callable[[str], None] | None = None, device: str | torch.device = "cpu") -> None:
        self.source = source
        self.on_first_read = on_first_read
        self.device = torch.device(device)
        self._read: set[str] = set()

    def move_to(self, source: TensorSource) -> None:
        """Point every shard at ``source`` from now on."""
        self.source = source
        self._read = set()

    def load(self, name: str) -> torch.Tensor:
        """``name`` from the current checkpoint, as a 1-D tensor in row-major order (its stored dtype), on ``device``."""
        tensor = self.source.load(name)
        if tensor.device != self.device:
            tensor = tensor.to(self.device, non_blocking=False)
        if name not in self._read:
            self._read.add(name)
            if self.on_first_read is not None:
                self.on_first_read(name)
        return tensor.reshape(-1)


def build_layout(specs: list[ParamSpec], cursor: CheckpointCursor, *, facts: dict | None = None) -> ShardLayout:
    """One whole, contributed shard per matrix, each reading its tensor from ``cursor``'s checkpoint on demand.

    Args:
        specs: the monitored matrices (``tensor_specs.specs_from_shapes``), in store order.
        cursor: where the shards read from.
        facts: JSON-serialisable facts for the store's ``selection`` attribute.

    Returns:
        A ``plain`` single-process layout (no collectives).
    """

    def reader(name: str) -> Callable[[], torch.Tensor]:
        return lambda: cursor.load(name)

    shards = [
        LocalShard(spec=spec, start=0, numel=spec.numel, contributes=True, layout="checkpoint tensor (memory-mapped, read per snapshot)", values=reader(spec.name))
        for spec in specs
    ]
    return ShardLayout(shards=shards, kind="plain", facts=dict(facts or {}))
