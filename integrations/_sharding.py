"""Detects sharded parameters, and whether the installed core can monitor them.

Under FSDP (FSDP1 flat parameters or ``use_orig_params`` views), FSDP2 /
``ModelParallelStrategy`` (DTensor parameters) or DeepSpeed ZeRO-3
(partitioned parameters) a process holds only a shard of each matrix. A core
with sharded support (``compass_monitor.probe``: FSDP1 and FSDP2 /
DTensor ``Shard(0)``; ``CompassMonitor(model, ...)`` returns a monitor that is
created and stepped on every rank) monitors such models; without it, or for
DeepSpeed ZeRO-3, the adapters refuse them before training starts, with a
message that says what to do instead.
"""

from __future__ import annotations

import importlib.util

from torch import nn

__all__ = ["UnsupportedShardingError", "check_not_sharded", "core_supports_sharding", "sharding_kind", "monitor_on_every_rank"]


class UnsupportedShardingError(NotImplementedError):
    """The model's parameters are sharded across processes; compass-monitor cannot watch them yet."""


def sharding_kind(model: nn.Module) -> str | None:
    """What shards ``model``'s parameters, or None if every parameter is whole on this process."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        dist = None
    if dist is not None and dist.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        for module in model.modules():
            if isinstance(module, FullyShardedDataParallel):
                return "FSDP (FullyShardedDataParallel)"
            if isinstance(module, FSDPModule):
                return "FSDP2 (fully_shard)"
        for name, param in model.named_parameters():
            if isinstance(param, DTensor):
                return f"DTensor parameters ({name}, placements {tuple(param.placements)})"
            if type(param).__name__ == "FlatParameter" or getattr(param, "_is_flat_param", False):
                return f"an FSDP flat parameter ({name})"
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
            return f"DeepSpeed ZeRO-3 partitioned parameters ({name})"
    return None


def core_supports_sharding() -> bool:
    """Whether the installed core monitors FSDP1 / FSDP2 (DTensor) models (one monitor per rank)."""
    return importlib.util.find_spec("compass_monitor.probe") is not None


def monitor_on_every_rank(model: nn.Module, *, where: str) -> bool:
    """True if ``model`` is sharded and the core monitors it on every rank; False if it is whole on each rank.

    Raises:
        UnsupportedShardingError: the model is sharded in a way the core cannot monitor.
    """
    kind = sharding_kind(model)
    if kind is None:
        return False
    if core_supports_sharding() and not kind.startswith("DeepSpeed"):
        return True
    check_not_sharded(model, where=where)
    return False  # pragma: no cover - check_not_sharded raised


def check_not_sharded(model: nn.Module, *, where: str) -> None:
    """Raise :class:`UnsupportedShardingError` if ``model``'s parameters are sharded.

    Args:
        model: the module that will be monitored.
        where: the framework set-up, for the message (e.g. ``"Lightning FSDPStrategy"``).
    """
    kind = sharding_kind(model)
    if kind is not None:
        if kind.startswith("DeepSpeed") or core_supports_sharding():
            reason = "the core reads FSDP1 and FSDP2 / DTensor Shard(0) shards only"
        else:
            reason = (
                "this compass-monitor core compares whole matrices on one process; it has no sharded support "
                "(each rank's local shard with its global offset)"
            )
        raise UnsupportedShardingError(
            f"compass-monitor cannot watch sharded parameters here: {where} holds {kind}, and {reason}. "
            "Train with a single device or DDP (every rank holds the whole model; only rank 0 writes), "
            "or leave the monitor out of this run."
        )
