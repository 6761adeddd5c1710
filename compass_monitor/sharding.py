"""The shard contract, and discovery of each rank's local shards.

The core takes, per monitored parameter, a :class:`LocalShard`: the global
matrix (its :class:`~compass_monitor.selection.ParamSpec`, shape (m, n); 1-D
parameters are 1 x n), the local elements as a *contiguous range of global
row-major flat indices* ``[start, start + numel)``, whether this rank
contributes them (with replicated copies only one does), and a function that
returns the current local values as a 1-D tensor in that order. Every layout
the monitor supports is such a range:

* a whole parameter (a plain module, or a parameter FSDP does not manage):
  ``[0, m n)``; contributed by rank 0 only (every rank holds a replica);
* FSDP2 ``fully_shard`` / DTensor ``Shard(0)``: the row block
  ``[r0 n, (r0 + k) n)`` from ``compute_local_shape_and_global_offset``
  (``torch.chunk`` rows: trailing ranks may hold fewer or no rows). Mesh
  dimensions that ``Replicate`` (HSDP) contribute on coordinate 0 only;
* FSDP1 (``FullyShardedDataParallel``, ``use_orig_params`` True or False): the
  flat parameter's shard metadata (``_shard_param_infos``) gives each original
  parameter's part of the local shard as ``[intra_param_start_idx,
  intra_param_end_idx]`` of its flattened tensor, which may start and end
  mid-row. ``HYBRID_SHARD`` contributes on the first replica only;
  ``NO_SHARD`` is a whole replica on every rank (rank 0 contributes).

Refused, naming the parameter and its layout: ``Shard(d)`` for d != 0 (tensor
parallel column shards), ``_StridedShard`` (FSDP2 on top of tensor parallel),
``Partial``, a device mesh that does not span the monitor's process group, and
DeepSpeed ZeRO-3 partitioned parameters.

Discovery imports ``torch.distributed`` lazily and only when a model uses it.
It never imports a training framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import MonitorConfig
from .canonical_views import unwrapped_modules
from .selection import ParamSpec, SelectedMatrix, Selection, _Selector, select_matrices

__all__ = [
    "LocalShard",
    "ShardLayout",
    "ShardingError",
    "ShapeChangedError",
    "discover_shards",
    "whole_shards",
    "whole_layout",
    "sharding_kind",
]


class ShardingError(NotImplementedError):
    """A parameter is sharded in a way the monitor does not support (the message names it)."""


@dataclass(frozen=True)
class LocalShard:
    """One rank's part of one monitored parameter (the core's whole view of sharding).

    Attributes:
        spec: the global parameter (name, role, shape (m, n)).
        start: global row-major flat index of the first local element.
        numel: number of local elements (0: this rank holds none).
        contributes: whether this rank's elements count (False on replicas
            that another rank already contributes).
        layout: how the parameter is sharded, in words (for messages).
        values: returns the current local values, a 1-D tensor of ``numel``
            elements in global flat order (a view; never a gathered copy).
        source: the model's parameter that ``values`` reads (None where there is
            none to check: FSDP1 flat parameters, lazily read tensors); the probe
            checks at each snapshot that the model still holds it (``bindings``).
    """

    spec: ParamSpec
    start: int
    numel: int
    contributes: bool
    layout: str
    values: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    source: Any = field(default=None, repr=False, compare=False)

    @property
    def end(self) -> int:
        return self.start + self.numel

    @property
    def global_offset(self) -> tuple[int, int]:
        """(row, column) of the first local element in the global matrix."""
        n = max(self.spec.shape[1], 1)
        return divmod(self.start, n)

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.numel == self.spec.numel

    @property
    def counted(self) -> int:
        """Elements this rank contributes (0 on a non-contributing replica)."""
        return self.numel if self.contributes else 0

    def local(self) -> torch.Tensor:
        """The current local values (1-D), checked against the contract."""
        t = self.values()
        if t.numel() != self.numel:
            raise ShardingError(
                f"parameter {self.spec.name!r} ({self.layout}) now holds {t.numel()} local elements, "
                f"it held {self.numel} when the base was taken; a resharded or resized parameter cannot be "
                "compared with its base. Start a new run store."
            )
        return t.detach().reshape(-1)


@dataclass
class ShardLayout:
    """Every monitored parameter's local shard on this rank, and the process group they span."""

    shards: list[LocalShard]
    kind: str  # "plain", "fsdp2", "fsdp1", "dtensor"
    group: Any = None  # torch.distributed ProcessGroup, None for the default group
    rank: int = 0
    world_size: int = 1
    #: JSON facts about the selection (frozen / left-out matrices with reasons, unknown module names,
    #: notes); the monitor stores them under the store attribute ``selection``.
    facts: dict[str, Any] = field(default_factory=dict)
    #: per shard, a function that reads its base W0 again (1-D, like ``LocalShard.values``), where
    #: the base stays on disk (post hoc: the base checkpoint). The probe then keeps no copy of W0
    #: and spills its masks to a file (``state_spill``): memory bounded by the largest matrix.
    #: None (a live run): the probe holds W0, since training overwrites it.
    base_values: list[Callable[[], torch.Tensor]] | None = field(default=None, repr=False, compare=False)

    @property
    def specs(self) -> list[ParamSpec]:
        return [s.spec for s in self.shards]

    @property
    def distributed(self) -> bool:
        """Whether the monitor must run collectives (some parameter is split across ranks)."""
        return self.kind != "plain"


