"""Detects sharded parameters, which the core cannot monitor yet.

The core measures whole matrices held by one process. Under FSDP (FSDP1 flat
parameters or ``use_orig_params`` views), FSDP2 / ``ModelParallelStrategy``
(DTensor parameters) or DeepSpeed ZeRO-3 (partitioned parameters) a process
holds only a shard, so the adapters refuse such models before training starts,
with a message that says what to do instead. Sharded support needs the core to
take each parameter's local shard with its global offset (DESIGN sec. 3).
"""

from __future__ import annotations

from torch import nn

__all__ = ["UnsupportedShardingError", "check_not_sharded", "sharding_kind"]


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


def check_not_sharded(model: nn.Module, *, where: str) -> None:
    """Raise :class:`UnsupportedShardingError` if ``model``'s parameters are sharded.

    Args:
        model: the module that will be monitored.
        where: the framework set-up, for the message (e.g. ``"Lightning FSDPStrategy"``).
    """
    kind = sharding_kind(model)
    if kind is not None:
        raise UnsupportedShardingError(
            f"compass-monitor cannot watch sharded parameters yet: {where} holds {kind}. "
            "The monitor compares whole matrices on one process; sharded support (each rank's local shard "
            "with its global offset) is not in the core yet. Train with a single device or DDP "
            "(every rank holds the whole model; only rank 0 writes), or leave the callback out of sharded runs."
        )
