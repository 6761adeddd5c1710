"""A checkpoint series as the monitor's shard layout: whole matrices, loaded lazily from the current checkpoint.

The probe reads every matrix only through ``LocalShard.values()``
(``compass_monitor.sharding``). Here each monitored matrix is one whole,
contributed shard (``start=0``, ``numel=m*n``) whose ``values()`` loads its
tensor from the checkpoint the :class:`CheckpointCursor` points at (memory
mapped, one tensor at a time) and applies its :class:`~.views.TensorView`
(transpose, fused rows, expert), the live monitor's canonical view. The last
stored tensor read is kept until another is read, so the q, k and v views of a
fused projection read it once. The base is captured with
the cursor on the base checkpoint; then the driver moves the cursor to each
checkpoint and takes one snapshot. A second cursor stays on the base: the
probe rereads W0 from it whenever it measures a matrix and keeps its masks in
a spill file (``compass_monitor.state_spill``), so peak memory is set by the
largest matrix plus about 2 bits per weight of the snapshot in flight (its
changed masks, and the store writer's previous masks), not by the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..selection import ParamSpec
from ..sharding import LocalShard, ShardLayout
from .series import TensorSource
from .views import TensorView

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

    def __init__(
        self,
        source: TensorSource,
        *,
        views: dict[str, TensorView] | None = None,
        on_first_read: Callable[[str], None] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.source = source
        self.views = dict(views or {})
        self.on_first_read = on_first_read
        self.device = torch.device(device)
        self._read: set[str] = set()
        self._last: tuple[str, torch.Tensor] | None = None
        # The store writer's thread rereads W0 (its codes) while the training thread reads too:
        # the one-tensor cache must never hand one thread the other's tensor.
        self._lock = threading.Lock()

    def move_to(self, source: TensorSource) -> None:
        """Point every shard at ``source`` from now on."""
        with self._lock:
            self.source = source
            self._read = set()
            self._last = None

    def stored(self, tensor: str) -> torch.Tensor:
        """The checkpoint tensor ``tensor`` as stored (header shape and dtype), on ``device``."""
        with self._lock:
            return self._stored(tensor)

    def _stored(self, tensor: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == tensor:
            return self._last[1]
        self._last = None  # the previous tensor is dropped before the next is read
        value = self.source.load(tensor)
        if value.device != self.device:
            value = value.to(self.device, non_blocking=False)
        self._last = (tensor, value)
        return value

    def load(self, name: str) -> torch.Tensor:
        """Matrix ``name`` from the current checkpoint, as a 1-D tensor in row-major order (its stored dtype), on ``device``.

        Safe to call from several threads.
        """
        view = self.views.get(name) or TensorView(name)
        with self._lock:
            tensor = view.apply(self._stored(view.tensor))
            first = name not in self._read
            self._read.add(name)
        if first and self.on_first_read is not None:
            self.on_first_read(name)
        return tensor.reshape(-1)


def build_layout(specs: list[ParamSpec], cursor: CheckpointCursor, *, base: CheckpointCursor | None = None, facts: dict | None = None) -> ShardLayout:
    """One whole, contributed shard per matrix, each reading its tensor from ``cursor``'s checkpoint on demand.

    Args:
        specs: the monitored matrices (``views.plan_views``), in store order; ``cursor.views`` says how each is read.
        cursor: where the shards read from.
        base: a cursor that stays on the base checkpoint: the probe then rereads W0 from it
            instead of holding it (``ShardLayout.base_values``; memory bounded by the largest matrix).
        facts: JSON-serialisable facts for the store's ``selection`` attribute.

    Returns:
        A ``plain`` single-process layout (no collectives).
    """

    def reader(name: str, at: CheckpointCursor = cursor) -> Callable[[], torch.Tensor]:
        return lambda: at.load(name)

    shards = [
        LocalShard(spec=spec, start=0, numel=spec.numel, contributes=True, layout="checkpoint tensor (memory-mapped, read per snapshot)", values=reader(spec.name))
        for spec in specs
    ]
    base_values = None if base is None else [reader(spec.name, base) for spec in specs]
    return ShardLayout(shards=shards, kind="plain", facts=dict(facts or {}), base_values=base_values)