def _dist():
    import torch.distributed as dist

    return dist


class ShapeChangedError(ShardingError):
    """A monitored parameter no longer has the shape it had when the base was taken."""


def _whole(
    spec: ParamSpec,
    source: torch.Tensor | Callable[[], torch.Tensor],
    *,
    contributes: bool = True,
    layout: str = "whole",
    param: torch.Tensor | None = None,
) -> LocalShard:
    """A whole matrix as one shard; ``source`` is the tensor, or a function returning its current (m, n) view."""
    view = source if callable(source) and not isinstance(source, torch.Tensor) else (lambda p=source: p.detach())

    def values() -> torch.Tensor:
        t = view()
        if t.numel() != spec.numel or (t.dim() == 2 and tuple(t.shape) != spec.shape):
            raise ShapeChangedError(
                f"parameter {spec.name!r} has shape {tuple(t.shape)} but had {spec.shape} when the base "
                "was taken; a resized parameter cannot be compared with its base. Start a new run store."
            )
        return t.reshape(-1)

    return LocalShard(spec=spec, start=0, numel=spec.numel, contributes=contributes, layout=layout, values=values, source=param)


def whole_layout(model: nn.Module, config: MonitorConfig, *, optimizer: Any = None) -> ShardLayout:
    """Every selected matrix as a whole, contributed shard (a single process holds the model), with the selection's facts."""
    selection = select_matrices(model, config, optimizer=optimizer)
    return ShardLayout(shards=[_whole(m.spec, m.matrix, param=m.source) for m in selection.matrices], kind="plain", facts=selection.facts)


def whole_shards(model: nn.Module, config: MonitorConfig, *, optimizer: Any = None) -> list[LocalShard]:
    """Every selected matrix as a whole, contributed shard (see :func:`whole_layout`)."""
    return whole_layout(model, config, optimizer=optimizer).shards


def sharding_kind(model: nn.Module) -> str:
    """``fsdp1`` (FullyShardedDataParallel), ``dtensor`` (FSDP2 or other DTensor parameters) or ``plain``.

    Raises:
        ShardingError: DeepSpeed ZeRO-3 partitioned parameters.
    """
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
            raise ShardingError(
                f"parameter {name!r} is a DeepSpeed ZeRO-3 partitioned parameter; compass-monitor reads FSDP1, "
                "FSDP2/DTensor Shard(0) and unsharded parameters only"
            )
    try:
        dist = _dist()
    except ImportError:  # pragma: no cover - torch built without distributed
        return "plain"
    if not dist.is_available():
        return "plain"
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return "fsdp1"
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "dtensor"
    return "plain"


def discover_shards(model: nn.Module, config: MonitorConfig, *, group: Any = None, optimizer: Any = None) -> ShardLayout:
    """The local shards of the parameters ``config`` selects, in the order a single process selects them.

    Names, roles, module types and shapes are those of the unsharded model
    (every wrapper prefix removed), so the run store of a sharded run is laid
    out exactly like that of a single-process run. Under sharding only plain
    ``nn.Linear``-layout matrices can be mapped onto shards: a transposed
    (``Conv1D``), fused-split, expert or LoRA view of a sharded parameter is
    refused, naming it.

    Args:
        optimizer: when given, parameters in none of its param groups count as frozen.

    Raises:
        ShardingError: an unsupported layout (the message names the parameter).
        SelectionError: nothing matches the configuration.
    """
    kind = sharding_kind(model)
    if kind == "plain":
        return whole_layout(model, config, optimizer=optimizer)
    dist = _dist()
    if not dist.is_initialized():
        raise ShardingError(f"the model holds {kind} parameters but torch.distributed is not initialized")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if kind == "fsdp1":
        shards, facts = _fsdp1_shards(model, config, rank=rank)
    else:
        shards, facts = _dtensor_shards(model, config, rank=rank, world=world, optimizer=optimizer)
    fsdp2 = False
    try:
        from torch.distributed.fsdp import FSDPModule

        fsdp2 = any(isinstance(m, FSDPModule) for m in model.modules())
    except ImportError:  # pragma: no cover
        pass
    kind = "fsdp2" if fsdp2 and kind == "dtensor" else kind
    return ShardLayout(shards=shards, kind=kind, group=group, rank=rank, world_size=world, facts=facts)


