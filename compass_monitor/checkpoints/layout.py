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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields

import torch
from torch import nn

from ..selection import ParamSpec
from ..sharding import LocalShard, ShardLayout
from .series import TensorSource

__all__ = ["CheckpointCursor", "build_layout", "ModuleStandIn", "LazyMatrices"]


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
        facts: JSON-serialisable facts for the store's ``selection`` attribute (when the layout carries them).

    Returns:
        A ``plain`` single-process layout (no collectives).
    """

    def reader(name: str) -> Callable[[], torch.Tensor]:
        return lambda: cursor.load(name)

    shards = [
        LocalShard(spec=spec, start=0, numel=spec.numel, contributes=True, layout="checkpoint tensor (memory-mapped, read per snapshot)", values=reader(spec.name))
        for spec in specs
    ]
    kwargs = {"facts": dict(facts or {})} if "facts" in {f.name for f in fields(ShardLayout)} else {}
    return ShardLayout(shards=shards, kind="plain", **kwargs)


class _Linear(nn.Module):
    """A stand-in module whose class name tells ``selection`` the role (``*Linear``)."""


class _Embedding(nn.Module):
    pass


class _Norm(nn.Module):
    pass


_CLASSES = {"linear": _Linear, "lm_head": _Linear, "bias": _Linear, "embedding": _Embedding, "norm": _Norm}
_Linear.__name__ = _Linear.__qualname__ = "CheckpointLinear"
_Embedding.__name__ = _Embedding.__qualname__ = "CheckpointEmbedding"
_Norm.__name__ = _Norm.__qualname__ = "CheckpointNorm"


class ModuleStandIn(nn.Module):
    """A module tree named like the checkpoint, with shape-only (meta) parameters, for today's model-taking monitor.

    Each monitored tensor becomes a meta parameter at its dotted name, under a
    module whose class gives ``selection`` the role the name gave, so the
    monitor selects exactly ``specs``. It holds no data: the values come from
    :class:`LazyMatrices`. Replaced by ``CompassMonitor.from_layout`` over
    :func:`build_layout` once the monitor has it.
    """

    def __init__(self, specs: list[ParamSpec]) -> None:
        super().__init__()
        for spec in specs:
            module_name, _, leaf = spec.name.rpartition(".")
            shape = spec.shape if spec.role in ("linear", "lm_head", "embedding") or spec.shape[0] != 1 else (spec.shape[1],)
            param = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
            self._module_at(module_name, _CLASSES[spec.role]).register_parameter(leaf, param)

    def _module_at(self, dotted: str, cls: type[nn.Module]) -> nn.Module:
        module: nn.Module = self
        parts = dotted.split(".") if dotted else []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            child = module._modules.get(part)
            if child is None:
                child = (cls if last else nn.Module)()
                module.add_module(part, child)
            elif last and type(child) is nn.Module:
                child.__class__ = cls  # first made as a plain parent of a deeper tensor; it holds tensors too
            module = child
        return module


class LazyMatrices(Sequence[torch.Tensor]):
    """The monitored matrices of the cursor's checkpoint, each read when the monitor reaches it and dropped after.

    Iterating yields one tensor at a time (the probe's loops ``zip`` over it),
    so at most two matrices of the checkpoint are in memory at once (the one
    measured, held by the loop, while the next is read).
    """

    def __init__(self, specs: list[ParamSpec], cursor: CheckpointCursor) -> None:
        self._specs = list(specs)
        self._cursor = cursor

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._cursor.load(self._specs[index].name)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for spec in self._specs:
            yield self._cursor.load(spec.name)