# ----------------------------------------------------------------------------- DTensor / FSDP2


def _refuse_view(matrix: SelectedMatrix, layout: str) -> ShardingError:
    spec = matrix.spec
    how = []
    if spec.get("layout") == "in_out":
        how.append("stored transposed (Conv1D, (in, out))")
    if spec.get("rows") is not None:
        how.append(f"a row block of the fused {spec.get('source')}")
    if spec.get("expert") is not None:
        how.append("one expert of a 3-D expert tensor")
    if spec.get("adapter"):
        how.append(f"the effective weight of a {spec.get('adapter')} layer")
    return ShardingError(
        f"compass-monitor cannot read {spec.name!r} under {layout}: it is {' and '.join(how) or 'not a plain matrix'}, "
        "and a shard of that parameter is not a contiguous block of the monitored (out, in) matrix. Monitor it "
        "unsharded (single device or DDP), or leave it out with MonitorConfig(name_pattern=...)."
    )


def _dtensor_shards(model: nn.Module, config: MonitorConfig, *, rank: int, world: int, optimizer: Any) -> tuple[list[LocalShard], dict[str, Any]]:
    from torch.distributed.tensor import DTensor

    selection = select_matrices(model, config, optimizer=optimizer)
    shards = []
    for matrix in selection.matrices:
        if isinstance(matrix.source, DTensor):
            if not matrix.plain:
                raise _refuse_view(matrix, f"DTensor placements {tuple(matrix.source.placements)}")
            shards.append(_dtensor_shard(matrix.spec, matrix.source, world=world))
        else:
            # Not managed by FSDP2: every rank holds the same copy; rank 0 contributes it.
            shards.append(_whole(matrix.spec, matrix.matrix, contributes=rank == 0, layout="replicated (not sharded)", param=matrix.source))
    return shards, selection.facts


def _dtensor_shard(spec: ParamSpec, param: Any, *, world: int) -> LocalShard:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, tuple(param.placements)
    layout = f"DTensor placements {placements} on mesh {tuple(mesh.shape)}"
    refuse = (
        f"compass-monitor cannot read parameter {spec.name!r}: {layout}. Supported: Shard(0) "
        "(FSDP2 fully_shard, trailing ranks may hold fewer or no rows) and Replicate mesh dimensions (HSDP)"
    )
    for placement in placements:
        if type(placement) is Shard and placement.dim == 0:
            continue
        if isinstance(placement, Replicate):
            continue
        what = type(placement).__name__
        if isinstance(placement, Shard) and type(placement) is not Shard:
            raise ShardingError(f"{refuse}; {what} (strided shards, e.g. FSDP2 over tensor parallel) is not supported")
        if isinstance(placement, Shard):
            raise ShardingError(f"{refuse}; Shard({placement.dim}) splits columns (tensor parallel), which is not supported")
        raise ShardingError(f"{refuse}; {what} is not supported")
    if mesh.size() != world:
        raise ShardingError(f"{refuse}; its mesh spans {mesh.size()} ranks but the monitor's process group has {world}")
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ShardingError(f"{refuse}; this rank is not in its device mesh")
    contributes = all(c == 0 for c, p in zip(coordinate, placements) if isinstance(p, Replicate))
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    if param.dim() == 2:
        m, n = spec.shape
        if tuple(local_shape[1:]) != (n,) or offset[1] != 0:
            raise ShardingError(f"{refuse}; local block {tuple(local_shape)} at {tuple(offset)} is not a block of whole rows")
        start, numel = int(offset[0]) * n, int(local_shape[0]) * n
    else:
        start, numel = int(offset[0]), int(local_shape[0])
    if numel == 0:
        start = 0

    def values(p=param) -> torch.Tensor:
        return p.to_local().detach().reshape(-1)

    return LocalShard(spec=spec, start=start, numel=numel, contributes=contributes, layout=layout, values=values, source=param)


# ----------------------------------------------------------------------------- FSDP1


def _fsdp1_shards(model: nn.Module, config: MonitorConfig, *, rank: int) -> tuple[list[LocalShard], dict[str, Any]]:
    """Original parameters of FSDP1 flat parameters, in single-process selection order.

    Each flat parameter's original parameters stand in the selection as meta
    tensors of their unsharded shape (with the flat parameter's
    ``requires_grad``), so names, roles, types and frozen status are decided
    exactly as for the unwrapped model.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    dist = _dist()
    # id(original module) -> [(param name, flat parameter, index in it, FSDP module)], in flat order
    managed: dict[int, list[tuple[str, Any, int, Any]]] = {}
    for fsdp in model.modules():
        if not isinstance(fsdp, FullyShardedDataParallel) or fsdp._handle is None:
            continue
        flat = fsdp._handle.flat_param
        for i, info in enumerate(flat._param_infos):
            managed.setdefault(id(info.module), []).append((info.param_name, flat, i, fsdp))

    selector = _Selector(model, config, None)
    sources: dict[int, tuple[Any, int, Any]] = {}  # id(meta stand-in) -> (flat parameter, index, FSDP module)
    entries: list[tuple[str, nn.Module, Any, str, torch.Tensor]] = []
    for module_name, module, tuner in unwrapped_modules(model):
        if isinstance(module, FullyShardedDataParallel):
            continue
        flat_entries = managed.get(id(module), [])
        flat_names = {entry[0] for entry in flat_entries}
        for param_name, param in module.named_parameters(recurse=False):
            if type(param).__name__ == "FlatParameter" or getattr(param, "_is_flat_param", False):
                continue
            if param_name in flat_names:
                continue  # a use_orig_params view: taken from its flat parameter below
            entries.append((module_name, module, tuner, param_name, param))
        for param_name, flat, i, fsdp in flat_entries:
            stand_in = torch.empty(flat._shapes[i], device="meta", dtype=flat.dtype).requires_grad_(flat.requires_grad)
            selector.probes.add(id(stand_in))
            sources[id(stand_in)] = (flat, i, fsdp)
            entries.append((module_name, module, tuner, param_name, stand_in))
    selection: Selection = selector.run(entries)
    shards: list[LocalShard] = []
    for matrix in selection.matrices:
        source = sources.get(id(matrix.source))
        if source is None:
            shards.append(_whole(matrix.spec, matrix.matrix, contributes=rank == 0, layout="replicated (not managed by FSDP)", param=matrix.source))
            continue
        flat, i, fsdp = source
        if not matrix.plain:
            raise _refuse_view(matrix, f"FSDP1 {fsdp.sharding_strategy.name} (flat parameter)")
        shards.append(_flat_shard(matrix.spec, flat, i, fsdp, dist=dist, strategy_enum=ShardingStrategy, rank=rank))
    return shards, selection.facts


def _flat_shard(spec: ParamSpec, flat: Any, index: int, fsdp: Any, *, dist: Any, strategy_enum: Any, rank: int) -> LocalShard:
    strategy = fsdp.sharding_strategy
    layout = f"FSDP1 {strategy.name} flat parameter ({'use_orig_params' if fsdp._use_orig_params else 'FlatParameter'})"
    info = flat._shard_param_infos[index]
    if strategy == strategy_enum.NO_SHARD:
        contributes = rank == 0
    elif strategy in (strategy_enum.HYBRID_SHARD, strategy_enum._HYBRID_SHARD_ZERO2):
        contributes = dist.get_rank(fsdp._inter_node_pg) == 0
    else:
        contributes = True
    if not info.in_shard:
        start, numel, offset = 0, 0, 0
    else:
        start, numel, offset = int(info.intra_param_start_idx), int(info.numel_in_shard), int(info.offset_in_shard)
        if info.intra_param_end_idx - info.intra_param_start_idx + 1 != numel:
            raise ShardingError(f"parameter {spec.name!r}: inconsistent FSDP1 shard metadata {info}")

    def values(flat=flat, offset=offset, numel=numel) -> torch.Tensor:
        # The sharded flat parameter (FSDP keeps it in _local_shard once initialised;
        # before the first forward the parameter's data is the local shard itself).
        local = getattr(flat, "_local_shard", None)
        if local is None or local.numel() == 0 and flat.numel() > 0:
            local = flat
        return local.detach().reshape(-1)[offset : offset + numel]

    return LocalShard(spec=spec, start=start, numel=numel, contributes=contributes, layout=layout, values=values)
